"""What the bot and the engine agree on, importable without torch: the worker protocol, the errors a member
sees, prompt parsing, /imagine request checks, token/class naming rules, and the helpers both sides use to write
files atomically and to show durations. The bot process imports only this part of trainer/ (plus trainer.intake,
also torch-free)."""
