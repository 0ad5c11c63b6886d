-- boothbot schema, version 1. Applied once, in one transaction, by bot/store.py; never edit after release:
-- add a new numbered file instead. Discord ids (snowflakes) fit SQLite's 64-bit INTEGER. Times are unix seconds.

CREATE TABLE members (
    guild_id   INTEGER NOT NULL,
    member_id  INTEGER NOT NULL,
    first_seen REAL    NOT NULL,
    last_seen  REAL    NOT NULL,
    PRIMARY KEY (guild_id, member_id)
);

CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT    NOT NULL CHECK (kind IN ('train', 'imagine')),
    owner_id         INTEGER NOT NULL,
    guild_id         INTEGER NOT NULL,
    channel_id       INTEGER,
    message_id       INTEGER,
    params           TEXT    NOT NULL DEFAULT '{}',
    status           TEXT    NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
    priority         INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    result           TEXT,
    progress_step    INTEGER,
    progress_total   INTEGER,
    progress_eta_s   REAL,
    progress_at      REAL,
    preview          TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    cancelled_by     INTEGER,
    gpu_seconds      REAL    NOT NULL DEFAULT 0,
    created_at       REAL    NOT NULL,
    started_at       REAL,   -- first claim
    claimed_at       REAL,   -- latest claim (a training runs in several slices)
    finished_at      REAL,
    delivered_at     REAL
);
CREATE INDEX jobs_by_status ON jobs (status, kind);
CREATE INDEX jobs_by_owner ON jobs (guild_id, owner_id, status);
CREATE INDEX jobs_by_claimed ON jobs (claimed_at);
CREATE INDEX jobs_by_finished ON jobs (finished_at);
CREATE INDEX jobs_undelivered ON jobs (finished_at) WHERE delivered_at IS NULL;

-- The ledger's rule, enforced by the database too: a finished job's outcome never changes.
CREATE TRIGGER jobs_terminal_is_final
BEFORE UPDATE OF status, result, error ON jobs
WHEN OLD.status IN ('succeeded', 'failed', 'cancelled', 'interrupted')
 AND (NEW.status IS NOT OLD.status OR NEW.result IS NOT OLD.result OR NEW.error IS NOT OLD.error)
BEGIN
    SELECT RAISE(ABORT, 'job is finished and cannot change');
END;

CREATE TABLE concepts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id        INTEGER NOT NULL,
    owner_id        INTEGER NOT NULL,
    token           TEXT    NOT NULL,
    class_name      TEXT    NOT NULL,
    style           INTEGER NOT NULL DEFAULT 0,
    status          TEXT    NOT NULL DEFAULT 'training'
                    CHECK (status IN ('training', 'ready', 'failed', 'deleted')),
    shared          INTEGER NOT NULL DEFAULT 0,
    job_id          INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
    photo_count     INTEGER NOT NULL DEFAULT 0,
    lora_path       TEXT,
    lora_kohya_path TEXT,
    error           TEXT,
    created_at      REAL    NOT NULL,
    updated_at      REAL    NOT NULL,
    deleted_at      REAL
);
-- A token names one live concept per server; deleted rows free it.
CREATE UNIQUE INDEX concepts_live_token ON concepts (guild_id, token COLLATE NOCASE) WHERE status != 'deleted';
CREATE INDEX concepts_by_owner ON concepts (guild_id, owner_id);
CREATE INDEX concepts_by_job ON concepts (job_id);

-- A training that ends without a LoRA leaves its concept failed, however it ended (cancel, crash, restart).
CREATE TRIGGER concepts_fail_with_training
AFTER UPDATE OF status ON jobs
WHEN NEW.kind = 'train' AND NEW.status IN ('failed', 'cancelled', 'interrupted')
BEGIN
    UPDATE concepts
       SET status = 'failed',
           error = COALESCE(NEW.error, 'The training was cancelled.'),
           updated_at = COALESCE(NEW.finished_at, updated_at)
     WHERE job_id = NEW.id AND status = 'training';
END;

CREATE TABLE images (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    owner_id   INTEGER NOT NULL,
    guild_id   INTEGER NOT NULL,
    path       TEXT    NOT NULL,
    seed       INTEGER,
    prompt     TEXT    NOT NULL DEFAULT '',
    created_at REAL    NOT NULL
);
CREATE INDEX images_by_job ON images (job_id);
CREATE INDEX images_by_owner ON images (guild_id, owner_id);

CREATE TABLE bans (
    guild_id   INTEGER NOT NULL,
    member_id  INTEGER NOT NULL,
    reason     TEXT    NOT NULL DEFAULT '',
    banned_by  INTEGER NOT NULL,
    created_at REAL    NOT NULL,
    PRIMARY KEY (guild_id, member_id)
);

-- role_id 0 is the server-wide value (Discord ids are never 0); other rows apply to members with that role.
CREATE TABLE limits (
    guild_id   INTEGER NOT NULL,
    role_id    INTEGER NOT NULL DEFAULT 0,
    name       TEXT    NOT NULL CHECK (name IN ('max_queued_jobs', 'trainings_per_day')),
    value      INTEGER NOT NULL CHECK (value >= 0),
    updated_by INTEGER NOT NULL,
    updated_at REAL    NOT NULL,
    PRIMARY KEY (guild_id, role_id, name)
);

CREATE TABLE settings_kv (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at REAL NOT NULL
);

CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id   INTEGER,            -- NULL for bot-wide actions (pause, resume)
    actor_id   INTEGER NOT NULL,
    action     TEXT    NOT NULL,
    target     TEXT    NOT NULL DEFAULT '',
    detail     TEXT    NOT NULL DEFAULT '',
    created_at REAL    NOT NULL
);
CREATE INDEX audit_by_guild ON audit_log (guild_id, id);
