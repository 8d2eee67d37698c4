//! The store's transactions against a real Postgres (a fresh database per test, migrations
//! applied): inversion claiming and reuse, the outbox, idempotent event ingestion, retries with
//! backoff, permanent failures, cancellation.

use std::time::Duration;

use sqlx::PgPool;
use storyfarm_core::storyboard::ResolvedFrame;
use storyfarm_core::{JobId, ProjectId, ReferenceId, StoryboardId, StoryboardSpec, TaskId};
use storyfarm_store::*;

fn spec() -> StoryboardSpec {
    StoryboardSpec::from_yaml("model: m\nwidth: 64\nheight: 64\nsteps: 4\nframes:\n  - prompt: a\n  - prompt: b\n  - prompt: c\n")
        .unwrap()
}

async fn storyboard(store: &PgStore) -> (ProjectId, StoryboardId) {
    let project = store.create_project("p").await.unwrap();
    let sb = store
        .create_storyboard(project.id, "board", &StoredStoryboard { spec: spec(), reference_id: None })
        .await
        .unwrap();
    (project.id, sb.id)
}

fn task(kind: TaskKind, frames: Vec<u32>) -> PlannedTask {
    PlannedTask { id: TaskId::new(), kind, family: "sd".into(), max_attempts: 3, frames, payload: vec![1, 2, 3] }
}

fn new_job(storyboard_id: StoryboardId, key: Option<&str>) -> NewJob {
    let frames = spec().resolved_frames();
    NewJob {
        id: JobId::new(),
        storyboard_id,
        frames: frames.clone(),
        inversion: key.map(|k| PlannedInversion { cache_key: k.into(), task: task(TaskKind::Invert, vec![]) }),
        render_tasks: vec![task(TaskKind::Render, vec![0, 1]), task(TaskKind::Render, vec![2])],
    }
}

fn event(task_id: TaskId, attempt: u32, seq: u64, kind: TaskEventKind) -> TaskEventRecord {
    TaskEventRecord { task_id, attempt, seq, worker_id: "w1".into(), kind }
}

fn succeeded(frames: &[u32]) -> TaskEventKind {
    TaskEventKind::Succeeded {
        frames: frames
            .iter()
            .map(|&i| FrameArtifacts { index: i, png_key: format!("png{i}"), latents_key: format!("lat{i}") })
            .collect(),
        trajectory_key: None,
    }
}

const FAST: RetryPolicy = RetryPolicy { base: Duration::from_millis(1), max: Duration::from_millis(1) };

#[sqlx::test(migrator = "storyfarm_store::MIGRATOR")]
async fn not_found_and_references(pool: PgPool) {
    let store = PgStore::from_pool(pool);
    let missing = ProjectId::new();
    assert!(matches!(store.get_project(missing).await, Err(StoreError::NotFound { what: "project", .. })));
    let reference = Reference {
        id: ReferenceId::new(),
        project_id: missing,
        prompt: "p".into(),
        image_sha256: "ab".into(),
        image_key: "k".into(),
        width: 64,
        height: 64,
        size_bytes: 10,
        created_at: chrono::Utc::now(),
    };
    assert!(matches!(store.create_reference(&reference).await, Err(StoreError::NotFound { what: "project", .. })));
    let project = store.create_project("p").await.unwrap();
    let stored = store.create_reference(&Reference { project_id: project.id, ..reference.clone() }).await.unwrap();
    assert_eq!(store.get_reference(stored.id).await.unwrap().image_key, "k");
    assert!(matches!(store.get_job(JobId::new()).await, Err(StoreError::NotFound { what: "job", .. })));
    assert_eq!(store.list_projects().await.unwrap().len(), 1);
}

#[sqlx::test(migrator = "storyfarm_store::MIGRATOR")]
async fn inversion_is_claimed_once_and_releases_waiting_renders(pool: PgPool) {
    let store = PgStore::from_pool(pool);
    let (_, sb) = storyboard(&store).await;
    let first = new_job(sb, Some("key-1"));
    let job = store.submit_job(&first).await.unwrap();
    assert_eq!((job.inversion_tasks, job.render_tasks, job.frames_total), (1, 2, 3));
    // Only the inversion is dispatched; renders wait for it.
    let outbox = store.pending_outbox(100).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].task_id, first.inversion.as_ref().unwrap().task.id);
    store.mark_published(&[outbox[0].id]).await.unwrap();

    // A second job with the same inversion key plans no inversion and waits too.
    let second = new_job(sb, Some("key-1"));
    let job2 = store.submit_job(&second).await.unwrap();
    assert_eq!(job2.inversion_tasks, 0);
    assert!(store.pending_outbox(100).await.unwrap().is_empty());

    let inv = first.inversion.as_ref().unwrap().task.id;
    store.record_event(&event(inv, 1, 0, TaskEventKind::Started), &FAST).await.unwrap();
    let done = TaskEventKind::Succeeded { frames: vec![], trajectory_key: Some("traj".into()) };
    let outcome = store.record_event(&event(inv, 1, 1, done.clone()), &FAST).await.unwrap();
    match outcome {
        EventOutcome::Applied { affected_jobs, .. } => assert_eq!(affected_jobs.len(), 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.inversion_trajectory("key-1").await.unwrap().as_deref(), Some("traj"));
    // Both jobs' four render tasks are released.
    assert_eq!(store.pending_outbox(100).await.unwrap().len(), 4);
    // The same event again changes nothing.
    assert_eq!(store.record_event(&event(inv, 1, 1, done), &FAST).await.unwrap(), EventOutcome::Duplicate);

    // A third job finds the inversion ready: renders are dispatched at once.
    let third = new_job(sb, Some("key-1"));
    let job3 = store.submit_job(&third).await.unwrap();
    assert_eq!(job3.inversion_tasks, 0);
    assert_eq!(store.pending_outbox(100).await.unwrap().len(), 6);
}

#[sqlx::test(migrator = "storyfarm_store::MIGRATOR")]
async fn frames_succeed_once_and_the_job_finishes(pool: PgPool) {
    let store = PgStore::from_pool(pool);
    let (_, sb) = storyboard(&store).await;
    let planned = new_job(sb, None);
    store.submit_job(&planned).await.unwrap();
    assert_eq!(store.pending_outbox(100).await.unwrap().len(), 2);
    let (a, b) = (planned.render_tasks[0].id, planned.render_tasks[1].id);
    store.record_event(&event(a, 1, 0, TaskEventKind::Started), &FAST).await.unwrap();
    let job = store.get_job(planned.id).await.unwrap();
    assert_eq!(job.state, JobState::Running);
    let frames = store.list_frames(planned.id).await.unwrap();
    assert_eq!(frames[0].state, FrameState::Rendering);
    assert_eq!(frames[0].attempts, 1);
    store.record_event(&event(a, 1, 1, succeeded(&[0, 1])), &FAST).await.unwrap();
    // A redelivered copy of the task on another worker: its events are stale.
    let stale = store.record_event(&TaskEventRecord { worker_id: "w2".into(), ..event(a, 1, 7, succeeded(&[0, 1])) }, &FAST).await.unwrap();
    assert!(matches!(stale, EventOutcome::Stale { cancelled: false, .. }));
    store.record_event(&event(b, 1, 0, succeeded(&[2])), &FAST).await.unwrap();
    let job = store.get_job(planned.id).await.unwrap();
    assert_eq!((job.state, job.frames_succeeded), (JobState::Succeeded, 3));
    assert!(job.finished_at.is_some());
    let frames = store.list_frames(planned.id).await.unwrap();
    assert_eq!(frames[2].png_key.as_deref(), Some("png2"));
}

#[sqlx::test(migrator = "storyfarm_store::MIGRATOR")]
async fn retryable_failures_back_off_then_give_up(pool: PgPool) {
    let store = PgStore::from_pool(pool);
    let (_, sb) = storyboard(&store).await;
    let planned = new_job(sb, None);
    store.submit_job(&planned).await.unwrap();
    let published: Vec<i64> = store.pending_outbox(100).await.unwrap().iter().map(|m| m.id).collect();
    store.mark_published(&published).await.unwrap();
    let t = planned.render_tasks[0].id;
    let fail = |attempt, seq| event(t, attempt, seq, TaskEventKind::Failed { reason: "gpu busy".into(), retryable: true });
    for attempt in 1..=2 {
        store.record_event(&fail(attempt, 0), &FAST).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.release_due_retries().await.unwrap(), 1);
        let out = store.pending_outbox(100).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].task_id, out[0].attempt), (t, attempt + 1));
        store.mark_published(&[out[0].id]).await.unwrap();
        // The old attempt's late events change nothing.
        let late = store.record_event(&event(t, attempt, 5, succeeded(&[0, 1])), &FAST).await.unwrap();
        assert!(matches!(late, EventOutcome::Stale { .. }));
    }
    store.record_event(&fail(3, 0), &FAST).await.unwrap();
    let frames = store.list_frames(planned.id).await.unwrap();
    assert_eq!(frames[0].state, FrameState::Failed);
    assert!(frames[0].error.as_deref().unwrap().contains("gave up after 3 attempts"), "{:?}", frames[0].error);
    // Frame 2 still open: the job is not finished until its task ends.
    let other = planned.render_tasks[1].id;
    store
        .record_event(&event(other, 1, 0, TaskEventKind::Failed { reason: "bad reference image".into(), retryable: false }), &FAST)
        .await
        .unwrap();
    let job = store.get_job(planned.id).await.unwrap();
    assert_eq!((job.state, job.frames_failed), (JobState::Failed, 3));
    assert!(job.error.unwrap().contains("3 frame(s) failed"));
}

#[sqlx::test(migrator = "storyfarm_store::MIGRATOR")]
async fn failed_inversion_fails_every_waiting_frame(pool: PgPool) {
    let store = PgStore::from_pool(pool);
    let (_, sb) = storyboard(&store).await;
    let planned = new_job(sb, Some("key-x"));
    store.submit_job(&planned).await.unwrap();
    let inv = planned.inversion.as_ref().unwrap().task.id;
    store
        .record_event(&event(inv, 1, 0, TaskEventKind::Failed { reason: "cannot decode image".into(), retryable: false }), &FAST)
        .await
        .unwrap();
    let frames = store.list_frames(planned.id).await.unwrap();
    assert!(frames.iter().all(|f| f.state == FrameState::Failed));
    assert!(frames[0].error.as_deref().unwrap().contains("inversion failed: cannot decode image"));
    assert_eq!(store.get_job(planned.id).await.unwrap().state, JobState::Failed);
    // A later job tries the inversion again.
    let again = new_job(sb, Some("key-x"));
    assert_eq!(store.submit_job(&again).await.unwrap().inversion_tasks, 1);
}

#[sqlx::test(migrator = "storyfarm_store::MIGRATOR")]
async fn cancel_stops_queued_work_and_flags_running_tasks(pool: PgPool) {
    let store = PgStore::from_pool(pool);
    let (_, sb) = storyboard(&store).await;
    let planned = new_job(sb, None);
    store.submit_job(&planned).await.unwrap();
    let out = store.pending_outbox(100).await.unwrap();
    store.mark_published(&[out[0].id]).await.unwrap();
    let running = planned.render_tasks[0].id;
    store.record_event(&event(running, 1, 0, TaskEventKind::Started), &FAST).await.unwrap();
    let (job, had_running) = store.cancel_job(planned.id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(had_running);
    // The unpublished message of the queued task is gone.
    assert!(store.pending_outbox(100).await.unwrap().is_empty());
    let late = store.record_event(&event(running, 1, 1, TaskEventKind::Progress), &FAST).await.unwrap();
    assert!(matches!(late, EventOutcome::Stale { cancelled: true, .. }));
    let frames = store.list_frames(planned.id).await.unwrap();
    assert!(frames.iter().all(|f| f.state == FrameState::Cancelled));
    // Cancelling again is a no-op.
    assert_eq!(store.cancel_job(planned.id).await.unwrap().0.state, JobState::Cancelled);
}

#[test]
fn backoff_doubles_and_caps() {
    let p = RetryPolicy { base: Duration::from_secs(2), max: Duration::from_secs(60) };
    assert_eq!(p.delay(1), Duration::from_secs(2));
    assert_eq!(p.delay(3), Duration::from_secs(8));
    assert_eq!(p.delay(10), Duration::from_secs(60));
    let _ = ResolvedFrame { index: 0, prompt: String::new(), negative_prompt: String::new(), seed: 0 };
}

#[sqlx::test(migrator = "storyfarm_store::MIGRATOR")]
async fn sequence_numbers_are_per_worker(pool: PgPool) {
    // A redelivered attempt runs on a second worker whose counter may repeat the first one's
    // numbers: its success must not be mistaken for a duplicate.
    let store = PgStore::from_pool(pool);
    let (_, sb) = storyboard(&store).await;
    let planned = new_job(sb, None);
    store.submit_job(&planned).await.unwrap();
    let t = planned.render_tasks[1].id;
    store.record_event(&event(t, 1, 5, TaskEventKind::Progress), &FAST).await.unwrap();
    let second = TaskEventRecord { worker_id: "w2".into(), ..event(t, 1, 5, succeeded(&[2])) };
    assert!(matches!(store.record_event(&second, &FAST).await.unwrap(), EventOutcome::Applied { .. }));
    assert_eq!(store.record_event(&second, &FAST).await.unwrap(), EventOutcome::Duplicate);
    assert_eq!(store.list_frames(planned.id).await.unwrap()[2].state, FrameState::Succeeded);
}
