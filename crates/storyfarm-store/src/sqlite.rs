//! The SQLite metadata store (sqlx) of the local mode: one file, the same semantics as
//! [`PgStore`](crate::PgStore); migrations in `migrations/sqlite/`.
//!
//! SQLite allows one writer at a time. Every write takes this store's writer turn (a fair async
//! mutex, so concurrent callers queue instead of polling the busy handler) and then starts its
//! transaction with `BEGIN IMMEDIATE`: the write lock is taken up front, so a transaction never has
//! to upgrade a read snapshot to a write lock, which is the one case where SQLite answers busy at
//! once instead of waiting. Another process on the same file (a second store, the `sqlite3` shell)
//! is waited for through the busy timeout. Reads run on the other pooled connections: in WAL mode
//! they neither wait for nor block the writer.
//!
//! Encodings (see the migration): uuids as canonical hyphenated TEXT, timestamps as INTEGER
//! microseconds since the Unix epoch, one `now` per transaction like Postgres' `now()`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};
use storyfarm_core::{JobId, ProjectId, ReferenceId, StoryboardId, TaskId};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::error::{Result, StoreError};
use crate::postgres::{
    check_plan, kept_on_cancel, prerequisite_failed, NewTask, COUNT_JOBS, COUNT_LIVE_TASKS,
    COUNT_OPEN_FRAMES,
};
use crate::types::*;
use crate::MetadataStore;

/// The SQLite migrations (`migrations/sqlite/`), embedded at compile time.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// How long a statement waits for another process's write lock before failing as unavailable.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Readers in parallel with the one writer.
const MAX_CONNECTIONS: u32 = 4;
/// Rows per multi-row INSERT: far below SQLite's 32766 bound parameters.
const ROWS_PER_INSERT: usize = 500;

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The writer turn: held for the whole of every write transaction.
    writer: Arc<Mutex<()>>,
}

impl SqliteStore {
    /// Opens the database file, creating it (and its directory) if missing, in WAL mode with
    /// foreign keys enforced, and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let open_error = |message: String| StoreError::Open {
            path: path.to_path_buf(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent).await.map_err(|e| {
                open_error(format!("cannot create directory {}: {e}", parent.display()))
            })?;
        }
        // Several processes may open a brand-new file at once (two boards started together):
        // switching the new file to WAL needs it alone (SQLite answers busy at once, without
        // the busy handler), and each would find the migrations unapplied, all but the first
        // failing on one the first had just applied. An OS lock on a file beside the database
        // takes the opens in turn, up to the migrations; the later ones find nothing to do.
        // (The lock file stays: removing it would let a third process lock a new file while
        // the second still holds the old one.)
        let lock_path = path.with_file_name(format!(
            "{}-open.lock",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let lock = tokio::task::spawn_blocking({
            let lock_path = lock_path.clone();
            move || -> std::io::Result<std::fs::File> {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)?;
                file.lock()?;
                Ok(file)
            }
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|locked| locked)
        .map_err(|e| open_error(format!("locking {}: {e}", lock_path.display())))?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| open_error(e.to_string()))?;
        let migrated = SQLITE_MIGRATOR.run(&pool).await;
        drop(lock);
        migrated.map_err(|e| open_error(format!("migration failed: {e}")))?;
        Ok(Self {
            pool,
            writer: Arc::new(Mutex::new(())),
        })
    }

    /// Starts a write transaction; the caller holds the writer turn.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

fn corrupt(what: &'static str, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what,
        message: message.into(),
    }
}

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

fn time(what: &'static str, micros: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| corrupt(what, format!("timestamp {micros} out of range")))
}

fn time_at(row: &SqliteRow, what: &'static str, column: &str) -> Result<DateTime<Utc>> {
    time(what, row.try_get(column)?)
}

fn opt_time_at(row: &SqliteRow, what: &'static str, column: &str) -> Result<Option<DateTime<Utc>>> {
    row.try_get::<Option<i64>, _>(column)?
        .map(|m| time(what, m))
        .transpose()
}

fn parse_uuid(what: &'static str, text: &str) -> Result<Uuid> {
    Uuid::parse_str(text).map_err(|e| corrupt(what, format!("id {text:?}: {e}")))
}

fn uuid_at(row: &SqliteRow, what: &'static str, column: &str) -> Result<Uuid> {
    parse_uuid(what, &row.try_get::<String, _>(column)?)
}

fn opt_uuid_at(row: &SqliteRow, what: &'static str, column: &str) -> Result<Option<Uuid>> {
    row.try_get::<Option<String>, _>(column)?
        .map(|s| parse_uuid(what, &s))
        .transpose()
}

fn text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// A list of ids as one bound JSON array, read with `json_each` (SQLite has no array type).
fn json_ids(ids: &[Uuid]) -> String {
    serde_json::Value::from(ids.iter().map(|id| text(*id)).collect::<Vec<_>>()).to_string()
}

/// A list of strings as one bound JSON array, read with `json_each`.
fn json_strings<S: AsRef<str>>(items: &[S]) -> String {
    serde_json::Value::from(items.iter().map(|s| s.as_ref()).collect::<Vec<_>>()).to_string()
}

fn project_from(row: &SqliteRow) -> Result<Project> {
    Ok(Project {
        id: ProjectId(uuid_at(row, "project", "id")?),
        name: row.try_get("name")?,
        created_at: time_at(row, "project", "created_at")?,
    })
}

fn reference_from(row: &SqliteRow) -> Result<Reference> {
    let kind: String = row.try_get("kind")?;
    let words: String = row.try_get("subject_words")?;
    let sha256: Option<String> = row.try_get("image_sha256")?;
    let image = match sha256 {
        None => None,
        Some(sha256) => Some(ReferenceImage {
            sha256,
            key: row.try_get("image_key")?,
            width: row.try_get::<i64, _>("width")? as u32,
            height: row.try_get::<i64, _>("height")? as u32,
            size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
        }),
    };
    Ok(Reference {
        id: ReferenceId(uuid_at(row, "reference", "id")?),
        project_id: ProjectId(uuid_at(row, "reference", "project_id")?),
        kind: ReferenceKind::parse(&kind)
            .ok_or_else(|| corrupt("reference", format!("kind {kind:?}")))?,
        prompt: row.try_get("prompt")?,
        name: row.try_get("name")?,
        subject_words: serde_json::from_str(&words)
            .map_err(|e| corrupt("reference", format!("subject words: {e}")))?,
        image,
        created_at: time_at(row, "reference", "created_at")?,
    })
}

/// A row of job_prerequisites joined with its cache entry. An entry that is gone (its job was
/// cancelled before anyone computed it) reads as pending: not ready, not failed.
fn prerequisite_from(row: &SqliteRow) -> Result<JobPrerequisite> {
    let kind: String = row.try_get("kind")?;
    let state: Option<String> = row.try_get("state")?;
    let state = match state {
        None => CacheState::Pending,
        Some(s) => {
            CacheState::parse(&s).ok_or_else(|| corrupt("inversion", format!("state {s:?}")))?
        }
    };
    Ok(JobPrerequisite {
        kind: PrerequisiteKind::parse(&kind)
            .ok_or_else(|| corrupt("job prerequisite", format!("kind {kind:?}")))?,
        name: row.try_get("name")?,
        cache_key: row.try_get("cache_key")?,
        artifact_key: if state == CacheState::Ready {
            row.try_get("trajectory_key")?
        } else {
            None
        },
        error: row.try_get("error")?,
        state,
    })
}

fn frame_from(row: &SqliteRow) -> Result<Frame> {
    let state: String = row.try_get("state")?;
    Ok(Frame {
        job_id: JobId(uuid_at(row, "frame", "job_id")?),
        index: row.try_get::<i64, _>("frame_index")? as u32,
        prompt: row.try_get("prompt")?,
        negative_prompt: row.try_get("negative_prompt")?,
        seed: row.try_get::<i64, _>("seed")? as u64,
        state: FrameState::parse(&state)
            .ok_or_else(|| corrupt("frame", format!("state {state:?}")))?,
        task_id: opt_uuid_at(row, "frame", "task_id")?.map(TaskId),
        png_key: row.try_get("png_key")?,
        latents_key: row.try_get("latents_key")?,
        error: row.try_get("error")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        finished_at: opt_time_at(row, "frame", "finished_at")?,
    })
}

const JOB_SELECT: &str = "SELECT j.id, j.storyboard_id, j.state, j.frames_total, j.error, j.created_at, j.finished_at,
    (SELECT count(*) FROM frames f WHERE f.job_id = j.id AND f.state = 'succeeded') AS frames_succeeded,
    (SELECT count(*) FROM frames f WHERE f.job_id = j.id AND f.state = 'failed') AS frames_failed,
    (SELECT count(*) FROM tasks t WHERE t.job_id = j.id AND t.kind = 'invert') AS inversion_tasks,
    (SELECT count(*) FROM tasks t WHERE t.job_id = j.id AND t.kind = 'anchor') AS anchor_tasks,
    (SELECT count(*) FROM tasks t WHERE t.job_id = j.id AND t.kind = 'render') AS render_tasks
    FROM jobs j WHERE j.id = ?1";

fn job_from(row: &SqliteRow) -> Result<Job> {
    let state: String = row.try_get("state")?;
    Ok(Job {
        id: JobId(uuid_at(row, "job", "id")?),
        storyboard_id: StoryboardId(uuid_at(row, "job", "storyboard_id")?),
        state: JobState::parse(&state).ok_or_else(|| corrupt("job", format!("state {state:?}")))?,
        frames_total: row.try_get::<i64, _>("frames_total")? as u32,
        frames_succeeded: row.try_get::<i64, _>("frames_succeeded")? as u32,
        frames_failed: row.try_get::<i64, _>("frames_failed")? as u32,
        inversion_tasks: row.try_get::<i64, _>("inversion_tasks")? as u32,
        anchor_tasks: row.try_get::<i64, _>("anchor_tasks")? as u32,
        render_tasks: row.try_get::<i64, _>("render_tasks")? as u32,
        error: row.try_get("error")?,
        created_at: time_at(row, "job", "created_at")?,
        finished_at: opt_time_at(row, "job", "finished_at")?,
    })
}

async fn job_in(conn: &mut SqliteConnection, id: JobId) -> Result<Job> {
    let row = sqlx::query(JOB_SELECT)
        .bind(text(id.0))
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::not_found("job", id))?;
    job_from(&row)
}

/// Inserts tasks in multi-row statements (a 10k-frame job is one transaction of a few dozen
/// statements, not 10k round trips to the connection's thread).
async fn insert_tasks(
    conn: &mut SqliteConnection,
    job_id: JobId,
    tasks: &[NewTask<'_>],
    now: i64,
) -> Result<()> {
    for chunk in tasks.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO tasks (id, job_id, kind, state, family, attempt, max_attempts, inversion_key, payload, created_at, updated_at) ",
        );
        insert.push_values(chunk, |mut row, t| {
            row.push_bind(text(t.task.id.0))
                .push_bind(text(job_id.0))
                .push_bind(t.task.kind.as_str())
                .push_bind(t.state)
                .push_bind(t.task.family.as_str())
                .push_bind(1i64)
                .push_bind(i64::from(t.task.max_attempts))
                .push_bind(t.produces)
                .push_bind(t.task.payload.as_slice())
                .push_bind(now)
                .push_bind(now);
        });
        insert.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Inserts the job's frames, each pointing at the render task that renders it (tasks are written
/// first, so the foreign key holds without a second pass over the frames).
async fn insert_frames(conn: &mut SqliteConnection, job: &NewJob) -> Result<()> {
    let task_of: std::collections::HashMap<u32, Uuid> = job
        .render_tasks
        .iter()
        .flat_map(|t| t.frames.iter().map(move |&f| (f, t.id.0)))
        .collect();
    for chunk in job.frames.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO frames (job_id, frame_index, prompt, negative_prompt, seed, state, task_id) ",
        );
        insert.push_values(chunk, |mut row, frame| {
            row.push_bind(text(job.id.0))
                .push_bind(i64::from(frame.index))
                .push_bind(frame.prompt.as_str())
                .push_bind(frame.negative_prompt.as_str())
                .push_bind(frame.seed as i64)
                .push_bind("pending")
                .push_bind(task_of.get(&frame.index).map(|id| text(*id)));
        });
        insert.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Outbox rows for `(task, attempt)` pairs, in order.
async fn enqueue(conn: &mut SqliteConnection, messages: &[(Uuid, i64)], now: i64) -> Result<()> {
    for chunk in messages.chunks(ROWS_PER_INSERT) {
        let mut insert =
            QueryBuilder::<Sqlite>::new("INSERT INTO outbox (task_id, attempt, created_at) ");
        insert.push_values(chunk, |mut row, (task, attempt)| {
            row.push_bind(text(*task))
                .push_bind(*attempt)
                .push_bind(now);
        });
        insert.build().execute(&mut *conn).await?;
    }
    Ok(())
}

fn task_attempts(rows: &[SqliteRow]) -> Result<Vec<(Uuid, i64)>> {
    rows.iter()
        .map(|r| Ok((uuid_at(r, "task", "id")?, r.try_get::<i64, _>("attempt")?)))
        .collect()
}

/// Marks the job finished when none of its frames can change any more.
async fn settle_job(conn: &mut SqliteConnection, job_id: JobId, now: i64) -> Result<()> {
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE state IN ('pending', 'rendering')) AS open,
                count(*) FILTER (WHERE state = 'failed') AS failed,
                min(error) FILTER (WHERE state = 'failed') AS first_error
         FROM frames WHERE job_id = ?1",
    )
    .bind(text(job_id.0))
    .fetch_one(&mut *conn)
    .await?;
    let open: i64 = row.try_get("open")?;
    if open > 0 {
        return Ok(());
    }
    let failed: i64 = row.try_get("failed")?;
    let error: Option<String> = row.try_get("first_error")?;
    let state = if failed > 0 { "failed" } else { "succeeded" };
    sqlx::query(
        "UPDATE jobs SET state = ?2, finished_at = ?4, error = ?3
         WHERE id = ?1 AND state IN ('queued', 'running')",
    )
    .bind(text(job_id.0))
    .bind(state)
    .bind(if failed > 0 {
        error.map(|e| format!("{failed} frame(s) failed; first: {e}"))
    } else {
        None
    })
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Fails every frame of `task_ids` that is not finished, with `reason`.
async fn fail_frames(
    conn: &mut SqliteConnection,
    task_ids: &[Uuid],
    reason: &str,
    now: i64,
) -> Result<Vec<JobId>> {
    let rows = sqlx::query(
        "UPDATE frames SET state = 'failed', error = ?2, finished_at = ?3
         WHERE task_id IN (SELECT value FROM json_each(?1)) AND state IN ('pending', 'rendering')
         RETURNING job_id",
    )
    .bind(json_ids(task_ids))
    .bind(reason)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut jobs: Vec<JobId> = rows
        .iter()
        .map(|r| uuid_at(r, "frame", "job_id").map(JobId))
        .collect::<Result<_>>()?;
    jobs.sort();
    jobs.dedup();
    Ok(jobs)
}

/// Jobs with tasks waiting for the prerequisite `key`.
async fn waiting_jobs(conn: &mut SqliteConnection, key: &str) -> Result<Vec<JobId>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT t.job_id FROM task_waits w JOIN tasks t ON t.id = w.task_id
         WHERE w.cache_key = ?1 ORDER BY t.job_id",
    )
    .bind(key)
    .fetch_all(&mut *conn)
    .await?;
    ids.iter()
        .map(|id| parse_uuid("task", id).map(JobId))
        .collect()
}

/// The prerequisite `key` is ready: the tasks that waited only for it are queued (with outbox
/// rows). Returns the jobs that had tasks waiting for it.
async fn release_waiters(conn: &mut SqliteConnection, key: &str, now: i64) -> Result<Vec<JobId>> {
    let waiting = waiting_jobs(conn, key).await?;
    let met: Vec<String> =
        sqlx::query_scalar("DELETE FROM task_waits WHERE cache_key = ?1 RETURNING task_id")
            .bind(key)
            .fetch_all(&mut *conn)
            .await?;
    let released = sqlx::query(
        "UPDATE tasks SET state = 'queued', updated_at = ?2
         WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'waiting'
           AND NOT EXISTS (SELECT 1 FROM task_waits w WHERE w.task_id = tasks.id)
         RETURNING id, attempt",
    )
    .bind(json_strings(&met))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    enqueue(conn, &task_attempts(&released)?, now).await?;
    Ok(waiting)
}

/// The prerequisite `key` failed for good (its task, of kind `producer_kind`, with `error`): every
/// task waiting for it fails with a reason naming it, and its frames with it; a failed task that
/// was to produce a key of its own fails that key's entry and its waiters in turn. Returns the
/// jobs whose tasks failed.
async fn fail_waiters(
    conn: &mut SqliteConnection,
    key: &str,
    producer_kind: &str,
    error: &str,
    now: i64,
) -> Result<Vec<JobId>> {
    let mut affected = Vec::new();
    let mut failed_keys = vec![(
        key.to_string(),
        producer_kind.to_string(),
        error.to_string(),
    )];
    while let Some((key, producer_kind, error)) = failed_keys.pop() {
        affected.extend(waiting_jobs(conn, &key).await?);
        let rows = sqlx::query(
            "SELECT w.task_id, p.kind, p.name FROM task_waits w JOIN tasks t ON t.id = w.task_id
             LEFT JOIN job_prerequisites p ON p.job_id = t.job_id AND p.cache_key = w.cache_key
             WHERE w.cache_key = ?1",
        )
        .bind(&key)
        .fetch_all(&mut *conn)
        .await?;
        let mut by_reason: std::collections::BTreeMap<String, Vec<Uuid>> = Default::default();
        for row in &rows {
            let prerequisite: Option<String> = row.try_get("kind")?;
            let name: Option<String> = row.try_get("name")?;
            let reason = prerequisite_failed(
                prerequisite.as_deref(),
                name.as_deref(),
                &producer_kind,
                &error,
            );
            by_reason
                .entry(reason)
                .or_default()
                .push(uuid_at(row, "task", "task_id")?);
        }
        for (reason, ids) in by_reason {
            let failed = sqlx::query(
                "UPDATE tasks SET state = 'failed', error = ?2, updated_at = ?3
                 WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'waiting'
                 RETURNING kind, inversion_key",
            )
            .bind(json_ids(&ids))
            .bind(&reason)
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
            sqlx::query(
                "DELETE FROM task_waits WHERE task_id IN (SELECT value FROM json_each(?1))",
            )
            .bind(json_ids(&ids))
            .execute(&mut *conn)
            .await?;
            affected.extend(fail_frames(conn, &ids, &reason, now).await?);
            for row in &failed {
                let Some(produced) = row.try_get::<Option<String>, _>("inversion_key")? else {
                    continue;
                };
                let newly_failed = sqlx::query(
                    "UPDATE inversions SET state = 'failed', error = ?2, updated_at = ?3
                     WHERE cache_key = ?1 AND state = 'pending'",
                )
                .bind(&produced)
                .bind(&reason)
                .bind(now)
                .execute(&mut *conn)
                .await?
                .rows_affected()
                    == 1;
                if newly_failed {
                    failed_keys.push((produced, row.try_get("kind")?, reason.clone()));
                }
            }
        }
    }
    Ok(affected)
}

#[async_trait::async_trait]
impl MetadataStore for SqliteStore {
    async fn create_project(&self, name: &str) -> Result<Project> {
        let _turn = self.writer.lock().await;
        let row = sqlx::query("INSERT INTO projects (id, name, created_at) VALUES (?1, ?2, ?3) RETURNING id, name, created_at")
            .bind(text(ProjectId::new().0))
            .bind(name)
            .bind(now_micros())
            .fetch_one(&self.pool)
            .await?;
        project_from(&row)
    }

    async fn get_project(&self, id: ProjectId) -> Result<Project> {
        let row = sqlx::query("SELECT id, name, created_at FROM projects WHERE id = ?1")
            .bind(text(id.0))
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("project", id))?;
        project_from(&row)
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM projects ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(project_from).collect()
    }

    async fn create_reference(&self, r: &Reference) -> Result<Reference> {
        let words = serde_json::to_string(&r.subject_words)
            .map_err(|e| corrupt("reference", e.to_string()))?;
        let image = r.image.as_ref();
        let _turn = self.writer.lock().await;
        let row = sqlx::query(
            "INSERT INTO style_references (id, project_id, kind, prompt, name, subject_words, image_sha256, image_key, width, height, size_bytes, created_at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12 WHERE EXISTS (SELECT 1 FROM projects WHERE id = ?2)
             RETURNING *",
        )
        .bind(text(r.id.0))
        .bind(text(r.project_id.0))
        .bind(r.kind.as_str())
        .bind(&r.prompt)
        .bind(&r.name)
        .bind(words)
        .bind(image.map(|i| i.sha256.as_str()))
        .bind(image.map(|i| i.key.as_str()))
        .bind(image.map(|i| i64::from(i.width)))
        .bind(image.map(|i| i64::from(i.height)))
        .bind(image.map(|i| i.size_bytes as i64))
        .bind(now_micros())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found("project", r.project_id))?;
        reference_from(&row)
    }

    async fn get_reference(&self, id: ReferenceId) -> Result<Reference> {
        let row = sqlx::query("SELECT * FROM style_references WHERE id = ?1")
            .bind(text(id.0))
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("reference", id))?;
        reference_from(&row)
    }

    async fn create_storyboard(
        &self,
        project_id: ProjectId,
        name: &str,
        stored: &StoredStoryboard,
    ) -> Result<Storyboard> {
        let spec =
            serde_json::to_string(stored).map_err(|e| corrupt("storyboard", e.to_string()))?;
        let id = StoryboardId::new();
        let now = now_micros();
        let _turn = self.writer.lock().await;
        let inserted = sqlx::query(
            "INSERT INTO storyboards (id, project_id, name, spec, created_at)
             SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM projects WHERE id = ?2)",
        )
        .bind(text(id.0))
        .bind(text(project_id.0))
        .bind(name)
        .bind(spec)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(StoreError::not_found("project", project_id));
        }
        Ok(Storyboard {
            id,
            project_id,
            name: name.to_string(),
            stored: stored.clone(),
            created_at: time("storyboard", now)?,
        })
    }

    async fn get_storyboard(&self, id: StoryboardId) -> Result<Storyboard> {
        let row = sqlx::query(
            "SELECT id, project_id, name, spec, created_at FROM storyboards WHERE id = ?1",
        )
        .bind(text(id.0))
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found("storyboard", id))?;
        let spec: String = row.try_get("spec")?;
        Ok(Storyboard {
            id,
            project_id: ProjectId(uuid_at(&row, "storyboard", "project_id")?),
            name: row.try_get("name")?,
            stored: serde_json::from_str(&spec)
                .map_err(|e| corrupt("storyboard", e.to_string()))?,
            created_at: time_at(&row, "storyboard", "created_at")?,
        })
    }

    async fn submit_job(&self, job: &NewJob) -> Result<Job> {
        check_plan(job)?;
        let _turn = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let now = now_micros();
        sqlx::query("INSERT INTO jobs (id, storyboard_id, state, frames_total, created_at) VALUES (?1, ?2, 'queued', ?3, ?4)")
            .bind(text(job.id.0))
            .bind(text(job.storyboard_id.0))
            .bind(job.frames.len() as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;

        // Claim every prerequisite's cache entry: absent, it is ours to compute; pending,
        // another job computes it; ready, there is nothing to do; failed, it is tried again.
        let mut keys: Vec<&str> = job
            .prerequisites
            .iter()
            .map(|p| p.cache_key.as_str())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let claimed: Vec<String> = sqlx::query_scalar(
            "INSERT INTO inversions (cache_key, state, created_at, updated_at)
             SELECT value, 'pending', ?2, ?2 FROM json_each(?1) WHERE true
             ON CONFLICT (cache_key) DO NOTHING RETURNING cache_key",
        )
        .bind(json_strings(&keys))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let entries = sqlx::query(
            "SELECT cache_key, state FROM inversions WHERE cache_key IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_strings(&keys))
        .fetch_all(&mut *tx)
        .await?;
        let mut ready: HashSet<String> = HashSet::new();
        let mut mine: HashSet<String> = claimed.into_iter().collect();
        for row in &entries {
            let key: String = row.try_get("cache_key")?;
            let state: String = row.try_get("state")?;
            match state.as_str() {
                "ready" => {
                    ready.insert(key);
                }
                "pending" => {}
                "failed" => {
                    mine.insert(key);
                }
                other => return Err(corrupt("inversion", format!("state {other:?}"))),
            }
        }
        let retried: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| mine.contains(*k) && !ready.contains(*k))
            .collect();
        sqlx::query(
            "UPDATE inversions SET state = 'pending', error = NULL, updated_at = ?2
             WHERE cache_key IN (SELECT value FROM json_each(?1)) AND state = 'failed'",
        )
        .bind(json_strings(&retried))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let prerequisites: Vec<(usize, &PlannedPrerequisite)> =
            job.prerequisites.iter().enumerate().collect();
        for chunk in prerequisites.chunks(ROWS_PER_INSERT) {
            let mut insert = QueryBuilder::<Sqlite>::new(
                "INSERT INTO job_prerequisites (job_id, position, cache_key, kind, name) ",
            );
            insert.push_values(chunk, |mut row, (position, p)| {
                row.push_bind(text(job.id.0))
                    .push_bind(*position as i64)
                    .push_bind(p.cache_key.as_str())
                    .push_bind(p.kind.as_str())
                    .push_bind(p.name.as_str());
            });
            insert.push(" ON CONFLICT (job_id, cache_key) DO NOTHING");
            insert.build().execute(&mut *tx).await?;
        }

        // The prerequisite tasks this job runs (one per key it claimed), then its renders; each
        // waits for those of its needs that are not ready.
        let mut planned: Vec<(&PlannedTask, Option<&str>)> = Vec::new();
        for p in &job.prerequisites {
            if mine.remove(&p.cache_key) {
                planned.push((&p.task, Some(&p.cache_key)));
            }
        }
        planned.extend(job.render_tasks.iter().map(|t| (t, None)));
        let mut tasks = Vec::with_capacity(planned.len());
        let mut waits: Vec<(Uuid, &str)> = Vec::new();
        let mut runnable: Vec<(Uuid, i64)> = Vec::new();
        for (task, produces) in planned {
            let before = waits.len();
            for need in &task.needs {
                if !ready.contains(need) && !waits[before..].iter().any(|(_, k)| k == need) {
                    waits.push((task.id.0, need));
                }
            }
            let state = if waits.len() > before {
                "waiting"
            } else {
                runnable.push((task.id.0, 1));
                "queued"
            };
            tasks.push(NewTask {
                task,
                state,
                produces,
            });
        }
        insert_tasks(&mut tx, job.id, &tasks, now).await?;
        for chunk in waits.chunks(ROWS_PER_INSERT) {
            let mut insert =
                QueryBuilder::<Sqlite>::new("INSERT INTO task_waits (task_id, cache_key) ");
            insert.push_values(chunk, |mut row, (task, key)| {
                row.push_bind(text(*task)).push_bind(*key);
            });
            insert.build().execute(&mut *tx).await?;
        }
        insert_frames(&mut tx, job).await?;
        enqueue(&mut tx, &runnable, now).await?;
        let stored = job_in(&mut tx, job.id).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn get_job(&self, id: JobId) -> Result<Job> {
        let row = sqlx::query(JOB_SELECT)
            .bind(text(id.0))
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("job", id))?;
        job_from(&row)
    }

    async fn list_frames(&self, job_id: JobId) -> Result<Vec<Frame>> {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = ?1)")
            .bind(text(job_id.0))
            .fetch_one(&self.pool)
            .await?;
        if !exists {
            return Err(StoreError::not_found("job", job_id));
        }
        let rows = sqlx::query("SELECT * FROM frames WHERE job_id = ?1 ORDER BY frame_index")
            .bind(text(job_id.0))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(frame_from).collect()
    }

    async fn get_frame(&self, job_id: JobId, index: u32) -> Result<Frame> {
        let row = sqlx::query("SELECT * FROM frames WHERE job_id = ?1 AND frame_index = ?2")
            .bind(text(job_id.0))
            .bind(index as i32)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => frame_from(&row),
            None => {
                self.get_job(job_id).await?;
                Err(StoreError::not_found(
                    "frame",
                    format!("{index} of job {job_id}"),
                ))
            }
        }
    }

    async fn cancel_job(&self, id: JobId) -> Result<(Job, bool)> {
        let _turn = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let now = now_micros();
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?1")
            .bind(text(id.0))
            .fetch_optional(&mut *tx)
            .await?;
        let state = state.ok_or_else(|| StoreError::not_found("job", id))?;
        if JobState::parse(&state).is_some_and(JobState::is_terminal) {
            let job = job_in(&mut tx, id).await?;
            tx.commit().await?;
            return Ok((job, false));
        }
        // A prerequisite task other jobs wait for keeps running (and what it waits for of this
        // job); everything else of this job stops.
        let prerequisites = sqlx::query(
            "SELECT id, inversion_key FROM tasks
             WHERE job_id = ?1 AND state IN ('waiting', 'queued', 'retry_wait', 'running')
               AND inversion_key IS NOT NULL",
        )
        .bind(text(id.0))
        .fetch_all(&mut *tx)
        .await?;
        let prerequisites: Vec<(Uuid, String)> = prerequisites
            .iter()
            .map(|r| Ok((uuid_at(r, "task", "id")?, r.try_get("inversion_key")?)))
            .collect::<Result<_>>()?;
        let keys: Vec<&str> = prerequisites.iter().map(|(_, k)| k.as_str()).collect();
        let waited_elsewhere: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT w.cache_key FROM task_waits w
             JOIN tasks o ON o.id = w.task_id JOIN jobs oj ON oj.id = o.job_id
             WHERE w.cache_key IN (SELECT value FROM json_each(?2)) AND o.job_id <> ?1
               AND oj.state <> 'cancelled'",
        )
        .bind(text(id.0))
        .bind(json_strings(&keys))
        .fetch_all(&mut *tx)
        .await?;
        let waits = sqlx::query(
            "SELECT w.task_id, w.cache_key FROM task_waits w JOIN tasks t ON t.id = w.task_id
             WHERE t.job_id = ?1",
        )
        .bind(text(id.0))
        .fetch_all(&mut *tx)
        .await?;
        let waits: Vec<(Uuid, String)> = waits
            .iter()
            .map(|r| Ok((uuid_at(r, "task", "task_id")?, r.try_get("cache_key")?)))
            .collect::<Result<_>>()?;
        let kept = kept_on_cancel(&prerequisites, &waits, &waited_elsewhere);
        let cancelled = sqlx::query(
            "UPDATE tasks SET state = 'cancelled', updated_at = ?3
             WHERE job_id = ?1 AND state IN ('waiting', 'queued', 'retry_wait', 'running')
               AND id NOT IN (SELECT value FROM json_each(?2))
             RETURNING id, inversion_key",
        )
        .bind(text(id.0))
        .bind(json_ids(&kept))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM task_events e JOIN tasks t ON t.id = e.task_id
             WHERE t.job_id = ?1 AND t.state = 'cancelled' AND e.kind = 'started'
               AND e.attempt = t.attempt
               AND NOT EXISTS (SELECT 1 FROM task_events d WHERE d.task_id = e.task_id
                               AND d.attempt = e.attempt AND d.kind IN ('succeeded', 'failed'))",
        )
        .bind(text(id.0))
        .fetch_one(&mut *tx)
        .await?;
        // Nobody computes them now: the next job that needs them claims them again.
        let abandoned: Vec<String> = cancelled
            .iter()
            .map(|r| r.try_get::<Option<String>, _>("inversion_key"))
            .filter_map(|k| k.transpose())
            .collect::<Result<_, _>>()?;
        sqlx::query(
            "DELETE FROM inversions WHERE cache_key IN (SELECT value FROM json_each(?1)) AND state = 'pending'",
        )
        .bind(json_strings(&abandoned))
        .execute(&mut *tx)
        .await?;
        let ids: Vec<Uuid> = cancelled
            .iter()
            .map(|r| uuid_at(r, "task", "id"))
            .collect::<Result<_>>()?;
        sqlx::query("DELETE FROM task_waits WHERE task_id IN (SELECT value FROM json_each(?1))")
            .bind(json_ids(&ids))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM outbox WHERE task_id IN (SELECT value FROM json_each(?1)) AND published_at IS NULL")
            .bind(json_ids(&ids))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE frames SET state = 'cancelled', finished_at = ?2 WHERE job_id = ?1 AND state IN ('pending', 'rendering')",
        )
        .bind(text(id.0))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = ?2 WHERE id = ?1")
            .bind(text(id.0))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let job = job_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok((job, running > 0))
    }

    async fn unfinished_jobs(&self) -> Result<Vec<JobId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        ids.iter()
            .map(|id| parse_uuid("job", id).map(JobId))
            .collect()
    }

    async fn farm_counts(&self) -> Result<FarmCounts> {
        // A read transaction: one snapshot for all the figures.
        let mut tx = self.pool.begin().await?;
        let jobs: Vec<(String, i64)> = sqlx::query_as(COUNT_JOBS).fetch_all(&mut *tx).await?;
        let frames: Vec<(String, i64)> = sqlx::query_as(COUNT_OPEN_FRAMES)
            .fetch_all(&mut *tx)
            .await?;
        let tasks: Vec<(String, String, i64)> =
            sqlx::query_as(COUNT_LIVE_TASKS).fetch_all(&mut *tx).await?;
        let (busy, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(DISTINCT worker_id), min(coalesce(heartbeat_at, updated_at))
             FROM tasks WHERE state = 'running'",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let age = oldest.map(|micros| {
            std::time::Duration::from_micros(now_micros().saturating_sub(micros).max(0) as u64)
        });
        Ok(FarmCounts::from_rows(&jobs, &frames, &tasks, busy, age))
    }

    async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxMessage>> {
        let rows = sqlx::query(
            "SELECT o.id, o.task_id, o.attempt, t.family, t.payload FROM outbox o JOIN tasks t ON t.id = o.task_id
             WHERE o.published_at IS NULL ORDER BY o.id LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxMessage {
                    id: r.try_get("id")?,
                    task_id: TaskId(uuid_at(r, "outbox", "task_id")?),
                    attempt: r.try_get::<i64, _>("attempt")? as u32,
                    family: r.try_get("family")?,
                    payload: r.try_get("payload")?,
                })
            })
            .collect()
    }

    async fn mark_published(&self, ids: &[i64]) -> Result<()> {
        let _turn = self.writer.lock().await;
        sqlx::query(
            "UPDATE outbox SET published_at = ?2 WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::Value::from(ids).to_string())
        .bind(now_micros())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release_due_retries(&self) -> Result<u32> {
        let _turn = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let now = now_micros();
        let rows = sqlx::query(
            "UPDATE tasks SET state = 'queued', attempt = attempt + 1, not_before = NULL, updated_at = ?1
             WHERE state = 'retry_wait' AND not_before <= ?1 RETURNING id, attempt",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let messages = task_attempts(&rows)?;
        enqueue(&mut tx, &messages, now).await?;
        tx.commit().await?;
        Ok(messages.len() as u32)
    }

    async fn requeue_lost_deliveries(&self, job: Option<JobId>) -> Result<u32> {
        let _turn = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let now = now_micros();
        let lost = sqlx::query(
            "SELECT t.id, t.attempt FROM tasks t JOIN jobs j ON j.id = t.job_id
             WHERE t.state IN ('queued', 'running')
               AND (j.state IN ('queued', 'running')
                    OR (t.inversion_key IS NOT NULL AND EXISTS (
                        SELECT 1 FROM task_waits w JOIN tasks wt ON wt.id = w.task_id
                        WHERE w.cache_key = t.inversion_key AND wt.state = 'waiting')))
               AND (?1 IS NULL OR t.job_id = ?1
                    OR (t.inversion_key IS NOT NULL AND EXISTS (
                        SELECT 1 FROM task_waits w JOIN tasks wt ON wt.id = w.task_id
                        WHERE w.cache_key = t.inversion_key AND wt.state = 'waiting'
                          AND wt.job_id = ?1)))
               AND NOT EXISTS (SELECT 1 FROM outbox o
                               WHERE o.task_id = t.id AND o.attempt = t.attempt AND o.published_at IS NULL)
             ORDER BY t.created_at, t.id",
        )
        .bind(job.map(|j| text(j.0)))
        .fetch_all(&mut *tx)
        .await?;
        let messages = task_attempts(&lost)?;
        let ids: Vec<Uuid> = messages.iter().map(|(id, _)| *id).collect();
        sqlx::query(
            "UPDATE tasks SET state = 'queued', worker_id = NULL, heartbeat_at = NULL, updated_at = ?2
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_ids(&ids))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // The next `started` counts the render again.
        sqlx::query(
            "UPDATE frames SET state = 'pending', attempts = max(attempts - 1, 0)
             WHERE task_id IN (SELECT value FROM json_each(?1)) AND state = 'rendering'",
        )
        .bind(json_ids(&ids))
        .execute(&mut *tx)
        .await?;
        enqueue(&mut tx, &messages, now).await?;
        tx.commit().await?;
        Ok(messages.len() as u32)
    }

    async fn record_event(
        &self,
        event: &TaskEventRecord,
        retry: &RetryPolicy,
    ) -> Result<EventOutcome> {
        let _turn = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let now = now_micros();
        let task_id = text(event.task_id.0);
        let fresh = sqlx::query(
            "INSERT INTO task_events (task_id, attempt, seq, kind, worker_id, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT DO NOTHING",
        )
        .bind(&task_id)
        .bind(i64::from(event.attempt))
        .bind(event.seq as i64)
        .bind(event.kind.as_str())
        .bind(&event.worker_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !fresh {
            tx.commit().await?;
            return Ok(EventOutcome::Duplicate);
        }
        let task = sqlx::query("SELECT job_id, kind, state, attempt, max_attempts, inversion_key FROM tasks WHERE id = ?1")
            .bind(&task_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::not_found("task", event.task_id))?;
        let job_id = JobId(uuid_at(&task, "task", "job_id")?);
        let kind: String = task.try_get("kind")?;
        let state: String = task.try_get("state")?;
        let attempt = task.try_get::<i64, _>("attempt")? as u32;
        let max_attempts = task.try_get::<i64, _>("max_attempts")? as u32;
        let inversion_key: Option<String> = task.try_get("inversion_key")?;
        if event.attempt != attempt
            || matches!(state.as_str(), "succeeded" | "failed" | "cancelled")
        {
            tx.commit().await?;
            return Ok(EventOutcome::Stale {
                job_id,
                cancelled: state == "cancelled",
            });
        }
        let task_ids = [event.task_id.0];
        let mut affected = vec![job_id];
        match &event.kind {
            TaskEventKind::Started | TaskEventKind::Heartbeat | TaskEventKind::Progress => {
                let first = state != "running";
                sqlx::query(
                    "UPDATE tasks SET state = 'running', worker_id = ?2, heartbeat_at = ?3, updated_at = ?3 WHERE id = ?1",
                )
                .bind(&task_id)
                .bind(&event.worker_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if first {
                    sqlx::query(
                        "UPDATE frames SET state = 'rendering', attempts = attempts + 1 WHERE task_id = ?1 AND state = 'pending'",
                    )
                    .bind(&task_id)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "UPDATE jobs SET state = 'running' WHERE id = ?1 AND state = 'queued'",
                    )
                    .bind(text(job_id.0))
                    .execute(&mut *tx)
                    .await?;
                }
            }
            TaskEventKind::Succeeded {
                frames,
                trajectory_key,
            } => {
                sqlx::query("UPDATE tasks SET state = 'succeeded', heartbeat_at = ?2, updated_at = ?2 WHERE id = ?1")
                    .bind(&task_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE jobs SET state = 'running' WHERE id = ?1 AND state = 'queued'")
                    .bind(text(job_id.0))
                    .execute(&mut *tx)
                    .await?;
                if kind != "render" {
                    let key = inversion_key.clone().ok_or_else(|| {
                        corrupt("task", format!("{kind} task without a cache key"))
                    })?;
                    let artifact = trajectory_key.clone().ok_or_else(|| {
                        corrupt(
                            "event",
                            format!("{kind} task succeeded without an artifact key"),
                        )
                    })?;
                    sqlx::query(
                        "UPDATE inversions SET state = 'ready', trajectory_key = ?2, error = NULL, updated_at = ?3 WHERE cache_key = ?1",
                    )
                    .bind(&key)
                    .bind(&artifact)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    affected.extend(release_waiters(&mut tx, &key, now).await?);
                } else {
                    for f in frames {
                        sqlx::query(
                            "UPDATE frames SET state = 'succeeded', png_key = ?3, latents_key = ?4, error = NULL, finished_at = ?6
                             WHERE job_id = ?1 AND frame_index = ?2 AND task_id = ?5 AND state IN ('pending', 'rendering')",
                        )
                        .bind(text(job_id.0))
                        .bind(i64::from(f.index))
                        .bind(&f.png_key)
                        .bind(&f.latents_key)
                        .bind(&task_id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    }
                    // A frame the worker did not report cannot be trusted as done.
                    fail_frames(
                        &mut tx,
                        &task_ids,
                        "worker reported success without this frame",
                        now,
                    )
                    .await?;
                }
            }
            TaskEventKind::Failed { reason, retryable } => {
                if *retryable && attempt < max_attempts {
                    let delay =
                        i64::try_from(retry.delay(attempt).as_micros()).unwrap_or(60_000_000);
                    sqlx::query(
                        "UPDATE tasks SET state = 'retry_wait', not_before = ?2, error = ?3, updated_at = ?4 WHERE id = ?1",
                    )
                    .bind(&task_id)
                    .bind(now.saturating_add(delay))
                    .bind(reason)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query("UPDATE frames SET state = 'pending' WHERE task_id = ?1 AND state = 'rendering'")
                        .bind(&task_id)
                        .execute(&mut *tx)
                        .await?;
                } else {
                    let reason = if *retryable {
                        format!("{reason} (gave up after {attempt} attempts)")
                    } else {
                        reason.clone()
                    };
                    sqlx::query("UPDATE tasks SET state = 'failed', error = ?2, updated_at = ?3 WHERE id = ?1")
                        .bind(&task_id)
                        .bind(&reason)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    if kind != "render" {
                        let key = inversion_key.clone().ok_or_else(|| {
                            corrupt("task", format!("{kind} task without a cache key"))
                        })?;
                        sqlx::query("UPDATE inversions SET state = 'failed', error = ?2, updated_at = ?3 WHERE cache_key = ?1")
                            .bind(&key)
                            .bind(&reason)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        affected.extend(fail_waiters(&mut tx, &key, &kind, &reason, now).await?);
                    } else {
                        fail_frames(&mut tx, &task_ids, &reason, now).await?;
                    }
                }
            }
        }
        affected.sort();
        affected.dedup();
        for job in &affected {
            settle_job(&mut tx, *job, now).await?;
        }
        tx.commit().await?;
        Ok(EventOutcome::Applied {
            job_id,
            affected_jobs: affected,
        })
    }

    async fn inversion_trajectory(&self, cache_key: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT trajectory_key FROM inversions WHERE cache_key = ?1 AND state = 'ready'",
        )
        .bind(cache_key)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    async fn job_prerequisites(&self, job_id: JobId) -> Result<Vec<JobPrerequisite>> {
        let mut tx = self.pool.begin().await?;
        // Fails as get_job does for an unknown job.
        job_in(&mut tx, job_id).await?;
        let rows = sqlx::query(
            "SELECT p.kind, p.name, p.cache_key, i.state, i.trajectory_key, i.error
             FROM job_prerequisites p LEFT JOIN inversions i ON i.cache_key = p.cache_key
             WHERE p.job_id = ?1 ORDER BY p.position",
        )
        .bind(text(job_id.0))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(prerequisite_from).collect()
    }
}
