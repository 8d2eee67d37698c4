//! storyfarm's metadata store: the truth about projects, references, storyboards, jobs, frames
//! and tasks. Postgres in the farm, SQLite in the local mode: two backends of one trait,
//! [`MetadataStore`], with the same semantics, held to them by one conformance suite
//! ([`conformance`], feature `testing`) that runs on both. Every state change of the farm is one
//! transaction here; messages to workers are written to an outbox in the same transaction and
//! published afterwards.
//!
//! Architecture invariant: only this crate touches sqlx.

#[cfg(feature = "testing")]
pub mod conformance;
mod error;
mod postgres;
mod sqlite;
mod types;

pub use error::{Result, StoreError};
pub use postgres::{PgStore, MIGRATOR};
pub use sqlite::{SqliteStore, SQLITE_MIGRATOR};
pub use types::*;

use storyfarm_core::{JobId, ProjectId, ReferenceId, StoryboardId};

/// The metadata store: [`PgStore`] in the farm, [`SqliteStore`] in the local mode.
#[async_trait::async_trait]
pub trait MetadataStore: Send + Sync {
    async fn create_project(&self, name: &str) -> Result<Project>;
    async fn get_project(&self, id: ProjectId) -> Result<Project>;
    async fn list_projects(&self) -> Result<Vec<Project>>;

    async fn create_reference(&self, reference: &Reference) -> Result<Reference>;
    async fn get_reference(&self, id: ReferenceId) -> Result<Reference>;

    async fn create_storyboard(
        &self,
        project_id: ProjectId,
        name: &str,
        stored: &StoredStoryboard,
    ) -> Result<Storyboard>;
    async fn get_storyboard(&self, id: StoryboardId) -> Result<Storyboard>;

    /// Writes the job, its frames and tasks, claims or reuses each prerequisite (a cache entry
    /// that is ready makes no task, one another job is computing is waited for, a failed one is
    /// tried again), and queues what can run now (outbox rows), in one transaction.
    async fn submit_job(&self, job: &NewJob) -> Result<Job>;
    async fn get_job(&self, id: JobId) -> Result<Job>;
    async fn list_frames(&self, job_id: JobId) -> Result<Vec<Frame>>;
    /// One frame of a job (`NotFound` names the job, or the frame when the job has no such index).
    async fn get_frame(&self, job_id: JobId, index: u32) -> Result<Frame>;
    /// Cancels what has not run; returns the job and whether tasks were running (workers must
    /// be told to stop).
    async fn cancel_job(&self, id: JobId) -> Result<(Job, bool)>;
    /// Jobs that are not finished (for watchers after a restart).
    async fn unfinished_jobs(&self) -> Result<Vec<JobId>>;
    /// Live counts for the coordinator's metrics (read on every scrape, so bounded in cost:
    /// frames and tasks of unfinished work only).
    async fn farm_counts(&self) -> Result<FarmCounts>;

    /// Outbox rows not yet confirmed by the broker, oldest first.
    async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxMessage>>;
    async fn mark_published(&self, ids: &[i64]) -> Result<()>;
    /// Failed attempts whose backoff has passed become new attempts (with outbox rows).
    async fn release_due_retries(&self) -> Result<u32>;
    /// For a queue that does not survive a restart (the local mode's in-process queue): every
    /// delivery it held is gone, so every task in `queued` or `running` whose job is not finished
    /// (and a prerequisite task of a cancelled job that other jobs' tasks wait for) goes back to
    /// `queued`, worker and heartbeat cleared, its rendering frames back to `pending`, with an
    /// outbox row for its *current* attempt: an interruption is not the task's fault, so no
    /// attempt is consumed (the frames' `attempts` are given back too). A task that already has
    /// an unpublished outbox row for its current attempt will be delivered anyway and is left
    /// alone. Returns how many tasks were requeued. Call it at start, before the dispatcher.
    ///
    /// `job` limits it to one job's tasks and the prerequisite tasks its tasks wait for (the local
    /// mode resumes one storyboard; other interrupted ones stay paused until they are resumed).
    async fn requeue_lost_deliveries(&self, job: Option<JobId>) -> Result<u32>;

    /// Applies one worker event, once: a redelivered event is a no-op.
    async fn record_event(
        &self,
        event: &TaskEventRecord,
        retry: &RetryPolicy,
    ) -> Result<EventOutcome>;
    /// Whether an inversion is ready, and its trajectory.
    async fn inversion_trajectory(&self, cache_key: &str) -> Result<Option<String>>;
    /// The job's prerequisites (style, then characters' anchors, in planning order) and where each
    /// stands.
    async fn job_prerequisites(&self, job_id: JobId) -> Result<Vec<JobPrerequisite>>;
}
