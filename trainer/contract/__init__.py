"""What the bot and the engine agree on, importable without torch: the worker protocol (with the job kind names),
the errors a member sees, the training options (TrainSpec), prompt parsing, /imagine request checks and batching
rule, token/class naming rules, and the helpers both sides use to write files atomically and to show durations. The
bot process imports only this part of trainer/ (plus trainer.intake, also torch-free)."""
