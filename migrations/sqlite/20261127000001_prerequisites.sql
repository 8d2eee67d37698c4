-- Prerequisites: character references and anchors beside the style inversion; the same change as
-- migrations/postgres/20261127000001_prerequisites.sql (see there for what each part means).
--
-- SQLite cannot alter a CHECK or NOT NULL constraint, so `style_references` and `tasks` are
-- rebuilt. How, and why not the documented "PRAGMA foreign_keys = OFF, BEGIN, ..., COMMIT,
-- PRAGMA foreign_keys = ON" with sqlx's `-- no-transaction` directive: sqlx 0.8.6 parses that
-- directive but its SQLite migrator ignores it (sqlx-sqlite's `apply` always runs the script in a
-- transaction), and `PRAGMA foreign_keys` is a no-op inside a transaction. So this script runs in
-- sqlx's transaction, with foreign keys as the connection has them (the store's connections
-- enforce them), and relies on `PRAGMA defer_foreign_keys = ON` instead (valid inside a
-- transaction, ends with it):
--
-- * each table is copied to a plain backup table, dropped, created again under its own name with
--   the new definition, and refilled from the backup (no ALTER TABLE RENAME: with foreign keys on,
--   renaming rewrites the other tables' references to the renamed table);
-- * dropping `tasks` deletes its rows implicitly, which leaves the rows of `frames` and `outbox`
--   that reference them orphaned for a moment: deferred, that is counted instead of refused, and
--   refilling the new `tasks` with the same ids counts each of them back. SQLite checks the count
--   at COMMIT, so the migration commits only if every reference holds again (the
--   `PRAGMA foreign_key_check` of the documented procedure, enforced). Without foreign keys
--   enforced nothing is counted and the same rows are copied, so nothing can dangle either.

PRAGMA defer_foreign_keys = ON;

-- References: characters beside styles; a reference may have no image (generated), in which case
-- all five image columns are NULL together.
CREATE TABLE style_references_backup AS SELECT * FROM style_references;
DROP TABLE style_references;
CREATE TABLE style_references (
    id             TEXT PRIMARY KEY,
    project_id     TEXT NOT NULL REFERENCES projects (id),
    kind           TEXT NOT NULL CHECK (kind IN ('style', 'character')),
    prompt         TEXT NOT NULL,
    image_sha256   TEXT,
    image_key      TEXT,
    width          INTEGER,
    height         INTEGER,
    size_bytes     INTEGER,
    created_at     INTEGER NOT NULL,
    -- A character's name (empty for a style).
    name           TEXT NOT NULL DEFAULT '',
    -- A character's subject words, a json array of strings (empty for a style).
    subject_words  TEXT NOT NULL DEFAULT '[]'
        CHECK (json_valid(subject_words) AND json_type(subject_words) = 'array'),
    CHECK (
        (image_sha256 IS NULL AND image_key IS NULL AND width IS NULL AND height IS NULL AND size_bytes IS NULL)
        OR (image_sha256 IS NOT NULL AND image_key IS NOT NULL AND width IS NOT NULL AND height IS NOT NULL
            AND size_bytes IS NOT NULL))
) STRICT;
INSERT INTO style_references
    (id, project_id, kind, prompt, image_sha256, image_key, width, height, size_bytes, created_at)
    SELECT id, project_id, kind, prompt, image_sha256, image_key, width, height, size_bytes, created_at
    FROM style_references_backup;
DROP TABLE style_references_backup;

-- Anchor tasks render a character's anchors; `inversion_key` is the key a task produces.
CREATE TABLE tasks_backup AS SELECT * FROM tasks;
-- The implicit delete of DROP TABLE finds each task's outbox rows through this index, not by a
-- scan of the outbox per task.
CREATE INDEX outbox_by_task_during_migration ON outbox (task_id);
DROP TABLE tasks;
CREATE TABLE tasks (
    id             TEXT PRIMARY KEY,
    job_id         TEXT NOT NULL REFERENCES jobs (id),
    kind           TEXT NOT NULL CHECK (kind IN ('invert', 'anchor', 'render')),
    state          TEXT NOT NULL CHECK (state IN ('waiting', 'queued', 'running', 'retry_wait', 'succeeded', 'failed', 'cancelled')),
    family         TEXT NOT NULL,
    attempt        INTEGER NOT NULL DEFAULT 1,
    max_attempts   INTEGER NOT NULL,
    -- invert, anchor: the cache key it produces; render: NULL (what a task waits for is in
    -- task_waits).
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
INSERT INTO tasks
    (id, job_id, kind, state, family, attempt, max_attempts, inversion_key, payload, not_before,
     worker_id, heartbeat_at, error, created_at, updated_at)
    SELECT id, job_id, kind, state, family, attempt, max_attempts, inversion_key, payload, not_before,
           worker_id, heartbeat_at, error, created_at, updated_at
    FROM tasks_backup ORDER BY rowid;
DROP TABLE tasks_backup;
DROP INDEX outbox_by_task_during_migration;
CREATE INDEX tasks_by_job ON tasks (job_id);
CREATE INDEX tasks_due_retries ON tasks (not_before) WHERE state = 'retry_wait';

-- The unmet prerequisites of waiting tasks.
CREATE TABLE task_waits (
    task_id    TEXT NOT NULL REFERENCES tasks (id),
    cache_key  TEXT NOT NULL,
    PRIMARY KEY (task_id, cache_key)
) STRICT;
CREATE INDEX task_waits_by_key ON task_waits (cache_key);

-- Each job's prerequisites in planning order.
CREATE TABLE job_prerequisites (
    job_id     TEXT NOT NULL REFERENCES jobs (id),
    position   INTEGER NOT NULL,
    cache_key  TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('style', 'anchors')),
    -- The character's name (anchors); empty for the style.
    name       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, cache_key)
) STRICT;

-- Existing rows: a waiting render waited for its job's inversion; every job had at most one.
INSERT INTO task_waits (task_id, cache_key)
    SELECT id, inversion_key FROM tasks
    WHERE kind = 'render' AND state = 'waiting' AND inversion_key IS NOT NULL;
INSERT INTO job_prerequisites (job_id, position, cache_key, kind, name)
    SELECT DISTINCT job_id, 0, inversion_key, 'style', '' FROM tasks WHERE inversion_key IS NOT NULL;
UPDATE tasks SET inversion_key = NULL WHERE kind = 'render';

-- The task that produces a key (cancel and requeue look it up); renders have none.
CREATE INDEX tasks_by_produced_key ON tasks (inversion_key) WHERE inversion_key IS NOT NULL;
