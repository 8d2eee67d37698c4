//! The Postgres metadata store (sqlx), the farm's; migrations in `migrations/postgres/`.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use storyfarm_core::{JobId, ProjectId, ReferenceId, StoryboardId, TaskId};
use uuid::Uuid;

use crate::error::{Result, StoreError};
use crate::types::*;
use crate::MetadataStore;

/// `farm_counts`' queries, the same SQL on both backends.
pub(crate) const COUNT_JOBS: &str = "SELECT state, count(*) FROM jobs GROUP BY state";
pub(crate) const COUNT_OPEN_FRAMES: &str =
    "SELECT f.state, count(*) FROM jobs j JOIN frames f ON f.job_id = j.id
     WHERE j.state IN ('queued', 'running') GROUP BY f.state";
pub(crate) const COUNT_LIVE_TASKS: &str = "SELECT kind, state, count(*) FROM tasks
     WHERE state IN ('waiting', 'queued', 'running', 'retry_wait') GROUP BY kind, state";

/// The Postgres migrations (`migrations/postgres/`), embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects (`postgres://...`) without migrating.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        Ok(Self { pool })
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Applies pending migrations (the coordinator does this at start, and `storyfarm migrate`).
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Backend {
                message: format!("migration failed: {e}"),
            })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn corrupt(what: &'static str, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what,
        message: message.into(),
    }
}

fn project_from(row: &PgRow) -> Result<Project> {
    Ok(Project {
        id: ProjectId(row.try_get("id")?),
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
    })
}

fn reference_from(row: &PgRow) -> Result<Reference> {
    let kind: String = row.try_get("kind")?;
    let words: serde_json::Value = row.try_get("subject_words")?;
    let sha256: Option<String> = row.try_get("image_sha256")?;
    let image = match sha256 {
        None => None,
        Some(sha256) => Some(ReferenceImage {
            sha256,
            key: row.try_get("image_key")?,
            width: row.try_get::<i32, _>("width")? as u32,
            height: row.try_get::<i32, _>("height")? as u32,
            size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
        }),
    };
    Ok(Reference {
        id: ReferenceId(row.try_get("id")?),
        project_id: ProjectId(row.try_get("project_id")?),
        kind: ReferenceKind::parse(&kind)
            .ok_or_else(|| corrupt("reference", format!("kind {kind:?}")))?,
        prompt: row.try_get("prompt")?,
        name: row.try_get("name")?,
        subject_words: serde_json::from_value(words)
            .map_err(|e| corrupt("reference", format!("subject words: {e}")))?,
        image,
        created_at: row.try_get("created_at")?,
    })
}

/// A row of job_prerequisites joined with its cache entry. An entry that is gone (its job was
/// cancelled before anyone computed it) reads as pending: not ready, not failed.
fn prerequisite_from(row: &PgRow) -> Result<JobPrerequisite> {
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

fn frame_from(row: &PgRow) -> Result<Frame> {
    let state: String = row.try_get("state")?;
    Ok(Frame {
        job_id: JobId(row.try_get("job_id")?),
        index: row.try_get::<i32, _>("frame_index")? as u32,
        prompt: row.try_get("prompt")?,
        negative_prompt: row.try_get("negative_prompt")?,
        seed: row.try_get::<i64, _>("seed")? as u64,
        state: FrameState::parse(&state)
            .ok_or_else(|| corrupt("frame", format!("state {state:?}")))?,
        task_id: row.try_get::<Option<Uuid>, _>("task_id")?.map(TaskId),
        png_key: row.try_get("png_key")?,
        latents_key: row.try_get("latents_key")?,
        error: row.try_get("error")?,
        attempts: row.try_get::<i32, _>("attempts")? as u32,
        finished_at: row.try_get("finished_at")?,
    })
}

const JOB_SELECT: &str = "SELECT j.id, j.storyboard_id, j.state, j.frames_total, j.error, j.created_at, j.finished_at,
    (SELECT count(*) FROM frames f WHERE f.job_id = j.id AND f.state = 'succeeded') AS frames_succeeded,
    (SELECT count(*) FROM frames f WHERE f.job_id = j.id AND f.state = 'failed') AS frames_failed,
    (SELECT count(*) FROM tasks t WHERE t.job_id = j.id AND t.kind = 'invert') AS inversion_tasks,
    (SELECT count(*) FROM tasks t WHERE t.job_id = j.id AND t.kind = 'anchor') AS anchor_tasks,
    (SELECT count(*) FROM tasks t WHERE t.job_id = j.id AND t.kind = 'render') AS render_tasks
    FROM jobs j WHERE j.id = $1";

fn job_from(row: &PgRow) -> Result<Job> {
    let state: String = row.try_get("state")?;
    Ok(Job {
        id: JobId(row.try_get("id")?),
        storyboard_id: StoryboardId(row.try_get("storyboard_id")?),
        state: JobState::parse(&state).ok_or_else(|| corrupt("job", format!("state {state:?}")))?,
        frames_total: row.try_get::<i32, _>("frames_total")? as u32,
        frames_succeeded: row.try_get::<i64, _>("frames_succeeded")? as u32,
        frames_failed: row.try_get::<i64, _>("frames_failed")? as u32,
        inversion_tasks: row.try_get::<i64, _>("inversion_tasks")? as u32,
        anchor_tasks: row.try_get::<i64, _>("anchor_tasks")? as u32,
        render_tasks: row.try_get::<i64, _>("render_tasks")? as u32,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get::<Option<DateTime<Utc>>, _>("finished_at")?,
    })
}

async fn job_in(tx: &mut Transaction<'_, Postgres>, id: JobId) -> Result<Job> {
    let row = sqlx::query(JOB_SELECT)
        .bind(id.0)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::not_found("job", id))?;
    job_from(&row)
}

// What both backends share (the SQLite store uses these too): the task rows submit_job writes,
// the plan check, failure reasons and which tasks a cancel keeps.

/// A task to insert: the planned task, the state it starts in (`queued` or `waiting`) and the cache
/// key it produces (prerequisite tasks; `None` for renders).
pub(crate) struct NewTask<'a> {
    pub task: &'a PlannedTask,
    pub state: &'static str,
    pub produces: Option<&'a str>,
}

/// Inserts tasks (one statement, whatever their number) and points their frames at them.
async fn insert_tasks(
    tx: &mut Transaction<'_, Postgres>,
    job_id: JobId,
    tasks: &[NewTask<'_>],
) -> Result<()> {
    if tasks.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.task.id.0).collect();
    let kinds: Vec<&str> = tasks.iter().map(|t| t.task.kind.as_str()).collect();
    let states: Vec<&str> = tasks.iter().map(|t| t.state).collect();
    let families: Vec<&str> = tasks.iter().map(|t| t.task.family.as_str()).collect();
    let max_attempts: Vec<i32> = tasks.iter().map(|t| t.task.max_attempts as i32).collect();
    let produces: Vec<Option<&str>> = tasks.iter().map(|t| t.produces).collect();
    let payloads: Vec<&[u8]> = tasks.iter().map(|t| t.task.payload.as_slice()).collect();
    sqlx::query(
        "INSERT INTO tasks (id, job_id, kind, state, family, attempt, max_attempts, inversion_key, payload)
         SELECT t.id, $2, t.kind, t.state, t.family, 1, t.max_attempts, t.produces, t.payload
         FROM UNNEST($1::uuid[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[], $8::bytea[])
              AS t(id, kind, state, family, max_attempts, produces, payload)",
    )
    .bind(&ids)
    .bind(job_id.0)
    .bind(&kinds)
    .bind(&states)
    .bind(&families)
    .bind(&max_attempts)
    .bind(&produces)
    .bind(&payloads)
    .execute(&mut **tx)
    .await?;
    let (frame_ids, frame_tasks): (Vec<i32>, Vec<Uuid>) = tasks
        .iter()
        .flat_map(|t| t.task.frames.iter().map(move |&f| (f as i32, t.task.id.0)))
        .unzip();
    if !frame_ids.is_empty() {
        sqlx::query(
            "UPDATE frames f SET task_id = x.task FROM UNNEST($2::int[], $3::uuid[]) AS x(idx, task)
             WHERE f.job_id = $1 AND f.frame_index = x.idx",
        )
        .bind(job_id.0)
        .bind(&frame_ids)
        .bind(&frame_tasks)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Refuses a plan the store could not run to the end: a task that needs a key no prerequisite of
/// the job produces (or, for a prerequisite's task, one not planned before it) would wait forever.
pub(crate) fn check_plan(job: &NewJob) -> Result<()> {
    let bad = |message: String| {
        Err(StoreError::Corrupt {
            what: "job plan",
            message: format!("job {}: {message}", job.id),
        })
    };
    for (i, p) in job.prerequisites.iter().enumerate() {
        let kind = match p.kind {
            PrerequisiteKind::Style => TaskKind::Invert,
            PrerequisiteKind::Anchors => TaskKind::Anchor,
        };
        if p.task.kind != kind {
            return bad(format!(
                "the {} prerequisite {} has a task of kind {}",
                p.kind.as_str(),
                p.cache_key,
                p.task.kind.as_str()
            ));
        }
        if let Some(need) = p
            .task
            .needs
            .iter()
            .find(|n| !job.prerequisites[..i].iter().any(|q| &q.cache_key == *n))
        {
            return bad(format!(
                "the task of prerequisite {} needs {need}, not a prerequisite planned before it",
                p.cache_key
            ));
        }
    }
    for t in &job.render_tasks {
        if t.kind != TaskKind::Render {
            return bad(format!(
                "render task {} is of kind {}",
                t.id,
                t.kind.as_str()
            ));
        }
        if let Some(need) = t
            .needs
            .iter()
            .find(|n| !job.prerequisites.iter().any(|q| &q.cache_key == *n))
        {
            return bad(format!(
                "render task {} needs {need}, not a prerequisite of the job",
                t.id
            ));
        }
    }
    Ok(())
}

/// The message a task's frames fail with when the prerequisite `key` it waits for failed with
/// `error`: named by what the waiting task's job calls it (`prerequisite` kind and `name` from
/// job_prerequisites), else by the kind of the task that failed to produce it.
pub(crate) fn prerequisite_failed(
    prerequisite: Option<&str>,
    name: Option<&str>,
    producer_kind: &str,
    error: &str,
) -> String {
    let anchors = match prerequisite {
        Some(kind) => kind == PrerequisiteKind::Anchors.as_str(),
        None => producer_kind == TaskKind::Anchor.as_str(),
    };
    if anchors {
        format!(
            "anchors of character {} failed: {error}",
            name.unwrap_or_default()
        )
    } else {
        format!("style reference inversion failed: {error}")
    }
}

/// Which of a job's unfinished prerequisite tasks keep running when it is cancelled: those whose
/// key a task of another job waits for (`waited_elsewhere`), and, transitively, those a kept task
/// of this job waits for. `prerequisites` are `(task, key it produces)`, `waits` the job's
/// `(task, key it waits for)`.
pub(crate) fn kept_on_cancel(
    prerequisites: &[(Uuid, String)],
    waits: &[(Uuid, String)],
    waited_elsewhere: &[String],
) -> Vec<Uuid> {
    let mut kept: Vec<Uuid> = Vec::new();
    loop {
        let before = kept.len();
        for (task, key) in prerequisites {
            if kept.contains(task) {
                continue;
            }
            if waited_elsewhere.contains(key)
                || waits.iter().any(|(w, k)| k == key && kept.contains(w))
            {
                kept.push(*task);
            }
        }
        if kept.len() == before {
            return kept;
        }
    }
}

async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    task_ids: &[Uuid],
    attempts: &[i32],
) -> Result<()> {
    if task_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO outbox (task_id, attempt) SELECT * FROM UNNEST($1::uuid[], $2::int[])",
    )
    .bind(task_ids)
    .bind(attempts)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Takes the row locks of jobs, in id order. Transactions that change a job's frames hold its lock
/// from before they look at its tasks until they commit, in the order cancel_job takes it (job,
/// then tasks, then frames): two events finishing a job's last two frames then settle it one
/// after the other, the second seeing the first's frames, instead of each seeing the other's frame
/// still open and neither finishing the job.
async fn lock_jobs(tx: &mut Transaction<'_, Postgres>, ids: &[Uuid]) -> Result<()> {
    sqlx::query("SELECT id FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Marks the job finished when none of its frames can change any more. The caller holds the job's
/// lock (`lock_jobs`).
async fn settle_job(tx: &mut Transaction<'_, Postgres>, job_id: JobId) -> Result<()> {
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE state IN ('pending', 'rendering')) AS open,
                count(*) FILTER (WHERE state = 'failed') AS failed,
                min(error) FILTER (WHERE state = 'failed') AS first_error
         FROM frames WHERE job_id = $1",
    )
    .bind(job_id.0)
    .fetch_one(&mut **tx)
    .await?;
    let open: i64 = row.try_get("open")?;
    if open > 0 {
        return Ok(());
    }
    let failed: i64 = row.try_get("failed")?;
    let error: Option<String> = row.try_get("first_error")?;
    let state = if failed > 0 { "failed" } else { "succeeded" };
    sqlx::query(
        "UPDATE jobs SET state = $2, finished_at = now(), error = $3
         WHERE id = $1 AND state IN ('queued', 'running')",
    )
    .bind(job_id.0)
    .bind(state)
    .bind(if failed > 0 {
        error.map(|e| format!("{failed} frame(s) failed; first: {e}"))
    } else {
        None
    })
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Jobs with tasks waiting for the prerequisite `key`.
async fn waiting_jobs(tx: &mut Transaction<'_, Postgres>, key: &str) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT t.job_id FROM task_waits w JOIN tasks t ON t.id = w.task_id
         WHERE w.cache_key = $1 ORDER BY t.job_id",
    )
    .bind(key)
    .fetch_all(&mut **tx)
    .await?)
}

/// The prerequisite `key` is ready: the tasks that waited only for it are queued (with outbox
/// rows). Returns the jobs that had tasks waiting for it.
async fn release_waiters(tx: &mut Transaction<'_, Postgres>, key: &str) -> Result<Vec<JobId>> {
    let waiting = waiting_jobs(tx, key).await?;
    lock_jobs(tx, &waiting).await?;
    let met: Vec<Uuid> =
        sqlx::query_scalar("DELETE FROM task_waits WHERE cache_key = $1 RETURNING task_id")
            .bind(key)
            .fetch_all(&mut **tx)
            .await?;
    let released = sqlx::query(
        "UPDATE tasks t SET state = 'queued', updated_at = now()
         WHERE t.id = ANY($1) AND t.state = 'waiting'
           AND NOT EXISTS (SELECT 1 FROM task_waits w WHERE w.task_id = t.id)
         RETURNING t.id, t.attempt",
    )
    .bind(&met)
    .fetch_all(&mut **tx)
    .await?;
    let ids: Vec<Uuid> = released
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<Result<_, _>>()?;
    let attempts: Vec<i32> = released
        .iter()
        .map(|r| r.try_get("attempt"))
        .collect::<Result<_, _>>()?;
    enqueue(tx, &ids, &attempts).await?;
    Ok(waiting.into_iter().map(JobId).collect())
}

/// The prerequisite `key` failed for good (its task, of kind `producer_kind`, with `error`): every
/// task waiting for it fails with a reason naming it, and its frames with it; a failed task that
/// was to produce a key of its own fails that key's entry and its waiters in turn. Returns the
/// jobs whose tasks failed.
async fn fail_waiters(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
    producer_kind: &str,
    error: &str,
) -> Result<Vec<JobId>> {
    let mut affected = Vec::new();
    let mut failed_keys = vec![(
        key.to_string(),
        producer_kind.to_string(),
        error.to_string(),
    )];
    while let Some((key, producer_kind, error)) = failed_keys.pop() {
        let waiting = waiting_jobs(tx, &key).await?;
        lock_jobs(tx, &waiting).await?;
        affected.extend(waiting.into_iter().map(JobId));
        let rows = sqlx::query(
            "SELECT w.task_id, p.kind, p.name FROM task_waits w JOIN tasks t ON t.id = w.task_id
             LEFT JOIN job_prerequisites p ON p.job_id = t.job_id AND p.cache_key = w.cache_key
             WHERE w.cache_key = $1",
        )
        .bind(&key)
        .fetch_all(&mut **tx)
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
                .push(row.try_get("task_id")?);
        }
        for (reason, ids) in by_reason {
            let failed = sqlx::query(
                "UPDATE tasks SET state = 'failed', error = $2, updated_at = now()
                 WHERE id = ANY($1) AND state = 'waiting' RETURNING kind, inversion_key",
            )
            .bind(&ids)
            .bind(&reason)
            .fetch_all(&mut **tx)
            .await?;
            sqlx::query("DELETE FROM task_waits WHERE task_id = ANY($1)")
                .bind(&ids)
                .execute(&mut **tx)
                .await?;
            affected.extend(fail_frames(tx, &ids, &reason).await?);
            for row in &failed {
                let Some(produced) = row.try_get::<Option<String>, _>("inversion_key")? else {
                    continue;
                };
                let newly_failed = sqlx::query(
                    "UPDATE inversions SET state = 'failed', error = $2, updated_at = now()
                     WHERE cache_key = $1 AND state = 'pending'",
                )
                .bind(&produced)
                .bind(&reason)
                .execute(&mut **tx)
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

/// Fails every frame of `task_ids` that is not finished, with `reason`.
async fn fail_frames(
    tx: &mut Transaction<'_, Postgres>,
    task_ids: &[Uuid],
    reason: &str,
) -> Result<Vec<JobId>> {
    let rows = sqlx::query(
        "UPDATE frames SET state = 'failed', error = $2, finished_at = now()
         WHERE task_id = ANY($1) AND state IN ('pending', 'rendering')
         RETURNING job_id",
    )
    .bind(task_ids)
    .bind(reason)
    .fetch_all(&mut **tx)
    .await?;
    let mut jobs: Vec<JobId> = rows
        .iter()
        .map(|r| r.try_get("job_id").map(JobId))
        .collect::<Result<_, _>>()?;
    jobs.sort();
    jobs.dedup();
    Ok(jobs)
}

#[async_trait::async_trait]
impl MetadataStore for PgStore {
    async fn create_project(&self, name: &str) -> Result<Project> {
        let row = sqlx::query(
            "INSERT INTO projects (id, name) VALUES ($1, $2) RETURNING id, name, created_at",
        )
        .bind(ProjectId::new().0)
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        project_from(&row)
    }

    async fn get_project(&self, id: ProjectId) -> Result<Project> {
        let row = sqlx::query("SELECT id, name, created_at FROM projects WHERE id = $1")
            .bind(id.0)
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
        let words = serde_json::to_value(&r.subject_words)
            .map_err(|e| corrupt("reference", e.to_string()))?;
        let image = r.image.as_ref();
        let row = sqlx::query(
            "INSERT INTO style_references (id, project_id, kind, prompt, name, subject_words, image_sha256, image_key, width, height, size_bytes)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 WHERE EXISTS (SELECT 1 FROM projects WHERE id = $2)
             RETURNING *",
        )
        .bind(r.id.0)
        .bind(r.project_id.0)
        .bind(r.kind.as_str())
        .bind(&r.prompt)
        .bind(&r.name)
        .bind(words)
        .bind(image.map(|i| i.sha256.as_str()))
        .bind(image.map(|i| i.key.as_str()))
        .bind(image.map(|i| i.width as i32))
        .bind(image.map(|i| i.height as i32))
        .bind(image.map(|i| i.size_bytes as i64))
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found("project", r.project_id))?;
        reference_from(&row)
    }

    async fn get_reference(&self, id: ReferenceId) -> Result<Reference> {
        let row = sqlx::query("SELECT * FROM style_references WHERE id = $1")
            .bind(id.0)
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
            serde_json::to_value(stored).map_err(|e| corrupt("storyboard", e.to_string()))?;
        let row = sqlx::query(
            "INSERT INTO storyboards (id, project_id, name, spec)
             SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM projects WHERE id = $2)
             RETURNING id, created_at",
        )
        .bind(StoryboardId::new().0)
        .bind(project_id.0)
        .bind(name)
        .bind(spec)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found("project", project_id))?;
        Ok(Storyboard {
            id: StoryboardId(row.try_get("id")?),
            project_id,
            name: name.to_string(),
            stored: stored.clone(),
            created_at: row.try_get("created_at")?,
        })
    }

    async fn get_storyboard(&self, id: StoryboardId) -> Result<Storyboard> {
        let row = sqlx::query(
            "SELECT id, project_id, name, spec, created_at FROM storyboards WHERE id = $1",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found("storyboard", id))?;
        let spec: serde_json::Value = row.try_get("spec")?;
        Ok(Storyboard {
            id,
            project_id: ProjectId(row.try_get("project_id")?),
            name: row.try_get("name")?,
            stored: serde_json::from_value(spec)
                .map_err(|e| corrupt("storyboard", e.to_string()))?,
            created_at: row.try_get("created_at")?,
        })
    }

    async fn submit_job(&self, job: &NewJob) -> Result<Job> {
        check_plan(job)?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO jobs (id, storyboard_id, state, frames_total) VALUES ($1, $2, 'queued', $3)")
            .bind(job.id.0)
            .bind(job.storyboard_id.0)
            .bind(job.frames.len() as i32)
            .execute(&mut *tx)
            .await?;
        let indices: Vec<i32> = job.frames.iter().map(|f| f.index as i32).collect();
        let prompts: Vec<&str> = job.frames.iter().map(|f| f.prompt.as_str()).collect();
        let negatives: Vec<&str> = job
            .frames
            .iter()
            .map(|f| f.negative_prompt.as_str())
            .collect();
        let seeds: Vec<i64> = job.frames.iter().map(|f| f.seed as i64).collect();
        sqlx::query(
            "INSERT INTO frames (job_id, frame_index, prompt, negative_prompt, seed, state)
             SELECT $1, * , 'pending' FROM UNNEST($2::int[], $3::text[], $4::text[], $5::bigint[])",
        )
        .bind(job.id.0)
        .bind(&indices)
        .bind(&prompts)
        .bind(&negatives)
        .bind(&seeds)
        .execute(&mut *tx)
        .await?;

        // Claim every prerequisite's cache entry, in key order (two jobs with the same keys
        // lock them in the same order): absent, it is ours to compute; pending, another job
        // computes it; ready, there is nothing to do; failed, it is tried again.
        let mut keys: Vec<&str> = job
            .prerequisites
            .iter()
            .map(|p| p.cache_key.as_str())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let claimed: Vec<String> = sqlx::query_scalar(
            "INSERT INTO inversions (cache_key, state)
             SELECT k, 'pending' FROM UNNEST($1::text[]) AS k ORDER BY k
             ON CONFLICT (cache_key) DO NOTHING RETURNING cache_key",
        )
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?;
        let entries = sqlx::query(
            "SELECT cache_key, state FROM inversions WHERE cache_key = ANY($1) ORDER BY cache_key FOR UPDATE",
        )
        .bind(&keys)
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
            "UPDATE inversions SET state = 'pending', error = NULL, updated_at = now()
             WHERE cache_key = ANY($1) AND state = 'failed'",
        )
        .bind(&retried)
        .execute(&mut *tx)
        .await?;
        let positions: Vec<i32> = (0..job.prerequisites.len() as i32).collect();
        let prerequisite_keys: Vec<&str> = job
            .prerequisites
            .iter()
            .map(|p| p.cache_key.as_str())
            .collect();
        let kinds: Vec<&str> = job.prerequisites.iter().map(|p| p.kind.as_str()).collect();
        let names: Vec<&str> = job.prerequisites.iter().map(|p| p.name.as_str()).collect();
        sqlx::query(
            "INSERT INTO job_prerequisites (job_id, position, cache_key, kind, name)
             SELECT $1, * FROM UNNEST($2::int[], $3::text[], $4::text[], $5::text[])
             ON CONFLICT (job_id, cache_key) DO NOTHING",
        )
        .bind(job.id.0)
        .bind(&positions)
        .bind(&prerequisite_keys)
        .bind(&kinds)
        .bind(&names)
        .execute(&mut *tx)
        .await?;

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
        let (mut wait_tasks, mut wait_keys): (Vec<Uuid>, Vec<&str>) = (Vec::new(), Vec::new());
        let mut runnable: Vec<Uuid> = Vec::new();
        for (task, produces) in planned {
            let before = wait_tasks.len();
            for need in &task.needs {
                if !ready.contains(need) {
                    wait_tasks.push(task.id.0);
                    wait_keys.push(need);
                }
            }
            let state = if wait_tasks.len() > before {
                "waiting"
            } else {
                runnable.push(task.id.0);
                "queued"
            };
            tasks.push(NewTask {
                task,
                state,
                produces,
            });
        }
        insert_tasks(&mut tx, job.id, &tasks).await?;
        sqlx::query(
            "INSERT INTO task_waits (task_id, cache_key) SELECT * FROM UNNEST($1::uuid[], $2::text[])
             ON CONFLICT DO NOTHING",
        )
        .bind(&wait_tasks)
        .bind(&wait_keys)
        .execute(&mut *tx)
        .await?;
        let attempts = vec![1; runnable.len()];
        enqueue(&mut tx, &runnable, &attempts).await?;
        let stored = job_in(&mut tx, job.id).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn get_job(&self, id: JobId) -> Result<Job> {
        let row = sqlx::query(JOB_SELECT)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("job", id))?;
        job_from(&row)
    }

    async fn list_frames(&self, job_id: JobId) -> Result<Vec<Frame>> {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1)")
            .bind(job_id.0)
            .fetch_one(&self.pool)
            .await?;
        if !exists {
            return Err(StoreError::not_found("job", job_id));
        }
        let rows = sqlx::query("SELECT * FROM frames WHERE job_id = $1 ORDER BY frame_index")
            .bind(job_id.0)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(frame_from).collect()
    }

    async fn get_frame(&self, job_id: JobId, index: u32) -> Result<Frame> {
        let row = sqlx::query("SELECT * FROM frames WHERE job_id = $1 AND frame_index = $2")
            .bind(job_id.0)
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
        let mut tx = self.pool.begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let state = state.ok_or_else(|| StoreError::not_found("job", id))?;
        if JobState::parse(&state).is_some_and(JobState::is_terminal) {
            let job = job_in(&mut tx, id).await?;
            tx.commit().await?;
            return Ok((job, false));
        }
        // A prerequisite task other jobs wait for keeps running (and what it waits for of this
        // job); everything else of this job stops. The entries of its prerequisite tasks are
        // locked first: a job submitted meanwhile either waits for them already (and is seen
        // below) or claims them after this commits.
        let prerequisites = sqlx::query(
            "SELECT id, inversion_key FROM tasks
             WHERE job_id = $1 AND state IN ('waiting', 'queued', 'retry_wait', 'running')
               AND inversion_key IS NOT NULL",
        )
        .bind(id.0)
        .fetch_all(&mut *tx)
        .await?;
        let prerequisites: Vec<(Uuid, String)> = prerequisites
            .iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("inversion_key")?)))
            .collect::<Result<_>>()?;
        let mut keys: Vec<&str> = prerequisites.iter().map(|(_, k)| k.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        sqlx::query(
            "SELECT cache_key FROM inversions WHERE cache_key = ANY($1) ORDER BY cache_key FOR UPDATE",
        )
        .bind(&keys)
        .execute(&mut *tx)
        .await?;
        let waited_elsewhere: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT w.cache_key FROM task_waits w
             JOIN tasks o ON o.id = w.task_id JOIN jobs oj ON oj.id = o.job_id
             WHERE w.cache_key = ANY($2) AND o.job_id <> $1 AND oj.state <> 'cancelled'",
        )
        .bind(id.0)
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?;
        let waits = sqlx::query(
            "SELECT w.task_id, w.cache_key FROM task_waits w JOIN tasks t ON t.id = w.task_id
             WHERE t.job_id = $1",
        )
        .bind(id.0)
        .fetch_all(&mut *tx)
        .await?;
        let waits: Vec<(Uuid, String)> = waits
            .iter()
            .map(|r| Ok((r.try_get("task_id")?, r.try_get("cache_key")?)))
            .collect::<Result<_>>()?;
        let kept = kept_on_cancel(&prerequisites, &waits, &waited_elsewhere);
        let cancelled = sqlx::query(
            "UPDATE tasks SET state = 'cancelled', updated_at = now()
             WHERE job_id = $1 AND state IN ('waiting', 'queued', 'retry_wait', 'running')
               AND NOT (id = ANY($2))
             RETURNING id, inversion_key",
        )
        .bind(id.0)
        .bind(&kept)
        .fetch_all(&mut *tx)
        .await?;
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM task_events e JOIN tasks t ON t.id = e.task_id
             WHERE t.job_id = $1 AND t.state = 'cancelled' AND e.kind = 'started'
               AND e.attempt = t.attempt
               AND NOT EXISTS (SELECT 1 FROM task_events d WHERE d.task_id = e.task_id
                               AND d.attempt = e.attempt AND d.kind IN ('succeeded', 'failed'))",
        )
        .bind(id.0)
        .fetch_one(&mut *tx)
        .await?;
        // Nobody computes them now: the next job that needs them claims them again.
        let abandoned: Vec<String> = cancelled
            .iter()
            .map(|r| r.try_get::<Option<String>, _>("inversion_key"))
            .filter_map(|k| k.transpose())
            .collect::<Result<_, _>>()?;
        sqlx::query("DELETE FROM inversions WHERE cache_key = ANY($1) AND state = 'pending'")
            .bind(&abandoned)
            .execute(&mut *tx)
            .await?;
        let ids: Vec<Uuid> = cancelled
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        sqlx::query("DELETE FROM task_waits WHERE task_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM outbox WHERE task_id = ANY($1) AND published_at IS NULL")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE frames SET state = 'cancelled', finished_at = now() WHERE job_id = $1 AND state IN ('pending', 'rendering')",
        )
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        let job = job_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok((job, running > 0))
    }

    async fn unfinished_jobs(&self) -> Result<Vec<JobId>> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(JobId).collect())
    }

    async fn farm_counts(&self) -> Result<FarmCounts> {
        let mut tx = self.pool.begin().await?;
        // One snapshot for all the figures.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let jobs: Vec<(String, i64)> = sqlx::query_as(COUNT_JOBS).fetch_all(&mut *tx).await?;
        let frames: Vec<(String, i64)> = sqlx::query_as(COUNT_OPEN_FRAMES)
            .fetch_all(&mut *tx)
            .await?;
        let tasks: Vec<(String, String, i64)> =
            sqlx::query_as(COUNT_LIVE_TASKS).fetch_all(&mut *tx).await?;
        let (busy, age): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(DISTINCT worker_id),
                    EXTRACT(EPOCH FROM now() - min(coalesce(heartbeat_at, updated_at)))::float8
             FROM tasks WHERE state = 'running'",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(FarmCounts::from_rows(
            &jobs,
            &frames,
            &tasks,
            busy,
            age.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
        ))
    }

    async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxMessage>> {
        let rows = sqlx::query(
            "SELECT o.id, o.task_id, o.attempt, t.family, t.payload FROM outbox o JOIN tasks t ON t.id = o.task_id
             WHERE o.published_at IS NULL ORDER BY o.id LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxMessage {
                    id: r.try_get("id")?,
                    task_id: TaskId(r.try_get("task_id")?),
                    attempt: r.try_get::<i32, _>("attempt")? as u32,
                    family: r.try_get("family")?,
                    payload: r.try_get("payload")?,
                })
            })
            .collect()
    }

    async fn mark_published(&self, ids: &[i64]) -> Result<()> {
        sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release_due_retries(&self) -> Result<u32> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "UPDATE tasks SET state = 'queued', attempt = attempt + 1, not_before = NULL, updated_at = now()
             WHERE state = 'retry_wait' AND not_before <= now() RETURNING id, attempt",
        )
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<Uuid> = rows
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        let attempts: Vec<i32> = rows
            .iter()
            .map(|r| r.try_get("attempt"))
            .collect::<Result<_, _>>()?;
        enqueue(&mut tx, &ids, &attempts).await?;
        tx.commit().await?;
        Ok(ids.len() as u32)
    }

    async fn requeue_lost_deliveries(&self, job: Option<JobId>) -> Result<u32> {
        let mut tx = self.pool.begin().await?;
        let lost = sqlx::query(
            "SELECT t.id, t.attempt FROM tasks t JOIN jobs j ON j.id = t.job_id
             WHERE t.state IN ('queued', 'running')
               AND (j.state IN ('queued', 'running')
                    OR (t.inversion_key IS NOT NULL AND EXISTS (
                        SELECT 1 FROM task_waits w JOIN tasks wt ON wt.id = w.task_id
                        WHERE w.cache_key = t.inversion_key AND wt.state = 'waiting')))
               AND ($1::uuid IS NULL OR t.job_id = $1
                    OR (t.inversion_key IS NOT NULL AND EXISTS (
                        SELECT 1 FROM task_waits w JOIN tasks wt ON wt.id = w.task_id
                        WHERE w.cache_key = t.inversion_key AND wt.state = 'waiting'
                          AND wt.job_id = $1)))
               AND NOT EXISTS (SELECT 1 FROM outbox o
                               WHERE o.task_id = t.id AND o.attempt = t.attempt AND o.published_at IS NULL)
             ORDER BY t.created_at, t.id
             FOR UPDATE OF t",
        )
        .bind(job.map(|j| j.0))
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<Uuid> = lost
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        let attempts: Vec<i32> = lost
            .iter()
            .map(|r| r.try_get("attempt"))
            .collect::<Result<_, _>>()?;
        sqlx::query(
            "UPDATE tasks SET state = 'queued', worker_id = NULL, heartbeat_at = NULL, updated_at = now() WHERE id = ANY($1)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        // The next `started` counts the render again.
        sqlx::query(
            "UPDATE frames SET state = 'pending', attempts = greatest(attempts - 1, 0)
             WHERE task_id = ANY($1) AND state = 'rendering'",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        enqueue(&mut tx, &ids, &attempts).await?;
        tx.commit().await?;
        Ok(ids.len() as u32)
    }

    async fn record_event(
        &self,
        event: &TaskEventRecord,
        retry: &RetryPolicy,
    ) -> Result<EventOutcome> {
        let mut tx = self.pool.begin().await?;
        let fresh = sqlx::query(
            "INSERT INTO task_events (task_id, attempt, seq, kind, worker_id) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING",
        )
        .bind(event.task_id.0)
        .bind(event.attempt as i32)
        .bind(event.seq as i64)
        .bind(event.kind.as_str())
        .bind(&event.worker_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !fresh {
            tx.commit().await?;
            return Ok(EventOutcome::Duplicate);
        }
        let owner: Uuid = sqlx::query_scalar("SELECT job_id FROM tasks WHERE id = $1")
            .bind(event.task_id.0)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::not_found("task", event.task_id))?;
        lock_jobs(&mut tx, &[owner]).await?;
        let task = sqlx::query(
            "SELECT job_id, kind, state, attempt, max_attempts, inversion_key FROM tasks WHERE id = $1 FOR UPDATE",
        )
        .bind(event.task_id.0)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::not_found("task", event.task_id))?;
        let job_id = JobId(task.try_get("job_id")?);
        let kind: String = task.try_get("kind")?;
        let state: String = task.try_get("state")?;
        let attempt = task.try_get::<i32, _>("attempt")? as u32;
        let max_attempts = task.try_get::<i32, _>("max_attempts")? as u32;
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
                sqlx::query("UPDATE tasks SET state = 'running', worker_id = $2, heartbeat_at = now(), updated_at = now() WHERE id = $1")
                    .bind(event.task_id.0)
                    .bind(&event.worker_id)
                    .execute(&mut *tx)
                    .await?;
                if first {
                    sqlx::query("UPDATE frames SET state = 'rendering', attempts = attempts + 1 WHERE task_id = $1 AND state = 'pending'")
                        .bind(event.task_id.0)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(
                        "UPDATE jobs SET state = 'running' WHERE id = $1 AND state = 'queued'",
                    )
                    .bind(job_id.0)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            TaskEventKind::Succeeded {
                frames,
                trajectory_key,
            } => {
                sqlx::query("UPDATE tasks SET state = 'succeeded', heartbeat_at = now(), updated_at = now() WHERE id = $1")
                    .bind(event.task_id.0)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE jobs SET state = 'running' WHERE id = $1 AND state = 'queued'")
                    .bind(job_id.0)
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
                    sqlx::query("UPDATE inversions SET state = 'ready', trajectory_key = $2, error = NULL, updated_at = now() WHERE cache_key = $1")
                        .bind(&key)
                        .bind(&artifact)
                        .execute(&mut *tx)
                        .await?;
                    affected.extend(release_waiters(&mut tx, &key).await?);
                } else {
                    for f in frames {
                        sqlx::query(
                            "UPDATE frames SET state = 'succeeded', png_key = $3, latents_key = $4, error = NULL, finished_at = now()
                             WHERE job_id = $1 AND frame_index = $2 AND task_id = $5 AND state IN ('pending', 'rendering')",
                        )
                        .bind(job_id.0)
                        .bind(f.index as i32)
                        .bind(&f.png_key)
                        .bind(&f.latents_key)
                        .bind(event.task_id.0)
                        .execute(&mut *tx)
                        .await?;
                    }
                    // A frame the worker did not report cannot be trusted as done.
                    fail_frames(
                        &mut tx,
                        &task_ids,
                        "worker reported success without this frame",
                    )
                    .await?;
                }
            }
            TaskEventKind::Failed { reason, retryable } => {
                if *retryable && attempt < max_attempts {
                    let delay = chrono::Duration::from_std(retry.delay(attempt))
                        .unwrap_or(chrono::Duration::seconds(60));
                    sqlx::query(
                        "UPDATE tasks SET state = 'retry_wait', not_before = now() + $2, error = $3, updated_at = now() WHERE id = $1",
                    )
                    .bind(event.task_id.0)
                    .bind(delay)
                    .bind(reason)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query("UPDATE frames SET state = 'pending' WHERE task_id = $1 AND state = 'rendering'")
                        .bind(event.task_id.0)
                        .execute(&mut *tx)
                        .await?;
                } else {
                    let reason = if *retryable {
                        format!("{reason} (gave up after {attempt} attempts)")
                    } else {
                        reason.clone()
                    };
                    sqlx::query("UPDATE tasks SET state = 'failed', error = $2, updated_at = now() WHERE id = $1")
                        .bind(event.task_id.0)
                        .bind(&reason)
                        .execute(&mut *tx)
                        .await?;
                    if kind != "render" {
                        let key = inversion_key.clone().ok_or_else(|| {
                            corrupt("task", format!("{kind} task without a cache key"))
                        })?;
                        sqlx::query("UPDATE inversions SET state = 'failed', error = $2, updated_at = now() WHERE cache_key = $1")
                            .bind(&key)
                            .bind(&reason)
                            .execute(&mut *tx)
                            .await?;
                        affected.extend(fail_waiters(&mut tx, &key, &kind, &reason).await?);
                    } else {
                        fail_frames(&mut tx, &task_ids, &reason).await?;
                    }
                }
            }
        }
        affected.sort();
        affected.dedup();
        for job in &affected {
            settle_job(&mut tx, *job).await?;
        }
        tx.commit().await?;
        Ok(EventOutcome::Applied {
            job_id,
            affected_jobs: affected,
        })
    }

    async fn inversion_trajectory(&self, cache_key: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT trajectory_key FROM inversions WHERE cache_key = $1 AND state = 'ready'",
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
             WHERE p.job_id = $1 ORDER BY p.position",
        )
        .bind(job_id.0)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(prerequisite_from).collect()
    }
}
