-- Several base models per bot (BOOTHBOT_MODELS). A concept records the base model it was trained on: its name in
-- the settings and its family ("sd1" | "sdxl", detected from the model). NULL (concepts trained before this):
-- the bot's default base model (BOOTHBOT_MODEL), the only one there was.
ALTER TABLE concepts ADD COLUMN base_model TEXT;
ALTER TABLE concepts ADD COLUMN base_family TEXT;

-- A server's default base model for /train and for /imagine without a concept, chosen with /queue admin model.
-- NULL: the bot's default (BOOTHBOT_MODEL).
ALTER TABLE server_settings ADD COLUMN base_model TEXT;
