-- The coordinator's metrics count live tasks by kind and state on every scrape; without this the
-- count reads every task ever run.
CREATE INDEX tasks_live ON tasks (kind, state) WHERE state IN ('waiting', 'queued', 'running', 'retry_wait');
