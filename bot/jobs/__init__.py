"""The job queue: the ledger (every job, its owner and status, written only here) and the scheduler (fair order,
per-member limits, queue positions and ETAs)."""
