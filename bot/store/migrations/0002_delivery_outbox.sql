-- Delivery as an outbox (bot/dispatch/outbox.py drives it, cogs/delivery.py posts). A finished job (status terminal)
-- with delivered_at NULL is an outbox entry; delivered_at is set only after Discord confirmed every part of the
-- outcome (or the log notifier logged it). Read it with:
--   SELECT id, status, delivered_at, delivered_via, delivery_attempts, delivery_next_at, delivery_error FROM jobs;
--   SELECT * FROM delivery_parts WHERE job_id = ?;

-- Failed delivery attempts so far (a success does not count).
ALTER TABLE jobs ADD COLUMN delivery_attempts INTEGER NOT NULL DEFAULT 0;
-- Unix time before which the outbox does not try again (NULL: as soon as a notifier is attached).
ALTER TABLE jobs ADD COLUMN delivery_next_at REAL;
-- Why the last attempt failed, or why the outcome went elsewhere than the job's channel (kept after delivery, so
-- admins see it in /queue admin list).
ALTER TABLE jobs ADD COLUMN delivery_error TEXT;
-- Where the outcome went, set with delivered_at: the job's channel, a DM to the owner, the log (--no-discord),
-- or nowhere (every route refused; delivery_error says why). NULL for jobs delivered before 0002.
ALTER TABLE jobs ADD COLUMN delivered_via TEXT
    CHECK (delivered_via IN ('channel', 'dm', 'log', 'nowhere'));

-- One row per message of an outcome that Discord confirmed (a result with more than 10 images is several messages).
-- A restart resumes at the first part without a row, so confirmed parts are never posted again. Each part is posted
-- with the nonce 'j<job_id><route letter><part>' and enforce_nonce, so a part whose answer was lost is not doubled
-- if it is posted again within Discord's nonce window (a few minutes).
CREATE TABLE delivery_parts (
    job_id       INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    route        TEXT    NOT NULL CHECK (route IN ('channel', 'dm', 'followup')),
    part         INTEGER NOT NULL,
    message_id   INTEGER NOT NULL,
    confirmed_at REAL    NOT NULL,
    PRIMARY KEY (job_id, route, part)
);
