-- storyfarm metadata for the local mode: the Postgres schema (migrations/postgres) in SQLite, with
-- the same tables, constraints and indexes, plus frames.finished_at from the start.
--
-- Encodings, the same in every table: uuids are TEXT in canonical lowercase hyphenated form (so
-- text order is uuid order); timestamps are INTEGER microseconds since the Unix epoch, UTC (the
-- precision of timestamptz, and comparisons are integer comparisons); json is TEXT; bytes are
-- BLOB. Timestamps have no defaults: the store binds its clock, one `now` per transaction, as
-- Postgres' now() is. STRICT makes a value bound with the wrong type an error instead of a
-- silently different row.

CREATE TABLE projects (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE style_references (
    id            TEXT PRIMARY KEY,
    project_id    TEXT NOT NULL REFERENCES projects (id),
    kind          TEXT NOT NULL CHECK (kind IN ('style')),
    prompt        TEXT NOT NULL,
    image_sha256  TEXT NOT NULL,
    image_key     TEXT NOT NULL,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    size_bytes    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
) STRICT;

CREATE TABLE storyboards (
    id          TEXT PRIMARY KEY,
    project_id  TEXT NOT NULL REFERENCES projects (id),
    name        TEXT NOT NULL,
    -- The validated storyboard (storyfarm-core StoryboardSpec) plus the reference id, as json.
    spec        TEXT NOT NULL CHECK (json_valid(spec)),
    created_at  INTEGER NOT NULL
) STRICT;

-- One row per distinct inversion (content key of everything that determines the trajectory).
CREATE TABLE inversions (
    cache_key       TEXT PRIMARY KEY,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'ready', 'failed')),
    trajectory_key  TEXT,
    error           TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,
    storyboard_id  TEXT NOT NULL REFERENCES storyboards (id),
    state          TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    frames_total   INTEGER NOT NULL,
    error          TEXT,
    created_at     INTEGER NOT NULL,
    finished_at    INTEGER
) STRICT;

CREATE TABLE tasks (
    id             TEXT PRIMARY KEY,
    job_id         TEXT NOT NULL REFERENCES jobs (id),
    kind           TEXT NOT NULL CHECK (kind IN ('invert', 'render')),
    state          TEXT NOT NULL CHECK (state IN ('waiting', 'queued', 'running', 'retry_wait', 'succeeded', 'failed', 'cancelled')),
    family         TEXT NOT NULL,
    attempt        INTEGER NOT NULL DEFAULT 1,
    max_attempts   INTEGER NOT NULL,
    -- invert: the inversion it produces; render: the inversion it replays.
    inversion_key  TEXT,
    -- Encoded storyfarm.v1.Task without the attempt (set when dispatched).
    payload        BLOB NOT NULL,
    not_before     INTEGER,
    worker_id      TEXT,
    heartbeat_at   INTEGER,
    error          TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
) STRICT;
CREATE INDEX tasks_by_job ON tasks (job_id);
CREATE INDEX tasks_waiting_on_inversion ON tasks (inversion_key) WHERE state = 'waiting';
CREATE INDEX tasks_due_retries ON tasks (not_before) WHERE state = 'retry_wait';

CREATE TABLE frames (
    job_id           TEXT NOT NULL REFERENCES jobs (id),
    frame_index      INTEGER NOT NULL,
    prompt           TEXT NOT NULL,
    negative_prompt  TEXT NOT NULL,
    seed             INTEGER NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'rendering', 'succeeded', 'failed', 'cancelled')),
    task_id          TEXT REFERENCES tasks (id),
    png_key          TEXT,
    latents_key      TEXT,
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    -- When the frame reached succeeded, failed or cancelled.
    finished_at      INTEGER,
    PRIMARY KEY (job_id, frame_index)
) STRICT;
CREATE INDEX frames_by_task ON frames (task_id);

-- Transactional outbox: written with the state change, published, then marked. AUTOINCREMENT:
-- ids are never reused, so an id the dispatcher holds always names the same row.
CREATE TABLE outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id       TEXT NOT NULL REFERENCES tasks (id),
    attempt       INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    published_at  INTEGER
) STRICT;
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Every ingested event, so a redelivered event changes nothing. Sequence numbers are per worker:
-- two workers running the same redelivered attempt never shadow each other's events.
CREATE TABLE task_events (
    task_id      TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    worker_id    TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    PRIMARY KEY (task_id, attempt, worker_id, seq)
) STRICT;
