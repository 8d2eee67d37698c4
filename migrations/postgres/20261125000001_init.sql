-- storyfarm metadata: projects, style references, storyboards, jobs, frames, tasks, the inversion
-- cache, the transactional outbox and the idempotency record of task events.

CREATE TABLE projects (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE style_references (
    id            uuid PRIMARY KEY,
    project_id    uuid NOT NULL REFERENCES projects (id),
    kind          text NOT NULL CHECK (kind IN ('style')),
    prompt        text NOT NULL,
    image_sha256  text NOT NULL,
    image_key     text NOT NULL,
    width         integer NOT NULL,
    height        integer NOT NULL,
    size_bytes    bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE storyboards (
    id          uuid PRIMARY KEY,
    project_id  uuid NOT NULL REFERENCES projects (id),
    name        text NOT NULL,
    -- The validated storyboard (storyfarm-core StoryboardSpec) plus the reference id.
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per distinct inversion (content key of everything that determines the trajectory).
CREATE TABLE inversions (
    cache_key       text PRIMARY KEY,
    state           text NOT NULL CHECK (state IN ('pending', 'ready', 'failed')),
    trajectory_key  text,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    id             uuid PRIMARY KEY,
    storyboard_id  uuid NOT NULL REFERENCES storyboards (id),
    state          text NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    frames_total   integer NOT NULL,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);

CREATE TABLE tasks (
    id             uuid PRIMARY KEY,
    job_id         uuid NOT NULL REFERENCES jobs (id),
    kind           text NOT NULL CHECK (kind IN ('invert', 'render')),
    state          text NOT NULL CHECK (state IN ('waiting', 'queued', 'running', 'retry_wait', 'succeeded', 'failed', 'cancelled')),
    family         text NOT NULL,
    attempt        integer NOT NULL DEFAULT 1,
    max_attempts   integer NOT NULL,
    -- invert: the inversion it produces; render: the inversion it replays.
    inversion_key  text,
    -- Encoded storyfarm.v1.Task without the attempt (set when dispatched).
    payload        bytea NOT NULL,
    not_before     timestamptz,
    worker_id      text,
    heartbeat_at   timestamptz,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tasks_by_job ON tasks (job_id);
CREATE INDEX tasks_waiting_on_inversion ON tasks (inversion_key) WHERE state = 'waiting';
CREATE INDEX tasks_due_retries ON tasks (not_before) WHERE state = 'retry_wait';

CREATE TABLE frames (
    job_id           uuid NOT NULL REFERENCES jobs (id),
    frame_index      integer NOT NULL,
    prompt           text NOT NULL,
    negative_prompt  text NOT NULL,
    seed             bigint NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'rendering', 'succeeded', 'failed', 'cancelled')),
    task_id          uuid REFERENCES tasks (id),
    png_key          text,
    latents_key      text,
    error            text,
    attempts         integer NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, frame_index)
);
CREATE INDEX frames_by_task ON frames (task_id);

-- Transactional outbox: written with the state change, published with confirms, then marked.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    task_id       uuid NOT NULL REFERENCES tasks (id),
    attempt       integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Every ingested event, so a redelivered event changes nothing. Sequence numbers are per worker:
-- two workers running the same redelivered attempt never shadow each other's events.
CREATE TABLE task_events (
    task_id      uuid NOT NULL,
    attempt      integer NOT NULL,
    worker_id    text NOT NULL,
    seq          bigint NOT NULL,
    kind         text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt, worker_id, seq)
);
