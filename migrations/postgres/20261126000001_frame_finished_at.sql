-- When a frame reached succeeded, failed or cancelled: a resumed local run proves with it that
-- finished frames were not rendered again.
ALTER TABLE frames ADD COLUMN finished_at timestamptz;
