"""Benchmarks and GPU checks, kept out of the product packages. `python -m bench` compares ours with the plain diffusers
way on the SD 1.5 architecture (docs/BENCHMARKS.md); `python -m bench.training_check` and `python -m
bench.generation_check` compare graph and eager paths on a GPU; `python -m bench.lag` and `python -m bench.ledger`
measure the bot's event loop and ledger."""
