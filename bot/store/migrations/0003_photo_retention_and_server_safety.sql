-- Photo retention: when the sweep (bot/services/retention.py) deleted a concept's uploaded photos. NULL = still there.
ALTER TABLE concepts ADD COLUMN photos_deleted_at REAL;

-- Per-server choices an admin makes with /queue admin (today: the safety filter). A server without a row uses the
-- operator's default from the settings (BOOTHBOT_SAFETY).
CREATE TABLE server_settings (
    guild_id   INTEGER PRIMARY KEY,
    safety     INTEGER CHECK (safety IN (0, 1)),
    updated_by INTEGER NOT NULL,
    updated_at REAL    NOT NULL
);
