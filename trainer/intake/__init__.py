"""Photo intake, torch-free: uploads (images or a zip) checked, decoded, cropped to the face and de-duplicated into the
prepared training photos of a concept. Runs in a child process of the bot at submit time (`python -m trainer.intake`,
isolated.py) and in the CLI."""
