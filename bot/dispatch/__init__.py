"""Running jobs on the GPU: the dispatcher loop (claim, send to the worker, record events, hand results to delivery)
and the client that spawns and supervises the worker process."""
