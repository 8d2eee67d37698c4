-- Prerequisites: character references and anchors beside the style inversion.
--
-- The `inversions` table becomes the cache of every prerequisite a job can need (a style's
-- trajectory, a character's anchors), keyed by everything that determines it; `trajectory_key`
-- holds the artifact's key for both. `tasks.inversion_key` is from now on the key a prerequisite
-- task (invert or anchor) PRODUCES, NULL for renders; what a task waits for is in `task_waits`.

-- References: characters beside styles; a reference may have no image (generated), in which case
-- all five image columns are NULL together.
ALTER TABLE style_references DROP CONSTRAINT style_references_kind_check;
ALTER TABLE style_references ADD CONSTRAINT style_references_kind_check
    CHECK (kind IN ('style', 'character'));
ALTER TABLE style_references
    ALTER COLUMN image_sha256 DROP NOT NULL,
    ALTER COLUMN image_key DROP NOT NULL,
    ALTER COLUMN width DROP NOT NULL,
    ALTER COLUMN height DROP NOT NULL,
    ALTER COLUMN size_bytes DROP NOT NULL,
    -- A character's name (empty for a style).
    ADD COLUMN name text NOT NULL DEFAULT '',
    -- A character's subject words, a json array of strings (empty for a style).
    ADD COLUMN subject_words jsonb NOT NULL DEFAULT '[]'
        CONSTRAINT style_references_subject_words_check CHECK (jsonb_typeof(subject_words) = 'array');
ALTER TABLE style_references ADD CONSTRAINT style_references_image_check CHECK (
    (image_sha256 IS NULL AND image_key IS NULL AND width IS NULL AND height IS NULL AND size_bytes IS NULL)
    OR (image_sha256 IS NOT NULL AND image_key IS NOT NULL AND width IS NOT NULL AND height IS NOT NULL
        AND size_bytes IS NOT NULL));

-- Anchor tasks render a character's anchors.
ALTER TABLE tasks DROP CONSTRAINT tasks_kind_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_kind_check CHECK (kind IN ('invert', 'anchor', 'render'));

-- The unmet prerequisites of waiting tasks: a task is `waiting` while it has rows here; the row
-- goes when its cache entry becomes ready (the last one queues the task).
CREATE TABLE task_waits (
    task_id    uuid NOT NULL REFERENCES tasks (id),
    cache_key  text NOT NULL,
    PRIMARY KEY (task_id, cache_key)
);
CREATE INDEX task_waits_by_key ON task_waits (cache_key);

-- Each job's prerequisites in planning order (the style first, then characters' anchors).
CREATE TABLE job_prerequisites (
    job_id     uuid NOT NULL REFERENCES jobs (id),
    position   integer NOT NULL,
    cache_key  text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('style', 'anchors')),
    -- The character's name (anchors); empty for the style.
    name       text NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, cache_key)
);

-- Existing rows: a waiting render waited for its job's inversion; every job had at most one.
INSERT INTO task_waits (task_id, cache_key)
    SELECT id, inversion_key FROM tasks
    WHERE kind = 'render' AND state = 'waiting' AND inversion_key IS NOT NULL;
INSERT INTO job_prerequisites (job_id, position, cache_key, kind, name)
    SELECT DISTINCT job_id, 0, inversion_key, 'style', '' FROM tasks WHERE inversion_key IS NOT NULL;
UPDATE tasks SET inversion_key = NULL WHERE kind = 'render';

-- The task that produces a key (cancel and requeue look it up); renders have none.
DROP INDEX tasks_waiting_on_inversion;
CREATE INDEX tasks_by_produced_key ON tasks (inversion_key) WHERE inversion_key IS NOT NULL;
