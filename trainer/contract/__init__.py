"""What the bot and the engine agree on, importable without torch: the worker protocol (with the job kind names),
the errors a member sees, prompt parsing, /imagine request checks and batching rule, and token/class naming rules.
The bot process imports only this part of trainer/ (plus trainer.intake, also torch-free)."""
