"""The `python -m trainer` subcommands an operator runs: make-tiny-model, train, imagine. Each module has
`add_arguments(parser)` and `run(args) -> int` and imports torch only inside `run`."""
