"""Photo intake, torch-free: uploads (images or a zip) checked, decoded, cropped to the face and de-duplicated into the
prepared training photos of a concept. Runs in the bot at submit time and in the CLI."""
