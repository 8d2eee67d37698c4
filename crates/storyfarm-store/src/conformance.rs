//! The conformance suite every [`MetadataStore`] backend must pass (feature `testing`): inversion
//! claiming and reuse, prerequisites (style, characters' anchors) released, shared, failed and
//! cancelled as their dependents need, the outbox, idempotent event ingestion, retries with backoff, permanent
//! failures, cancellation, requeueing lost deliveries, frame finish times, and concurrent callers.
//!
//! Each case takes a fresh, migrated, empty store and panics naming what differs. A backend's test
//! file generates one test per case with [`conformance_cases!`](crate::conformance_cases), so a
//! failure names the case and a new case runs on every backend without being listed twice.

use std::sync::Arc;
use std::time::Duration;

use storyfarm_core::{JobId, ProjectId, ReferenceId, StoryboardId, StoryboardSpec, TaskId};

use crate::*;

/// Calls `$callback! { case, ... }` with the name of every case of this module. The callback is a
/// `macro_rules!` of the backend's test file that turns each name into a `#[test]` running
/// `storyfarm_store::conformance::<case>` on a fresh store.
#[macro_export]
macro_rules! conformance_cases {
    ($callback:ident) => {
        $callback! {
            rows_read_back_as_written,
            not_found_and_references,
            job_of_a_missing_storyboard_leaves_nothing,
            inversion_is_claimed_once_and_releases_waiting_renders,
            frames_succeed_once_and_the_job_finishes,
            retryable_failures_back_off_then_give_up,
            retries_wait_for_their_backoff,
            failed_inversion_fails_every_waiting_frame,
            cancel_stops_queued_work_and_flags_running_tasks,
            sequence_numbers_are_per_worker,
            frames_record_when_they_finished,
            lost_deliveries_are_requeued_at_their_attempt,
            lost_inversion_of_a_cancelled_job_still_serves_its_waiters,
            references_of_every_kind_round_trip,
            plans_with_unknown_needs_are_refused,
            prerequisites_release_tasks_as_their_needs_become_ready,
            prerequisites_are_shared_between_jobs,
            failed_style_fails_the_anchors_and_renders_waiting_for_it,
            cancel_keeps_prerequisites_other_jobs_wait_for,
            lost_anchor_task_of_a_cancelled_job_still_serves_its_waiters,
            concurrent_workers_dispatcher_and_api,
            farm_counts_follow_jobs_frames_and_tasks,
        }
    };
}

/// A store under test.
pub type Store = Arc<dyn MetadataStore>;

fn spec_with(frames: usize, seed: u64) -> StoryboardSpec {
    let mut yaml = format!("model: m\nwidth: 64\nheight: 64\nsteps: 4\nseed: {seed}\nframes:\n");
    for i in 0..frames {
        yaml.push_str(&format!("  - prompt: frame {i}\n"));
    }
    StoryboardSpec::from_yaml(&yaml).expect("the suite's storyboard parses")
}

fn spec() -> StoryboardSpec {
    spec_with(3, 0)
}

async fn storyboard_of(store: &dyn MetadataStore, spec: StoryboardSpec) -> StoryboardId {
    let project = store.create_project("p").await.expect("create_project");
    store
        .create_storyboard(
            project.id,
            "board",
            &StoredStoryboard {
                spec,
                reference_id: None,
                character_references: vec![],
            },
        )
        .await
        .expect("create_storyboard")
        .id
}

async fn storyboard(store: &dyn MetadataStore) -> StoryboardId {
    storyboard_of(store, spec()).await
}

fn task(kind: TaskKind, frames: Vec<u32>) -> PlannedTask {
    PlannedTask {
        id: TaskId::new(),
        kind,
        family: "sd".into(),
        max_attempts: 3,
        frames,
        payload: vec![1, 2, 3],
        needs: vec![],
    }
}

/// A job of [`spec`]: frames 0 and 1 in the first render task, frame 2 in the second; with a
/// `key`, both need the style inversion of that key.
fn new_job(storyboard_id: StoryboardId, key: Option<&str>) -> NewJob {
    let needs: Vec<String> = key.into_iter().map(String::from).collect();
    NewJob {
        id: JobId::new(),
        storyboard_id,
        frames: spec().resolved_frames(),
        prerequisites: key
            .map(|k| prerequisite(PrerequisiteKind::Style, "", k, &[]))
            .into_iter()
            .collect(),
        render_tasks: vec![
            needing(task(TaskKind::Render, vec![0, 1]), &needs),
            needing(task(TaskKind::Render, vec![2]), &needs),
        ],
    }
}

fn needing<S: AsRef<str>>(task: PlannedTask, needs: &[S]) -> PlannedTask {
    PlannedTask {
        needs: needs.iter().map(|n| n.as_ref().to_string()).collect(),
        ..task
    }
}

fn prerequisite(
    kind: PrerequisiteKind,
    name: &str,
    key: &str,
    needs: &[&str],
) -> PlannedPrerequisite {
    let task_kind = match kind {
        PrerequisiteKind::Style => TaskKind::Invert,
        PrerequisiteKind::Anchors => TaskKind::Anchor,
    };
    PlannedPrerequisite {
        cache_key: key.into(),
        kind,
        name: name.into(),
        task: needing(task(task_kind, vec![]), needs),
    }
}

/// The inversion task of a [`new_job`] with a key.
fn inversion_of(job: &NewJob) -> TaskId {
    job.prerequisites[0].task.id
}

/// A styled job of [`spec`] with two characters, keys prefixed with `p`: prerequisites
/// `{p}-style`, then the anchors of Ana (`{p}-ana`) and of Bo (`{p}-bo`), each needing the style.
/// Render 0 (frames 0 and 1) shows both characters (needs all three), render 1 (frame 2) shows Bo
/// (needs the style and Bo).
fn job_with_characters(storyboard_id: StoryboardId, p: &str) -> NewJob {
    let (style, ana, bo) = keys(p);
    NewJob {
        id: JobId::new(),
        storyboard_id,
        frames: spec().resolved_frames(),
        prerequisites: vec![
            prerequisite(PrerequisiteKind::Style, "", &style, &[]),
            prerequisite(PrerequisiteKind::Anchors, "Ana", &ana, &[&style]),
            prerequisite(PrerequisiteKind::Anchors, "Bo", &bo, &[&style]),
        ],
        render_tasks: vec![
            needing(task(TaskKind::Render, vec![0, 1]), &[&style, &ana, &bo]),
            needing(task(TaskKind::Render, vec![2]), &[&style, &bo]),
        ],
    }
}

/// The cache keys of [`job_with_characters`]: style, Ana's anchors, Bo's anchors.
fn keys(p: &str) -> (String, String, String) {
    (format!("{p}-style"), format!("{p}-ana"), format!("{p}-bo"))
}

/// The prerequisite tasks of [`job_with_characters`]: style, Ana's anchors, Bo's anchors.
fn prerequisite_tasks(job: &NewJob) -> (TaskId, TaskId, TaskId) {
    (
        job.prerequisites[0].task.id,
        job.prerequisites[1].task.id,
        job.prerequisites[2].task.id,
    )
}

fn renders(job: &NewJob) -> Vec<TaskId> {
    sorted(job.render_tasks.iter().map(|t| t.id).collect())
}

/// `(kind, name, key, state, artifact, error)` of a job's prerequisites, in planning order.
type PrerequisiteRow = (
    PrerequisiteKind,
    String,
    String,
    CacheState,
    Option<String>,
    Option<String>,
);

async fn prerequisites_of(store: &dyn MetadataStore, job: JobId) -> Vec<PrerequisiteRow> {
    store
        .job_prerequisites(job)
        .await
        .expect("job_prerequisites")
        .into_iter()
        .map(|p| {
            (
                p.kind,
                p.name,
                p.cache_key,
                p.state,
                p.artifact_key,
                p.error,
            )
        })
        .collect()
}

/// The expected rows of [`job_with_characters`] with keys prefixed `p`, each `(state, artifact,
/// error)`.
fn expected_prerequisites(
    p: &str,
    states: [(CacheState, Option<&str>, Option<&str>); 3],
) -> Vec<PrerequisiteRow> {
    let (style, ana, bo) = keys(p);
    [
        (PrerequisiteKind::Style, "", style),
        (PrerequisiteKind::Anchors, "Ana", ana),
        (PrerequisiteKind::Anchors, "Bo", bo),
    ]
    .into_iter()
    .zip(states)
    .map(|((kind, name, key), (state, artifact, error))| {
        (
            kind,
            name.to_string(),
            key,
            state,
            artifact.map(String::from),
            error.map(String::from),
        )
    })
    .collect()
}

const PENDING: (CacheState, Option<&str>, Option<&str>) = (CacheState::Pending, None, None);

fn made(artifact: &str) -> TaskEventKind {
    TaskEventKind::Succeeded {
        frames: vec![],
        trajectory_key: Some(artifact.into()),
    }
}

/// Runs a prerequisite task to success (started, then succeeded with `artifact`) as worker `w1`,
/// returning the affected jobs.
async fn make(store: &dyn MetadataStore, task: TaskId, artifact: &str) -> Vec<JobId> {
    store
        .record_event(&event(task, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .expect("started");
    sorted(applied(
        store
            .record_event(&event(task, 1, 1, made(artifact)), &FAST)
            .await
            .expect("succeeded"),
    ))
}

fn event(task_id: TaskId, attempt: u32, seq: u64, kind: TaskEventKind) -> TaskEventRecord {
    TaskEventRecord {
        task_id,
        attempt,
        seq,
        worker_id: "w1".into(),
        kind,
    }
}

fn event_from(
    worker: &str,
    task_id: TaskId,
    attempt: u32,
    seq: u64,
    kind: TaskEventKind,
) -> TaskEventRecord {
    TaskEventRecord {
        worker_id: worker.into(),
        ..event(task_id, attempt, seq, kind)
    }
}

fn succeeded(frames: &[u32]) -> TaskEventKind {
    TaskEventKind::Succeeded {
        frames: frames
            .iter()
            .map(|&i| FrameArtifacts {
                index: i,
                png_key: format!("png{i}"),
                latents_key: format!("lat{i}"),
            })
            .collect(),
        trajectory_key: None,
    }
}

const FAST: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(1),
    max: Duration::from_millis(1),
};

async fn publish_all(store: &dyn MetadataStore) -> Vec<OutboxMessage> {
    let out = store.pending_outbox(1000).await.expect("pending_outbox");
    let ids: Vec<i64> = out.iter().map(|m| m.id).collect();
    store.mark_published(&ids).await.expect("mark_published");
    out
}

/// The tasks of the unpublished outbox rows, sorted (rows written by one statement have no order).
async fn outbox_tasks(store: &dyn MetadataStore) -> Vec<TaskId> {
    sorted(
        store
            .pending_outbox(1000)
            .await
            .expect("pending_outbox")
            .iter()
            .map(|m| m.task_id)
            .collect(),
    )
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

fn applied(outcome: EventOutcome) -> Vec<JobId> {
    match outcome {
        EventOutcome::Applied { affected_jobs, .. } => affected_jobs,
        other => panic!("expected the event to be applied, got {other:?}"),
    }
}

/// Everything written comes back equal, timestamps to the microsecond, seeds above `i64::MAX`.
pub async fn rows_read_back_as_written(store: Store) {
    let store = store.as_ref();
    let project = store.create_project("p").await.unwrap();
    assert_eq!(store.get_project(project.id).await.unwrap(), project);
    assert_eq!(store.list_projects().await.unwrap(), vec![project.clone()]);
    let reference = Reference {
        id: ReferenceId::new(),
        project_id: project.id,
        kind: ReferenceKind::Style,
        prompt: "a lighthouse".into(),
        name: String::new(),
        subject_words: vec![],
        image: Some(ReferenceImage {
            sha256: "ab".repeat(32),
            key: "sha256/ab/x.png".into(),
            width: 640,
            height: 480,
            size_bytes: 5_000_000_000,
        }),
        created_at: chrono::Utc::now(),
    };
    let stored_reference = store.create_reference(&reference).await.unwrap();
    assert_eq!(
        Reference {
            created_at: stored_reference.created_at,
            ..reference
        },
        stored_reference
    );
    assert_eq!(
        store.get_reference(stored_reference.id).await.unwrap(),
        stored_reference
    );

    let spec = spec_with(3, u64::MAX - 1);
    let stored = StoredStoryboard {
        spec: spec.clone(),
        reference_id: Some(stored_reference.id),
        character_references: vec![ReferenceId::new(), ReferenceId::new()],
    };
    let board = store
        .create_storyboard(project.id, "board", &stored)
        .await
        .unwrap();
    assert_eq!(store.get_storyboard(board.id).await.unwrap(), board);
    assert_eq!(board.stored, stored);

    let planned = NewJob {
        frames: spec.resolved_frames(),
        ..new_job(board.id, None)
    };
    let job = store.submit_job(&planned).await.unwrap();
    assert_eq!(store.get_job(job.id).await.unwrap(), job);
    assert_eq!(
        (
            job.state,
            job.frames_total,
            job.frames_succeeded,
            job.inversion_tasks,
            job.anchor_tasks,
            job.render_tasks,
            job.finished_at
        ),
        (JobState::Queued, 3, 0, 0, 0, 2, None)
    );
    assert!(store.job_prerequisites(job.id).await.unwrap().is_empty());
    assert_eq!(store.unfinished_jobs().await.unwrap(), vec![job.id]);
    let frames = store.list_frames(job.id).await.unwrap();
    let seeds: Vec<u64> = frames.iter().map(|f| f.seed).collect();
    assert_eq!(
        seeds,
        vec![u64::MAX - 1, u64::MAX, 0],
        "seeds wrap like frame_seed and round-trip"
    );
    assert_eq!(frames[1].prompt, "frame 1");
    assert_eq!(frames[1].task_id, Some(planned.render_tasks[0].id));
    assert_eq!(frames[2].task_id, Some(planned.render_tasks[1].id));
    assert!(frames
        .iter()
        .all(|f| f.state == FrameState::Pending && f.attempts == 0 && f.finished_at.is_none()));
    let out = store.pending_outbox(100).await.unwrap();
    let expected: Vec<(TaskId, u32, &str, &[u8])> = planned
        .render_tasks
        .iter()
        .map(|t| (t.id, 1, "sd", t.payload.as_slice()))
        .collect();
    let got: Vec<(TaskId, u32, &str, &[u8])> = out
        .iter()
        .map(|m| {
            (
                m.task_id,
                m.attempt,
                m.family.as_str(),
                m.payload.as_slice(),
            )
        })
        .collect();
    assert_eq!(got, expected, "outbox rows in the order they were written");
    assert!(out[0].id < out[1].id);
    assert_eq!(store.pending_outbox(1).await.unwrap().len(), 1, "limit");
    assert_eq!(store.inversion_trajectory("nothing").await.unwrap(), None);
}

pub async fn not_found_and_references(store: Store) {
    let store = store.as_ref();
    let missing = ProjectId::new();
    assert!(matches!(
        store.get_project(missing).await,
        Err(StoreError::NotFound {
            what: "project",
            ..
        })
    ));
    let reference = Reference {
        id: ReferenceId::new(),
        project_id: missing,
        kind: ReferenceKind::Style,
        prompt: "p".into(),
        name: String::new(),
        subject_words: vec![],
        image: Some(ReferenceImage {
            sha256: "ab".into(),
            key: "k".into(),
            width: 64,
            height: 64,
            size_bytes: 10,
        }),
        created_at: chrono::Utc::now(),
    };
    let error = store.create_reference(&reference).await.unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::NotFound {
                what: "project",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains(&missing.to_string()), "{error}");
    let stored = StoredStoryboard {
        spec: spec(),
        reference_id: None,
        character_references: vec![],
    };
    let error = store
        .create_storyboard(missing, "b", &stored)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::NotFound {
                what: "project",
                ..
            }
        ),
        "{error:?}"
    );
    let project = store.create_project("p").await.unwrap();
    let stored = store
        .create_reference(&Reference {
            project_id: project.id,
            ..reference.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .get_reference(stored.id)
            .await
            .unwrap()
            .image
            .map(|i| i.key),
        Some("k".to_string())
    );
    assert!(matches!(
        store.get_reference(ReferenceId::new()).await,
        Err(StoreError::NotFound {
            what: "reference",
            ..
        })
    ));
    assert!(matches!(
        store.get_storyboard(StoryboardId::new()).await,
        Err(StoreError::NotFound {
            what: "storyboard",
            ..
        })
    ));
    assert!(matches!(
        store.get_job(JobId::new()).await,
        Err(StoreError::NotFound { what: "job", .. })
    ));
    assert!(matches!(
        store.list_frames(JobId::new()).await,
        Err(StoreError::NotFound { what: "job", .. })
    ));
    assert!(matches!(
        store.job_prerequisites(JobId::new()).await,
        Err(StoreError::NotFound { what: "job", .. })
    ));
    assert!(matches!(
        store.cancel_job(JobId::new()).await,
        Err(StoreError::NotFound { what: "job", .. })
    ));
    let unknown_task = event(TaskId::new(), 1, 0, TaskEventKind::Started);
    assert!(matches!(
        store.record_event(&unknown_task, &FAST).await,
        Err(StoreError::NotFound { what: "task", .. })
    ));
    // Not recorded either: the same event for a task that exists later would not be a duplicate.
    assert!(matches!(
        store.record_event(&unknown_task, &FAST).await,
        Err(StoreError::NotFound { what: "task", .. })
    ));
    assert_eq!(store.list_projects().await.unwrap().len(), 1);
}

/// A job whose storyboard does not exist is refused by the foreign key, as a whole.
pub async fn job_of_a_missing_storyboard_leaves_nothing(store: Store) {
    let store = store.as_ref();
    let planned = new_job(StoryboardId::new(), Some("key-orphan"));
    let error = store.submit_job(&planned).await.unwrap_err();
    assert!(!error.is_retryable(), "{error:?}");
    assert!(matches!(
        store.get_job(planned.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.pending_outbox(100).await.unwrap().is_empty());
    assert!(store.unfinished_jobs().await.unwrap().is_empty());
    // The inversion claim was rolled back with the job: the next job claims it.
    let sb = storyboard(store).await;
    assert_eq!(
        store
            .submit_job(&new_job(sb, Some("key-orphan")))
            .await
            .unwrap()
            .inversion_tasks,
        1
    );
}

pub async fn inversion_is_claimed_once_and_releases_waiting_renders(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let first = new_job(sb, Some("key-1"));
    let job = store.submit_job(&first).await.unwrap();
    assert_eq!(
        (job.inversion_tasks, job.render_tasks, job.frames_total),
        (1, 2, 3)
    );
    // Only the inversion is dispatched; renders wait for it.
    let outbox = store.pending_outbox(100).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].task_id, inversion_of(&first));
    store.mark_published(&[outbox[0].id]).await.unwrap();

    // A second job with the same inversion key plans no inversion and waits too.
    let second = new_job(sb, Some("key-1"));
    let job2 = store.submit_job(&second).await.unwrap();
    assert_eq!(job2.inversion_tasks, 0);
    assert!(store.pending_outbox(100).await.unwrap().is_empty());
    assert_eq!(
        store.inversion_trajectory("key-1").await.unwrap(),
        None,
        "pending is not ready"
    );

    let inv = inversion_of(&first);
    store
        .record_event(&event(inv, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let done = TaskEventKind::Succeeded {
        frames: vec![],
        trajectory_key: Some("traj".into()),
    };
    let affected = applied(
        store
            .record_event(&event(inv, 1, 1, done.clone()), &FAST)
            .await
            .unwrap(),
    );
    assert_eq!(sorted(affected), sorted(vec![first.id, second.id]));
    assert_eq!(
        store
            .inversion_trajectory("key-1")
            .await
            .unwrap()
            .as_deref(),
        Some("traj")
    );
    // Both jobs' four render tasks are released.
    assert_eq!(store.pending_outbox(100).await.unwrap().len(), 4);
    // The same event again changes nothing.
    assert_eq!(
        store
            .record_event(&event(inv, 1, 1, done), &FAST)
            .await
            .unwrap(),
        EventOutcome::Duplicate
    );

    // A third job finds the inversion ready: renders are dispatched at once.
    let third = new_job(sb, Some("key-1"));
    let job3 = store.submit_job(&third).await.unwrap();
    assert_eq!(job3.inversion_tasks, 0);
    assert_eq!(store.pending_outbox(100).await.unwrap().len(), 6);
}

pub async fn farm_counts_follow_jobs_frames_and_tasks(store: Store) {
    let store = store.as_ref();
    let job_count =
        |c: &FarmCounts, state: JobState| c.jobs.iter().find(|(s, _)| *s == state).map(|(_, n)| *n);
    let frame_count = |c: &FarmCounts, state: FrameState| {
        c.frames.iter().find(|(s, _)| *s == state).map(|(_, n)| *n)
    };
    let task_count = |c: &FarmCounts, kind: TaskKind, state: &str| {
        c.tasks
            .iter()
            .find(|(k, s, _)| *k == kind && *s == state)
            .map(|(_, _, n)| *n)
    };
    let empty = store.farm_counts().await.unwrap();
    // Every state is listed, at zero.
    assert_eq!(empty.jobs.len(), 5);
    assert_eq!(empty.frames.len(), 5);
    assert_eq!(empty.tasks.len(), 3 * LIVE_TASK_STATES.len());
    assert!(empty.jobs.iter().all(|(_, n)| *n == 0));
    assert!(empty.tasks.iter().all(|(_, _, n)| *n == 0));
    assert_eq!((empty.busy_workers, empty.oldest_heartbeat_age), (0, None));

    let sb = storyboard(store).await;
    let planned = new_job(sb, Some("key-1"));
    store.submit_job(&planned).await.unwrap();
    let c = store.farm_counts().await.unwrap();
    assert_eq!(job_count(&c, JobState::Queued), Some(1));
    assert_eq!(frame_count(&c, FrameState::Pending), Some(3));
    assert_eq!(task_count(&c, TaskKind::Invert, "queued"), Some(1));
    assert_eq!(task_count(&c, TaskKind::Render, "waiting"), Some(2));

    let inv = inversion_of(&planned);
    store
        .record_event(&event(inv, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let c = store.farm_counts().await.unwrap();
    assert_eq!(task_count(&c, TaskKind::Invert, "running"), Some(1));
    assert_eq!(c.busy_workers, 1);
    let age = c.oldest_heartbeat_age.expect("a task runs");
    assert!(age < std::time::Duration::from_secs(60), "{age:?}");
    let done = TaskEventKind::Succeeded {
        frames: vec![],
        trajectory_key: Some("traj".into()),
    };
    store
        .record_event(&event(inv, 1, 1, done), &FAST)
        .await
        .unwrap();
    let c = store.farm_counts().await.unwrap();
    assert_eq!(task_count(&c, TaskKind::Invert, "running"), Some(0));
    assert_eq!(task_count(&c, TaskKind::Render, "queued"), Some(2));
    assert_eq!((c.busy_workers, c.oldest_heartbeat_age), (0, None));

    let (a, b) = (planned.render_tasks[0].id, planned.render_tasks[1].id);
    store
        .record_event(&event_from("w2", a, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    store
        .record_event(&event_from("w3", b, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let c = store.farm_counts().await.unwrap();
    assert_eq!(c.busy_workers, 2);
    assert_eq!(job_count(&c, JobState::Running), Some(1));
    assert_eq!(frame_count(&c, FrameState::Rendering), Some(3));
    store
        .record_event(&event_from("w2", a, 1, 1, succeeded(&[0, 1])), &FAST)
        .await
        .unwrap();
    let c = store.farm_counts().await.unwrap();
    assert_eq!(frame_count(&c, FrameState::Succeeded), Some(2));
    assert_eq!(frame_count(&c, FrameState::Rendering), Some(1));
    store
        .record_event(&event_from("w3", b, 1, 1, succeeded(&[2])), &FAST)
        .await
        .unwrap();
    // A finished job's frames are history: only the job itself is still counted.
    let c = store.farm_counts().await.unwrap();
    assert_eq!(job_count(&c, JobState::Succeeded), Some(1));
    assert_eq!(job_count(&c, JobState::Running), Some(0));
    assert!(c.frames.iter().all(|(_, n)| *n == 0), "{:?}", c.frames);
    assert!(c.tasks.iter().all(|(_, _, n)| *n == 0), "{:?}", c.tasks);
}

pub async fn frames_succeed_once_and_the_job_finishes(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let planned = new_job(sb, None);
    store.submit_job(&planned).await.unwrap();
    assert_eq!(store.pending_outbox(100).await.unwrap().len(), 2);
    let (a, b) = (planned.render_tasks[0].id, planned.render_tasks[1].id);
    store
        .record_event(&event(a, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let job = store.get_job(planned.id).await.unwrap();
    assert_eq!(job.state, JobState::Running);
    let frames = store.list_frames(planned.id).await.unwrap();
    assert_eq!(frames[0].state, FrameState::Rendering);
    assert_eq!(frames[0].attempts, 1);
    store
        .record_event(&event(a, 1, 1, succeeded(&[0, 1])), &FAST)
        .await
        .unwrap();
    // A redelivered copy of the task on another worker: its events are stale.
    let stale = store
        .record_event(&event_from("w2", a, 1, 7, succeeded(&[0, 1])), &FAST)
        .await
        .unwrap();
    assert!(
        matches!(
            stale,
            EventOutcome::Stale {
                cancelled: false,
                ..
            }
        ),
        "{stale:?}"
    );
    store
        .record_event(&event(b, 1, 0, succeeded(&[2])), &FAST)
        .await
        .unwrap();
    let job = store.get_job(planned.id).await.unwrap();
    assert_eq!((job.state, job.frames_succeeded), (JobState::Succeeded, 3));
    assert!(job.finished_at.is_some());
    assert!(store.unfinished_jobs().await.unwrap().is_empty());
    let frames = store.list_frames(planned.id).await.unwrap();
    assert_eq!(frames[2].png_key.as_deref(), Some("png2"));
    assert_eq!(frames[2].latents_key.as_deref(), Some("lat2"));
    let one = store.get_frame(planned.id, 2).await.unwrap();
    assert_eq!(
        (one.index, one.png_key.as_deref(), one.state),
        (2, Some("png2"), FrameState::Succeeded)
    );
    assert!(matches!(
        store.get_frame(planned.id, 3).await,
        Err(StoreError::NotFound { what: "frame", .. })
    ));
    assert!(matches!(
        store.get_frame(JobId::new(), 0).await,
        Err(StoreError::NotFound { what: "job", .. })
    ));
}

pub async fn retryable_failures_back_off_then_give_up(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let planned = new_job(sb, None);
    store.submit_job(&planned).await.unwrap();
    publish_all(store).await;
    let t = planned.render_tasks[0].id;
    let fail = |attempt, seq| {
        event(
            t,
            attempt,
            seq,
            TaskEventKind::Failed {
                reason: "gpu busy".into(),
                retryable: true,
            },
        )
    };
    for attempt in 1..=2 {
        store.record_event(&fail(attempt, 0), &FAST).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.release_due_retries().await.unwrap(), 1);
        let out = store.pending_outbox(100).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].task_id, out[0].attempt), (t, attempt + 1));
        store.mark_published(&[out[0].id]).await.unwrap();
        // The old attempt's late events change nothing.
        let late = store
            .record_event(&event(t, attempt, 5, succeeded(&[0, 1])), &FAST)
            .await
            .unwrap();
        assert!(matches!(late, EventOutcome::Stale { .. }), "{late:?}");
    }
    store.record_event(&fail(3, 0), &FAST).await.unwrap();
    let frames = store.list_frames(planned.id).await.unwrap();
    assert_eq!(frames[0].state, FrameState::Failed);
    assert!(
        frames[0]
            .error
            .as_deref()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{:?}",
        frames[0].error
    );
    // Frame 2 still open: the job is not finished until its task ends.
    assert_eq!(
        store.get_job(planned.id).await.unwrap().state,
        JobState::Queued
    );
    let other = planned.render_tasks[1].id;
    store
        .record_event(
            &event(
                other,
                1,
                0,
                TaskEventKind::Failed {
                    reason: "bad reference image".into(),
                    retryable: false,
                },
            ),
            &FAST,
        )
        .await
        .unwrap();
    let job = store.get_job(planned.id).await.unwrap();
    assert_eq!((job.state, job.frames_failed), (JobState::Failed, 3));
    assert!(job.error.unwrap().contains("3 frame(s) failed"));
}

/// A retry is not released before its backoff has passed.
pub async fn retries_wait_for_their_backoff(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let planned = new_job(sb, None);
    store.submit_job(&planned).await.unwrap();
    publish_all(store).await;
    let t = planned.render_tasks[0].id;
    store
        .record_event(&event(t, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let hour = RetryPolicy {
        base: Duration::from_secs(3600),
        max: Duration::from_secs(3600),
    };
    let failed = TaskEventKind::Failed {
        reason: "gpu busy".into(),
        retryable: true,
    };
    store
        .record_event(&event(t, 1, 1, failed), &hour)
        .await
        .unwrap();
    assert_eq!(
        store.release_due_retries().await.unwrap(),
        0,
        "an hour has not passed"
    );
    assert!(store.pending_outbox(100).await.unwrap().is_empty());
    let frames = store.list_frames(planned.id).await.unwrap();
    assert_eq!(
        (frames[0].state, frames[0].attempts),
        (FrameState::Pending, 1),
        "back to pending until the retry runs"
    );
    assert_eq!(
        store.get_job(planned.id).await.unwrap().state,
        JobState::Running
    );
}

pub async fn failed_inversion_fails_every_waiting_frame(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let planned = new_job(sb, Some("key-x"));
    store.submit_job(&planned).await.unwrap();
    let inv = inversion_of(&planned);
    let failed = TaskEventKind::Failed {
        reason: "cannot decode image".into(),
        retryable: false,
    };
    store
        .record_event(&event(inv, 1, 0, failed), &FAST)
        .await
        .unwrap();
    let frames = store.list_frames(planned.id).await.unwrap();
    assert!(
        frames.iter().all(|f| f.state == FrameState::Failed),
        "{frames:?}"
    );
    assert!(frames[0]
        .error
        .as_deref()
        .unwrap()
        .contains("inversion failed: cannot decode image"));
    assert_eq!(
        store.get_job(planned.id).await.unwrap().state,
        JobState::Failed
    );
    assert_eq!(store.inversion_trajectory("key-x").await.unwrap(), None);
    // A later job tries the inversion again.
    let again = new_job(sb, Some("key-x"));
    assert_eq!(store.submit_job(&again).await.unwrap().inversion_tasks, 1);
    let out = store.pending_outbox(100).await.unwrap();
    assert_eq!(out.last().map(|m| m.task_id), Some(inversion_of(&again)));
}

pub async fn cancel_stops_queued_work_and_flags_running_tasks(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let planned = new_job(sb, None);
    store.submit_job(&planned).await.unwrap();
    let out = store.pending_outbox(100).await.unwrap();
    store.mark_published(&[out[0].id]).await.unwrap();
    let running = planned.render_tasks[0].id;
    store
        .record_event(&event(running, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let (job, had_running) = store.cancel_job(planned.id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(job.finished_at.is_some());
    assert!(had_running);
    // The unpublished message of the queued task is gone.
    assert!(store.pending_outbox(100).await.unwrap().is_empty());
    let late = store
        .record_event(&event(running, 1, 1, TaskEventKind::Progress), &FAST)
        .await
        .unwrap();
    assert!(
        matches!(
            late,
            EventOutcome::Stale {
                cancelled: true,
                ..
            }
        ),
        "{late:?}"
    );
    let frames = store.list_frames(planned.id).await.unwrap();
    assert!(
        frames.iter().all(|f| f.state == FrameState::Cancelled),
        "{frames:?}"
    );
    assert!(store.unfinished_jobs().await.unwrap().is_empty());
    // Cancelling again is a no-op.
    let (again, had_running) = store.cancel_job(planned.id).await.unwrap();
    assert_eq!((again.state, had_running), (JobState::Cancelled, false));
    assert_eq!(again.finished_at, job.finished_at);

    // A job with nothing started has nothing to stop.
    let idle = new_job(sb, None);
    store.submit_job(&idle).await.unwrap();
    assert!(!store.cancel_job(idle.id).await.unwrap().1);
}

pub async fn sequence_numbers_are_per_worker(store: Store) {
    // A redelivered attempt runs on a second worker whose counter may repeat the first one's
    // numbers: its success must not be mistaken for a duplicate.
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let planned = new_job(sb, None);
    store.submit_job(&planned).await.unwrap();
    let t = planned.render_tasks[1].id;
    store
        .record_event(&event(t, 1, 5, TaskEventKind::Progress), &FAST)
        .await
        .unwrap();
    let second = event_from("w2", t, 1, 5, succeeded(&[2]));
    assert!(matches!(
        store.record_event(&second, &FAST).await.unwrap(),
        EventOutcome::Applied { .. }
    ));
    assert_eq!(
        store.record_event(&second, &FAST).await.unwrap(),
        EventOutcome::Duplicate
    );
    assert_eq!(
        store.list_frames(planned.id).await.unwrap()[2].state,
        FrameState::Succeeded
    );
}

/// `finished_at` is set once, when a frame succeeds, fails or is cancelled, in the transaction
/// that finishes it; retries and late events leave it alone.
pub async fn frames_record_when_they_finished(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let planned = new_job(sb, None);
    let job = store.submit_job(&planned).await.unwrap();
    publish_all(store).await;
    let (a, b) = (planned.render_tasks[0].id, planned.render_tasks[1].id);
    store
        .record_event(&event(a, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let retry = TaskEventKind::Failed {
        reason: "gpu busy".into(),
        retryable: true,
    };
    store
        .record_event(&event(a, 1, 1, retry), &FAST)
        .await
        .unwrap();
    let frames = store.list_frames(planned.id).await.unwrap();
    assert!(
        frames.iter().all(|f| f.finished_at.is_none()),
        "a retry finishes nothing: {frames:?}"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.release_due_retries().await.unwrap(), 1);
    store
        .record_event(&event(a, 2, 0, succeeded(&[0, 1])), &FAST)
        .await
        .unwrap();
    let frames = store.list_frames(planned.id).await.unwrap();
    let done = frames[0]
        .finished_at
        .expect("a succeeded frame has finished_at");
    assert_eq!(
        frames[1].finished_at,
        Some(done),
        "one transaction, one time"
    );
    assert!(
        done >= job.created_at,
        "{done} before the job was created ({})",
        job.created_at
    );
    assert_eq!(frames[2].finished_at, None);

    // Late and duplicate events do not move it.
    store
        .record_event(&event_from("w2", a, 2, 0, succeeded(&[0, 1])), &FAST)
        .await
        .unwrap();
    assert_eq!(
        store
            .record_event(&event(a, 2, 0, succeeded(&[0, 1])), &FAST)
            .await
            .unwrap(),
        EventOutcome::Duplicate
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    let permanent = TaskEventKind::Failed {
        reason: "unsupported model".into(),
        retryable: false,
    };
    store
        .record_event(&event(b, 1, 0, permanent), &FAST)
        .await
        .unwrap();
    let frames = store.list_frames(planned.id).await.unwrap();
    assert_eq!(frames[0].finished_at, Some(done));
    let failed_at = frames[2]
        .finished_at
        .expect("a failed frame has finished_at");
    assert!(failed_at > done, "{failed_at} not after {done}");
    let job = store.get_job(planned.id).await.unwrap();
    assert_eq!(
        job.finished_at,
        Some(failed_at),
        "the job finished with its last frame"
    );

    // Cancelled frames finish with their job; finished frames keep their time.
    let cancelled = new_job(sb, None);
    store.submit_job(&cancelled).await.unwrap();
    let c = cancelled.render_tasks[1].id;
    store
        .record_event(&event(c, 1, 0, succeeded(&[2])), &FAST)
        .await
        .unwrap();
    let before = store.list_frames(cancelled.id).await.unwrap()[2]
        .finished_at
        .expect("succeeded");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (job, _) = store.cancel_job(cancelled.id).await.unwrap();
    let frames = store.list_frames(cancelled.id).await.unwrap();
    assert_eq!(
        (frames[0].state, frames[0].finished_at),
        (FrameState::Cancelled, job.finished_at)
    );
    assert_eq!(
        (frames[1].state, frames[1].finished_at),
        (FrameState::Cancelled, job.finished_at)
    );
    assert_eq!(
        (frames[2].state, frames[2].finished_at),
        (FrameState::Succeeded, Some(before))
    );
    assert!(job.finished_at > Some(before));
}

/// After a restart of a queue that lost its deliveries, queued and running tasks of unfinished
/// jobs are dispatched again at the attempt they were at, once.
pub async fn lost_deliveries_are_requeued_at_their_attempt(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    // Job A: task 0 running on w1 (attempt 1), task 1 queued at attempt 2 after a retry.
    let a = new_job(sb, None);
    store.submit_job(&a).await.unwrap();
    publish_all(store).await;
    let (a0, a1) = (a.render_tasks[0].id, a.render_tasks[1].id);
    store
        .record_event(&event(a0, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let retry = TaskEventKind::Failed {
        reason: "gpu busy".into(),
        retryable: true,
    };
    store
        .record_event(&event(a1, 1, 1, retry), &FAST)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.release_due_retries().await.unwrap(), 1);
    publish_all(store).await;
    // Job C: finished. Job B: submitted, its messages not yet published.
    let c = new_job(sb, None);
    store.submit_job(&c).await.unwrap();
    publish_all(store).await;
    store
        .record_event(
            &event(c.render_tasks[0].id, 1, 0, succeeded(&[0, 1])),
            &FAST,
        )
        .await
        .unwrap();
    store
        .record_event(&event(c.render_tasks[1].id, 1, 0, succeeded(&[2])), &FAST)
        .await
        .unwrap();
    assert_eq!(
        store.get_job(c.id).await.unwrap().state,
        JobState::Succeeded
    );
    let b = new_job(sb, None);
    store.submit_job(&b).await.unwrap();

    // Scoped to job C (finished) or B (its rows are unpublished): nothing to requeue; scoped to
    // A: only A's two tasks.
    assert_eq!(store.requeue_lost_deliveries(Some(c.id)).await.unwrap(), 0);
    assert_eq!(store.requeue_lost_deliveries(Some(b.id)).await.unwrap(), 0);
    assert_eq!(store.requeue_lost_deliveries(Some(a.id)).await.unwrap(), 2);
    assert_eq!(
        store.requeue_lost_deliveries(None).await.unwrap(),
        0,
        "A's tasks have unpublished rows now"
    );
    let out: Vec<(TaskId, u32)> = store
        .pending_outbox(100)
        .await
        .unwrap()
        .iter()
        .map(|m| (m.task_id, m.attempt))
        .collect();
    let expected = vec![
        (a0, 1),
        (a1, 2),
        (b.render_tasks[0].id, 1),
        (b.render_tasks[1].id, 1),
    ];
    assert_eq!(
        sorted(out),
        sorted(expected),
        "A's tasks at their attempts, B's rows not duplicated, nothing of C"
    );
    let frames = store.list_frames(a.id).await.unwrap();
    assert_eq!(
        (frames[0].state, frames[0].attempts),
        (FrameState::Pending, 0),
        "the interrupted render is given back"
    );
    assert_eq!(store.get_job(a.id).await.unwrap().state, JobState::Running);
    // Once requeued, they have unpublished rows: requeueing again adds nothing.
    assert_eq!(store.requeue_lost_deliveries(None).await.unwrap(), 0);
    assert_eq!(store.pending_outbox(100).await.unwrap().len(), 4);

    // The new run's worker (a new id, its counter from 0) runs the same attempts to the end.
    publish_all(store).await;
    store
        .record_event(&event_from("w2", a0, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let frames = store.list_frames(a.id).await.unwrap();
    assert_eq!(
        (frames[0].state, frames[0].attempts),
        (FrameState::Rendering, 1)
    );
    applied(
        store
            .record_event(&event_from("w2", a0, 1, 1, succeeded(&[0, 1])), &FAST)
            .await
            .unwrap(),
    );
    applied(
        store
            .record_event(&event_from("w2", a1, 2, 2, succeeded(&[2])), &FAST)
            .await
            .unwrap(),
    );
    let job = store.get_job(a.id).await.unwrap();
    assert_eq!((job.state, job.frames_succeeded), (JobState::Succeeded, 3));
    // The old worker's last words are stale now.
    let late = store
        .record_event(&event(a0, 1, 9, TaskEventKind::Heartbeat), &FAST)
        .await
        .unwrap();
    assert!(
        matches!(
            late,
            EventOutcome::Stale {
                cancelled: false,
                ..
            }
        ),
        "{late:?}"
    );

    // B's published messages are lost by the next restart; A and C are finished.
    assert_eq!(store.requeue_lost_deliveries(None).await.unwrap(), 2);
    assert_eq!(
        outbox_tasks(store).await,
        sorted(vec![b.render_tasks[0].id, b.render_tasks[1].id])
    );
}

/// A cancelled job's inversion that another job's renders wait for keeps running after cancel;
/// if its delivery is lost it is requeued too, or the waiting job would never finish.
pub async fn lost_inversion_of_a_cancelled_job_still_serves_its_waiters(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let x = new_job(sb, Some("key-shared"));
    store.submit_job(&x).await.unwrap();
    publish_all(store).await;
    let inv = inversion_of(&x);
    store
        .record_event(&event(inv, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let y = new_job(sb, Some("key-shared"));
    store.submit_job(&y).await.unwrap();
    let (cancelled, had_running) = store.cancel_job(x.id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(
        !had_running,
        "the inversion was kept for job Y, so nothing of X must stop"
    );

    // Resuming job Y requeues the inversion Y waits for, though it belongs to job X.
    assert_eq!(store.requeue_lost_deliveries(Some(y.id)).await.unwrap(), 1);
    let out = publish_all(store).await;
    assert_eq!(
        out.iter()
            .map(|m| (m.task_id, m.attempt))
            .collect::<Vec<_>>(),
        vec![(inv, 1)],
        "Y's renders still wait"
    );
    let done = TaskEventKind::Succeeded {
        frames: vec![],
        trajectory_key: Some("traj".into()),
    };
    store
        .record_event(&event_from("w2", inv, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let affected = applied(
        store
            .record_event(&event_from("w2", inv, 1, 1, done), &FAST)
            .await
            .unwrap(),
    );
    assert!(affected.contains(&y.id), "{affected:?}");
    assert_eq!(
        outbox_tasks(store).await,
        sorted(vec![y.render_tasks[0].id, y.render_tasks[1].id])
    );
    assert_eq!(
        store.get_job(x.id).await.unwrap().state,
        JobState::Cancelled
    );
}

/// References of both kinds, with and without an image, come back as written; a character keeps
/// its name and subject words.
pub async fn references_of_every_kind_round_trip(store: Store) {
    let store = store.as_ref();
    let project = store.create_project("p").await.unwrap();
    let image = |n: u8| ReferenceImage {
        sha256: format!("{n:02x}").repeat(32),
        key: format!("sha256/{n:02x}/x.png"),
        width: 512 + u32::from(n),
        height: 768,
        size_bytes: 4_000_000_000 + u64::from(n),
    };
    let references = [
        (
            ReferenceKind::Style,
            "a watercolour",
            "",
            vec![],
            Some(image(1)),
        ),
        (ReferenceKind::Style, "ink and wash", "", vec![], None),
        (
            ReferenceKind::Character,
            "a girl with a red scarf",
            "Ana",
            vec!["girl".to_string(), "scarf".to_string()],
            Some(image(2)),
        ),
        (
            ReferenceKind::Character,
            "an old grey dog",
            "Bo",
            vec!["dog".to_string()],
            None,
        ),
    ];
    for (kind, prompt, name, subject_words, image) in references {
        let reference = Reference {
            id: ReferenceId::new(),
            project_id: project.id,
            kind,
            prompt: prompt.into(),
            name: name.into(),
            subject_words,
            image,
            created_at: chrono::Utc::now(),
        };
        let stored = store.create_reference(&reference).await.unwrap();
        assert_eq!(
            Reference {
                created_at: stored.created_at,
                ..reference
            },
            stored
        );
        assert_eq!(store.get_reference(stored.id).await.unwrap(), stored);
    }
}

/// A plan whose tasks need a key no prerequisite of the job produces (they would wait forever)
/// is refused, and writes nothing.
pub async fn plans_with_unknown_needs_are_refused(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let mut render_needs_unknown = new_job(sb, Some("key-1"));
    render_needs_unknown.render_tasks[1]
        .needs
        .push("nobody-makes-this".into());
    let mut anchors_need_later = job_with_characters(sb, "u");
    anchors_need_later.prerequisites[1].task.needs = vec!["u-bo".into()];
    let mut wrong_kind = job_with_characters(sb, "v");
    wrong_kind.prerequisites[1].task.kind = TaskKind::Invert;
    for planned in [render_needs_unknown, anchors_need_later, wrong_kind] {
        let error = store.submit_job(&planned).await.unwrap_err();
        assert!(
            matches!(error, StoreError::Corrupt { .. }) && !error.is_retryable(),
            "{error:?}"
        );
        assert!(matches!(
            store.get_job(planned.id).await,
            Err(StoreError::NotFound { .. })
        ));
    }
    assert!(store.pending_outbox(100).await.unwrap().is_empty());
    // Nothing was claimed: the next job computes them.
    let job = store
        .submit_job(&job_with_characters(sb, "u"))
        .await
        .unwrap();
    assert_eq!((job.inversion_tasks, job.anchor_tasks), (1, 2));
    assert_eq!(
        store
            .submit_job(&new_job(sb, Some("key-1")))
            .await
            .unwrap()
            .inversion_tasks,
        1
    );
}

/// The style's inversion runs first; its success releases the anchor tasks only; each render is
/// released when the last prerequisite it needs is ready, not before.
pub async fn prerequisites_release_tasks_as_their_needs_become_ready(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let planned = job_with_characters(sb, "c1");
    let (style, ana, bo) = prerequisite_tasks(&planned);
    let job = store.submit_job(&planned).await.unwrap();
    assert_eq!(
        (
            job.inversion_tasks,
            job.anchor_tasks,
            job.render_tasks,
            job.state
        ),
        (1, 2, 2, JobState::Queued)
    );
    assert_eq!(store.get_job(planned.id).await.unwrap(), job);
    assert_eq!(outbox_tasks(store).await, vec![style], "only the inversion");
    assert_eq!(
        prerequisites_of(store, planned.id).await,
        expected_prerequisites("c1", [PENDING; 3])
    );
    publish_all(store).await;

    assert_eq!(make(store, style, "traj-c1").await, vec![planned.id]);
    assert_eq!(
        outbox_tasks(store).await,
        sorted(vec![ana, bo]),
        "the style releases the anchor tasks only"
    );
    assert_eq!(
        store
            .inversion_trajectory("c1-style")
            .await
            .unwrap()
            .as_deref(),
        Some("traj-c1")
    );
    publish_all(store).await;

    assert_eq!(make(store, ana, "anchors-ana").await, vec![planned.id]);
    assert!(
        outbox_tasks(store).await.is_empty(),
        "every render still needs Bo"
    );
    assert_eq!(
        prerequisites_of(store, planned.id).await,
        expected_prerequisites(
            "c1",
            [
                (CacheState::Ready, Some("traj-c1"), None),
                (CacheState::Ready, Some("anchors-ana"), None),
                PENDING
            ]
        )
    );
    assert_eq!(make(store, bo, "anchors-bo").await, vec![planned.id]);
    assert_eq!(outbox_tasks(store).await, renders(&planned));
    assert_eq!(
        store
            .inversion_trajectory("c1-bo")
            .await
            .unwrap()
            .as_deref(),
        Some("anchors-bo"),
        "any cache entry, not only inversions"
    );
    assert_eq!(
        prerequisites_of(store, planned.id).await,
        expected_prerequisites(
            "c1",
            [
                (CacheState::Ready, Some("traj-c1"), None),
                (CacheState::Ready, Some("anchors-ana"), None),
                (CacheState::Ready, Some("anchors-bo"), None)
            ]
        )
    );
    let job = store.get_job(planned.id).await.unwrap();
    assert_eq!((job.state, job.frames_succeeded), (JobState::Running, 0));
    publish_all(store).await;
    let (both, only_bo) = (planned.render_tasks[0].id, planned.render_tasks[1].id);
    store
        .record_event(&event(both, 1, 0, succeeded(&[0, 1])), &FAST)
        .await
        .unwrap();
    store
        .record_event(&event(only_bo, 1, 0, succeeded(&[2])), &FAST)
        .await
        .unwrap();
    let job = store.get_job(planned.id).await.unwrap();
    assert_eq!((job.state, job.frames_succeeded), (JobState::Succeeded, 3));

    // The other order: Bo first releases the render that shows only Bo, at once.
    let planned = job_with_characters(sb, "c2");
    let (style, ana, bo) = prerequisite_tasks(&planned);
    store.submit_job(&planned).await.unwrap();
    make(store, style, "traj-c2").await;
    publish_all(store).await;
    make(store, bo, "anchors-bo-2").await;
    assert_eq!(
        outbox_tasks(store).await,
        vec![planned.render_tasks[1].id],
        "the render that needs Bo only"
    );
    publish_all(store).await;
    make(store, ana, "anchors-ana-2").await;
    assert_eq!(outbox_tasks(store).await, vec![planned.render_tasks[0].id]);
}

/// Jobs with the same prerequisites share them: one computed is computed for all, one being
/// computed is waited for, neither makes a task.
pub async fn prerequisites_are_shared_between_jobs(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let first = job_with_characters(sb, "s");
    let (style, ana, bo) = prerequisite_tasks(&first);
    store.submit_job(&first).await.unwrap();
    publish_all(store).await;

    // Submitted while everything is pending: no task of its own, everything waits.
    let second = job_with_characters(sb, "s");
    let job = store.submit_job(&second).await.unwrap();
    assert_eq!(
        (job.inversion_tasks, job.anchor_tasks, job.render_tasks),
        (0, 0, 2)
    );
    assert!(outbox_tasks(store).await.is_empty());
    assert_eq!(
        prerequisites_of(store, second.id).await,
        expected_prerequisites("s", [PENDING; 3])
    );

    assert_eq!(
        make(store, style, "traj-s").await,
        sorted(vec![first.id, second.id]),
        "both jobs had tasks waiting for the style"
    );
    assert_eq!(outbox_tasks(store).await, sorted(vec![ana, bo]));
    publish_all(store).await;

    // Submitted while the anchors are pending (the style is ready): waits for the anchors only.
    let third = job_with_characters(sb, "s");
    let job = store.submit_job(&third).await.unwrap();
    assert_eq!((job.inversion_tasks, job.anchor_tasks), (0, 0));
    assert!(outbox_tasks(store).await.is_empty());
    assert_eq!(
        prerequisites_of(store, third.id).await,
        expected_prerequisites(
            "s",
            [(CacheState::Ready, Some("traj-s"), None), PENDING, PENDING]
        )
    );

    assert_eq!(
        make(store, ana, "anchors-ana").await,
        sorted(vec![first.id, second.id, third.id])
    );
    assert!(outbox_tasks(store).await.is_empty());
    assert_eq!(
        make(store, bo, "anchors-bo").await,
        sorted(vec![first.id, second.id, third.id])
    );
    let mut released = renders(&first);
    released.extend(renders(&second));
    released.extend(renders(&third));
    assert_eq!(
        outbox_tasks(store).await,
        sorted(released),
        "the first job's anchors release every job's renders"
    );
    publish_all(store).await;

    // Submitted once everything is ready: its renders are queued at once.
    let fourth = job_with_characters(sb, "s");
    let job = store.submit_job(&fourth).await.unwrap();
    assert_eq!(
        (job.inversion_tasks, job.anchor_tasks, job.render_tasks),
        (0, 0, 2)
    );
    assert_eq!(outbox_tasks(store).await, renders(&fourth));
    assert_eq!(
        prerequisites_of(store, fourth.id).await,
        expected_prerequisites(
            "s",
            [
                (CacheState::Ready, Some("traj-s"), None),
                (CacheState::Ready, Some("anchors-ana"), None),
                (CacheState::Ready, Some("anchors-bo"), None)
            ]
        )
    );
    // A job that needs only some of them (no style: the anchors of an unstyled board differ) makes
    // tasks for what is missing only.
    let mixed = NewJob {
        prerequisites: vec![
            prerequisite(PrerequisiteKind::Anchors, "Ana", "s-ana", &[]),
            prerequisite(PrerequisiteKind::Anchors, "Cy", "s-cy", &[]),
        ],
        render_tasks: vec![
            needing(task(TaskKind::Render, vec![0, 1]), &["s-ana"]),
            needing(task(TaskKind::Render, vec![2]), &["s-ana", "s-cy"]),
        ],
        ..new_job(sb, None)
    };
    publish_all(store).await;
    let job = store.submit_job(&mixed).await.unwrap();
    assert_eq!((job.inversion_tasks, job.anchor_tasks), (0, 1));
    assert_eq!(
        outbox_tasks(store).await,
        sorted(vec![
            mixed.prerequisites[1].task.id,
            mixed.render_tasks[0].id
        ])
    );
}

/// A style inversion that fails for good fails the anchor tasks waiting for it (and their cache
/// entries), and every render waiting for either, each with a reason naming what failed; a later
/// job tries them all again.
pub async fn failed_style_fails_the_anchors_and_renders_waiting_for_it(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let (style_key, ana_key, bo_key) = keys("f");
    let mut first = job_with_characters(sb, "f");
    // Frame 2 shows Ana and needs only her anchors: it fails through them.
    first.render_tasks[1].needs = vec![ana_key.clone()];
    let (style, ana, _) = prerequisite_tasks(&first);
    store.submit_job(&first).await.unwrap();
    let second = job_with_characters(sb, "f");
    store.submit_job(&second).await.unwrap();
    publish_all(store).await;

    let failed = TaskEventKind::Failed {
        reason: "cannot decode image".into(),
        retryable: false,
    };
    let affected = applied(
        store
            .record_event(&event(style, 1, 0, failed), &FAST)
            .await
            .unwrap(),
    );
    assert_eq!(sorted(affected), sorted(vec![first.id, second.id]));
    let style_failed = "style reference inversion failed: cannot decode image";
    let ana_failed = format!("anchors of character Ana failed: {style_failed}");
    assert_eq!(
        prerequisites_of(store, first.id).await,
        expected_prerequisites(
            "f",
            [
                (CacheState::Failed, None, Some("cannot decode image")),
                (CacheState::Failed, None, Some(style_failed)),
                (CacheState::Failed, None, Some(style_failed)),
            ]
        )
    );
    let errors = |frames: Vec<Frame>| -> Vec<(FrameState, Option<String>)> {
        frames.into_iter().map(|f| (f.state, f.error)).collect()
    };
    assert_eq!(
        errors(store.list_frames(first.id).await.unwrap()),
        vec![
            (FrameState::Failed, Some(style_failed.to_string())),
            (FrameState::Failed, Some(style_failed.to_string())),
            (FrameState::Failed, Some(ana_failed.clone())),
        ]
    );
    assert_eq!(
        errors(store.list_frames(second.id).await.unwrap()),
        vec![(FrameState::Failed, Some(style_failed.to_string())); 3]
    );
    for job in [first.id, second.id] {
        let job = store.get_job(job).await.unwrap();
        assert_eq!((job.state, job.frames_failed), (JobState::Failed, 3));
        assert!(job.finished_at.is_some());
    }
    // The anchor task failed with them: its late events are stale, and nothing was released.
    let late = store
        .record_event(&event(ana, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    assert!(
        matches!(
            late,
            EventOutcome::Stale {
                cancelled: false,
                ..
            }
        ),
        "{late:?}"
    );
    assert!(outbox_tasks(store).await.is_empty());
    assert!(store.unfinished_jobs().await.unwrap().is_empty());
    for key in [&style_key, &ana_key, &bo_key] {
        assert_eq!(store.inversion_trajectory(key).await.unwrap(), None);
    }

    // A later job retries all three.
    let again = job_with_characters(sb, "f");
    let job = store.submit_job(&again).await.unwrap();
    assert_eq!((job.inversion_tasks, job.anchor_tasks), (1, 2));
    assert_eq!(
        outbox_tasks(store).await,
        vec![again.prerequisites[0].task.id]
    );
    assert_eq!(
        prerequisites_of(store, again.id).await,
        expected_prerequisites("f", [PENDING; 3])
    );

    // Anchors that fail by themselves name their character.
    let unstyled = NewJob {
        prerequisites: vec![prerequisite(PrerequisiteKind::Anchors, "Cy", "f-cy", &[])],
        render_tasks: vec![
            needing(task(TaskKind::Render, vec![0, 1]), &["f-cy"]),
            task(TaskKind::Render, vec![2]),
        ],
        ..new_job(sb, None)
    };
    store.submit_job(&unstyled).await.unwrap();
    let oom = TaskEventKind::Failed {
        reason: "out of memory".into(),
        retryable: true,
    };
    let cy = unstyled.prerequisites[0].task.id;
    store
        .record_event(&event(cy, 1, 0, oom.clone()), &FAST)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.release_due_retries().await.unwrap(), 1);
    assert_eq!(
        store.list_frames(unstyled.id).await.unwrap()[0].state,
        FrameState::Pending,
        "a retried anchor task fails nothing yet"
    );
    let oom_again = TaskEventKind::Failed {
        reason: "out of memory".into(),
        retryable: false,
    };
    store
        .record_event(&event(cy, 2, 0, oom_again), &FAST)
        .await
        .unwrap();
    assert_eq!(
        errors(store.list_frames(unstyled.id).await.unwrap()),
        vec![
            (
                FrameState::Failed,
                Some("anchors of character Cy failed: out of memory".into())
            ),
            (
                FrameState::Failed,
                Some("anchors of character Cy failed: out of memory".into())
            ),
            (FrameState::Pending, None),
        ]
    );
    assert_eq!(
        store.get_job(unstyled.id).await.unwrap().state,
        JobState::Queued,
        "frame 2 needs no anchors and is still to render"
    );
}

/// Cancelling a job keeps the prerequisite tasks other jobs wait for (and, of this job, what they
/// wait for in turn); the pending entries of the prerequisites it cancels are given up, so the
/// next job computes them.
pub async fn cancel_keeps_prerequisites_other_jobs_wait_for(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let a = job_with_characters(sb, "k");
    let (style, ana, bo) = prerequisite_tasks(&a);
    store.submit_job(&a).await.unwrap();
    publish_all(store).await;
    make(store, style, "traj-k").await;
    publish_all(store).await;
    store
        .record_event(&event(ana, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let b = job_with_characters(sb, "k");
    store.submit_job(&b).await.unwrap();
    let (cancelled, had_running) = store.cancel_job(a.id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(
        !had_running,
        "the running anchor task was kept for job B, so nothing of A must stop"
    );
    assert!(store
        .list_frames(a.id)
        .await
        .unwrap()
        .iter()
        .all(|f| f.state == FrameState::Cancelled));
    // A's anchor tasks go on and release B.
    let affected = applied(
        store
            .record_event(&event(ana, 1, 1, made("anchors-ana")), &FAST)
            .await
            .unwrap(),
    );
    assert_eq!(sorted(affected), sorted(vec![a.id, b.id]));
    assert_eq!(
        make(store, bo, "anchors-bo").await,
        sorted(vec![a.id, b.id])
    );
    assert_eq!(outbox_tasks(store).await, renders(&b));
    assert_eq!(
        store.get_job(a.id).await.unwrap().state,
        JobState::Cancelled
    );
    publish_all(store).await;

    // Nobody else needs them: cancelled, and their pending entries given up.
    let x = job_with_characters(sb, "n");
    let (style, ana, _) = prerequisite_tasks(&x);
    store.submit_job(&x).await.unwrap();
    publish_all(store).await;
    make(store, style, "traj-n").await;
    publish_all(store).await;
    store
        .record_event(&event(ana, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let (_, had_running) = store.cancel_job(x.id).await.unwrap();
    assert!(had_running, "X's running anchor task must stop");
    assert_eq!(
        prerequisites_of(store, x.id).await,
        expected_prerequisites(
            "n",
            [(CacheState::Ready, Some("traj-n"), None), PENDING, PENDING]
        )
    );
    let late = store
        .record_event(&event(ana, 1, 1, made("anchors-ana-n")), &FAST)
        .await
        .unwrap();
    assert!(
        matches!(
            late,
            EventOutcome::Stale {
                cancelled: true,
                ..
            }
        ),
        "{late:?}"
    );
    assert_eq!(store.inversion_trajectory("n-ana").await.unwrap(), None);
    let y = job_with_characters(sb, "n");
    let job = store.submit_job(&y).await.unwrap();
    assert_eq!(
        (job.inversion_tasks, job.anchor_tasks),
        (0, 2),
        "the style stays ready; the anchors are claimed again"
    );
    assert_eq!(
        outbox_tasks(store).await,
        sorted(vec![y.prerequisites[1].task.id, y.prerequisites[2].task.id])
    );
    publish_all(store).await;

    // Kept in turn: P's style is waited for only by P's anchor task, which Q waits for.
    let p = job_with_characters(sb, "t");
    let (style, ana, bo) = prerequisite_tasks(&p);
    store.submit_job(&p).await.unwrap();
    publish_all(store).await;
    let q = NewJob {
        prerequisites: vec![
            prerequisite(PrerequisiteKind::Style, "", "t-style", &[]),
            prerequisite(PrerequisiteKind::Anchors, "Ana", "t-ana", &["t-style"]),
        ],
        render_tasks: vec![
            needing(task(TaskKind::Render, vec![0, 1]), &["t-ana"]),
            needing(task(TaskKind::Render, vec![2]), &["t-ana"]),
        ],
        ..new_job(sb, None)
    };
    let job = store.submit_job(&q).await.unwrap();
    assert_eq!((job.inversion_tasks, job.anchor_tasks), (0, 0));
    store.cancel_job(p.id).await.unwrap();
    assert_eq!(
        make(store, style, "traj-t").await,
        vec![p.id],
        "P's style task was kept for its anchor task, kept for Q"
    );
    assert_eq!(
        outbox_tasks(store).await,
        vec![ana],
        "Bo's anchors were cancelled"
    );
    let late = store
        .record_event(&event(bo, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    assert!(
        matches!(
            late,
            EventOutcome::Stale {
                cancelled: true,
                ..
            }
        ),
        "{late:?}"
    );
    publish_all(store).await;
    assert_eq!(
        make(store, ana, "anchors-t").await,
        sorted(vec![p.id, q.id])
    );
    assert_eq!(outbox_tasks(store).await, renders(&q));
}

/// An anchor task of a cancelled job that another job waits for is requeued with that job's
/// lost deliveries, as an inversion is.
pub async fn lost_anchor_task_of_a_cancelled_job_still_serves_its_waiters(store: Store) {
    let store = store.as_ref();
    let sb = storyboard(store).await;
    let a = job_with_characters(sb, "l");
    let (style, ana, bo) = prerequisite_tasks(&a);
    store.submit_job(&a).await.unwrap();
    publish_all(store).await;
    make(store, style, "traj-l").await;
    publish_all(store).await;
    store
        .record_event(&event(ana, 1, 0, TaskEventKind::Started), &FAST)
        .await
        .unwrap();
    let b = job_with_characters(sb, "l");
    store.submit_job(&b).await.unwrap();
    let (_, had_running) = store.cancel_job(a.id).await.unwrap();
    assert!(!had_running);
    // An unrelated interrupted job is left alone when only B resumes.
    let other = new_job(sb, None);
    store.submit_job(&other).await.unwrap();
    publish_all(store).await;

    assert_eq!(store.requeue_lost_deliveries(Some(b.id)).await.unwrap(), 2);
    let out: Vec<(TaskId, u32)> = publish_all(store)
        .await
        .iter()
        .map(|m| (m.task_id, m.attempt))
        .collect();
    assert_eq!(
        sorted(out),
        sorted(vec![(ana, 1), (bo, 1)]),
        "A's anchor tasks that B waits for; B's renders still wait"
    );
    assert_eq!(
        store.requeue_lost_deliveries(None).await.unwrap(),
        4,
        "everything again, the other job's renders too"
    );
    publish_all(store).await;
    make(store, ana, "anchors-ana").await;
    assert!(outbox_tasks(store).await.is_empty());
    store
        .record_event(&event_from("w2", bo, 1, 0, made("anchors-bo")), &FAST)
        .await
        .unwrap();
    assert_eq!(outbox_tasks(store).await, renders(&b));
}

/// The coordinator calls the store from several tasks at once: event ingestion for many workers,
/// the dispatcher, and API calls (submits, reads, cancels). Everything must apply exactly once,
/// without busy errors.
pub async fn concurrent_workers_dispatcher_and_api(store: Store) {
    hammer(vec![store]).await;
}

/// [`concurrent_workers_dispatcher_and_api`] over several handles of one database (for SQLite:
/// two stores on one file, as two processes would be), callers spread over the handles.
pub async fn hammer(stores: Vec<Store>) {
    const TASKS: u32 = 16;
    const WORKERS: u32 = 8;
    const API_JOBS: usize = 8;
    let pick = |i: usize| stores[i % stores.len()].clone();
    let store = pick(0);
    let sb = storyboard_of(store.as_ref(), spec_with(TASKS as usize, 7)).await;
    let planned = NewJob {
        id: JobId::new(),
        storyboard_id: sb,
        frames: spec_with(TASKS as usize, 7).resolved_frames(),
        prerequisites: vec![],
        render_tasks: (0..TASKS)
            .map(|i| task(TaskKind::Render, vec![i]))
            .collect(),
    };
    store.submit_job(&planned).await.unwrap();

    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let store = pick(w as usize);
        let mine: Vec<(u32, TaskId)> = (w..TASKS)
            .step_by(WORKERS as usize)
            .map(|i| (i, planned.render_tasks[i as usize].id))
            .collect();
        handles.push(tokio::spawn(async move {
            let worker = format!("w{w}");
            for (index, t) in mine {
                let kinds = [
                    TaskEventKind::Started,
                    TaskEventKind::Heartbeat,
                    TaskEventKind::Progress,
                    succeeded(&[index]),
                ];
                for (seq, kind) in kinds.into_iter().enumerate() {
                    let e = event_from(&worker, t, 1, seq as u64, kind);
                    let outcome = store
                        .record_event(&e, &FAST)
                        .await
                        .unwrap_or_else(|err| panic!("{worker} {e:?}: {err}"));
                    assert!(
                        matches!(outcome, EventOutcome::Applied { .. }),
                        "{worker} {e:?}: {outcome:?}"
                    );
                    // The worker resends when the reply is late: a duplicate, recorded once.
                    let again = store
                        .record_event(&e, &FAST)
                        .await
                        .unwrap_or_else(|err| panic!("{worker} resend: {err}"));
                    assert_eq!(again, EventOutcome::Duplicate, "{worker} {e:?}");
                }
            }
        }));
    }
    let api_store = pick(1);
    let api = tokio::spawn(async move {
        let mut kept = Vec::new();
        for i in 0..API_JOBS {
            let job = new_job(sb, None);
            api_store
                .submit_job(&job)
                .await
                .expect("submit while workers report");
            api_store.get_job(job.id).await.expect("get_job");
            api_store.list_frames(job.id).await.expect("list_frames");
            api_store.unfinished_jobs().await.expect("unfinished_jobs");
            // Cancel reads before it writes: a transaction that must not lose its turn.
            if i % 2 == 0 {
                let (cancelled, _) = api_store
                    .cancel_job(job.id)
                    .await
                    .expect("cancel while workers report");
                assert_eq!(cancelled.state, JobState::Cancelled);
            } else {
                kept.push(job);
            }
        }
        kept
    });
    let dispatcher_store = pick(2);
    let dispatcher = tokio::spawn(async move {
        let mut published = Vec::new();
        for _ in 0..50 {
            let out = dispatcher_store
                .pending_outbox(3)
                .await
                .expect("pending_outbox");
            let ids: Vec<i64> = out.iter().map(|m| m.id).collect();
            dispatcher_store
                .mark_published(&ids)
                .await
                .expect("mark_published");
            dispatcher_store
                .release_due_retries()
                .await
                .expect("release_due_retries");
            published.extend(out);
            tokio::task::yield_now().await;
        }
        published
    });
    for handle in handles {
        handle.await.expect("a worker task panicked");
    }
    let kept = api.await.expect("the API task panicked");
    let mut published = dispatcher.await.expect("the dispatcher task panicked");
    published.extend(publish_all(store.as_ref()).await);
    assert!(store.pending_outbox(100).await.unwrap().is_empty());
    let ids = sorted(published.iter().map(|m| m.id).collect::<Vec<_>>());
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(
        ids, unique,
        "an outbox row was handed out again after being marked published"
    );
    let main: Vec<TaskId> = published
        .iter()
        .map(|m| m.task_id)
        .filter(|t| planned.render_tasks.iter().any(|p| p.id == *t))
        .collect();
    assert_eq!(
        sorted(main),
        sorted(planned.render_tasks.iter().map(|t| t.id).collect()),
        "each task published once"
    );
    for job in &kept {
        let tasks: Vec<TaskId> = published
            .iter()
            .map(|m| m.task_id)
            .filter(|t| job.render_tasks.iter().any(|p| p.id == *t))
            .collect();
        assert_eq!(tasks.len(), 2, "a kept job's messages are all published");
    }

    let job = store.get_job(planned.id).await.unwrap();
    assert_eq!(
        (job.state, job.frames_succeeded),
        (JobState::Succeeded, TASKS),
        "{job:?}"
    );
    let frames = store.list_frames(planned.id).await.unwrap();
    assert!(
        frames
            .iter()
            .all(|f| f.attempts == 1 && f.finished_at.is_some()),
        "{frames:?}"
    );
    let unfinished = sorted(store.unfinished_jobs().await.unwrap());
    assert_eq!(unfinished, sorted(kept.iter().map(|j| j.id).collect()));
}
