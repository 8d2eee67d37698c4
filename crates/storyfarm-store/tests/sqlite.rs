//! The conformance suite (`storyfarm_store::conformance`) on SQLite: one test per case, each on a
//! fresh database file in a temp directory; then what only the SQLite store has (opening a file,
//! reopening it, two stores on one file).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};
use storyfarm_core::{JobId, StoryboardSpec, TaskId};
use storyfarm_store::{
    conformance, JobState, MetadataStore, NewJob, PlannedTask, SqliteStore, StoreError,
    StoredStoryboard, TaskKind,
};

async fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path)
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

macro_rules! on_sqlite {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $case() {
            let directory = tempfile::tempdir().unwrap();
            conformance::$case(Arc::new(open(&directory.path().join("metadata.sqlite")).await)).await;
        }
    )*};
}

storyfarm_store::conformance_cases!(on_sqlite);

#[tokio::test]
async fn open_creates_the_directory_and_reopening_keeps_the_data() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("runs/board-1/metadata.sqlite");
    let store = open(&path).await;
    let project = store.create_project("kept").await.unwrap();
    assert!(path.is_file());
    // WAL mode: writes go to the log beside the file first.
    assert!(path.with_file_name("metadata.sqlite-wal").is_file());
    drop(store);
    // Migrations already applied are not applied again; the data is there.
    let reopened = open(&path).await;
    assert_eq!(reopened.get_project(project.id).await.unwrap(), project);
}

#[tokio::test]
async fn open_errors_name_the_path() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let path = file.join("metadata.sqlite");
    let error = SqliteStore::open(&path)
        .await
        .err()
        .expect("a file cannot be a directory");
    assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );

    let garbage = directory.path().join("garbage.sqlite");
    std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
    let error = SqliteStore::open(&garbage)
        .await
        .err()
        .expect("not a database");
    assert!(error.to_string().contains("garbage.sqlite"), "{error}");
}

/// Two stores on one file do not share the in-process writer turn: they meet in SQLite's own
/// locking, as two processes would (`BEGIN IMMEDIATE` and the busy timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_on_one_file_under_concurrent_writes() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("metadata.sqlite");
    let first: Arc<dyn MetadataStore> = Arc::new(open(&path).await);
    let second: Arc<dyn MetadataStore> = Arc::new(open(&path).await);
    conformance::hammer(vec![first, second]).await;
}

/// A write transaction that reads first (cancel, requeue) must wait for another connection's
/// write lock, not fail: a deferred transaction would take a read snapshot and then be refused the
/// upgrade at once, without the busy handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_first_writes_wait_for_another_connections_write_lock() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("metadata.sqlite");
    let store = Arc::new(open(&path).await);
    let project = store.create_project("p").await.unwrap();
    let spec = StoryboardSpec::from_yaml("model: m\nframes:\n  - prompt: a\n").unwrap();
    let board = store
        .create_storyboard(
            project.id,
            "b",
            &StoredStoryboard {
                spec: spec.clone(),
                reference_id: None,
                character_references: vec![],
            },
        )
        .await
        .unwrap();
    let job = NewJob {
        id: JobId::new(),
        storyboard_id: board.id,
        frames: spec.resolved_frames(),
        prerequisites: vec![],
        render_tasks: vec![PlannedTask {
            id: TaskId::new(),
            kind: TaskKind::Render,
            family: "sd".into(),
            max_attempts: 3,
            frames: vec![0],
            payload: vec![1],
            needs: vec![],
        }],
    };
    store.submit_job(&job).await.unwrap();
    let published: Vec<i64> = store
        .pending_outbox(10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    store.mark_published(&published).await.unwrap();

    let mut other = SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    // One at a time: each must be seen waiting, then succeed once the lock is released.
    let requeue = {
        let store = store.clone();
        async move { store.requeue_lost_deliveries(None).await }
    };
    let requeued = while_locked(&mut other, requeue)
        .await
        .expect("requeue after the lock is released");
    assert_eq!(requeued, 1);
    let cancel = {
        let store = store.clone();
        async move { store.cancel_job(job.id).await }
    };
    let (cancelled, _) = while_locked(&mut other, cancel)
        .await
        .expect("cancel after the lock is released");
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(
        store.get_project(project.id).await.unwrap().name,
        "renamed twice"
    );
}

/// Takes `other`'s write lock (with a write of its own), starts `call`, checks that it waits, then
/// commits and returns what `call` returned.
async fn while_locked<T, F>(other: &mut SqliteConnection, call: F) -> T
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let mut holding = other.begin_with("BEGIN IMMEDIATE").await.unwrap();
    sqlx::query(
        "UPDATE projects SET name = CASE name WHEN 'p' THEN 'renamed' ELSE 'renamed twice' END",
    )
    .execute(&mut *holding)
    .await
    .unwrap();
    let call = tokio::spawn(call);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !call.is_finished(),
        "the store's write finished while another connection held the write lock"
    );
    holding.commit().await.unwrap();
    call.await.expect("the store call panicked")
}

/// SQLite's busy answer (the lock outlived the busy timeout) is retryable.
#[tokio::test]
async fn busy_is_unavailable() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("metadata.sqlite");
    let store = open(&path).await;
    store.create_project("p").await.unwrap();
    let mut holder = SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    let holding = holder.begin_with("BEGIN IMMEDIATE").await.unwrap();
    let mut impatient = SqliteConnectOptions::new()
        .filename(&path)
        .busy_timeout(Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    let busy = sqlx::query("DELETE FROM projects")
        .execute(&mut impatient)
        .await
        .unwrap_err();
    let error = StoreError::from(busy);
    assert!(
        matches!(error, StoreError::Unavailable { .. }) && error.is_retryable(),
        "{error:?}"
    );
    drop(holding);
}

/// Several stores (as several processes would) opening one brand-new file at the same moment.
/// Without the open lock, all but one failed: switching the new file to WAL answered "database is
/// locked", or a migration the first had just applied failed with "table already exists".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_opening_a_new_file_at_once_all_migrate_it() {
    for round in 0..10 {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join(format!("new-{round}.sqlite"));
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                tokio::spawn(async move { SqliteStore::open(&path).await })
            })
            .collect();
        for open in opens {
            let store = open
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            store
                .create_project("after a concurrent open")
                .await
                .unwrap();
        }
    }
}

/// A database written by the schema before prerequisites (a render waiting for a pending
/// inversion, a finished job that used a ready one, a style reference) migrates to it: the
/// rebuilt tables keep every row and every reference between them, the waiting render waits in
/// task_waits, each job has its style prerequisite, and the inversion's success releases the
/// render.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_previous_schema_migrates() {
    use sqlx::migrate::Migrator;
    use storyfarm_core::ReferenceId;
    use storyfarm_store::{
        CacheState, EventOutcome, FrameState, PrerequisiteKind, ReferenceKind, RetryPolicy,
        TaskEventKind, TaskEventRecord, SQLITE_MIGRATOR,
    };

    const PREREQUISITES: i64 = 20261127000001;
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("old.sqlite");
    let previous = Migrator {
        migrations: std::borrow::Cow::Owned(
            SQLITE_MIGRATOR
                .iter()
                .filter(|m| m.version < PREREQUISITES)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    };
    let mut old = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .foreign_keys(true)
        .connect()
        .await
        .unwrap();
    previous.run(&mut old).await.unwrap();
    let (project, reference, board) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    let (waiting_job, done_job) = (JobId::new(), JobId::new());
    let (invert, render, done_render) = (TaskId::new(), TaskId::new(), TaskId::new());
    let spec = serde_json::to_string(&StoredStoryboard {
        spec: StoryboardSpec::from_yaml("model: m\nframes:\n  - prompt: a\n").unwrap(),
        reference_id: Some(ReferenceId(reference)),
        character_references: vec![],
    })
    .unwrap();
    let statements = [
        format!("INSERT INTO projects VALUES ('{project}', 'p', 1)"),
        format!(
            "INSERT INTO style_references VALUES ('{reference}', '{project}', 'style', 'a lighthouse', 'ab', 'sha256/ab', 640, 480, 5000, 2)"
        ),
        format!("INSERT INTO storyboards VALUES ('{board}', '{project}', 'b', '{spec}', 3)"),
        "INSERT INTO inversions VALUES ('key-old', 'pending', NULL, NULL, 4, 4), ('key-done', 'ready', 'traj-done', NULL, 4, 4)".into(),
        format!("INSERT INTO jobs VALUES ('{waiting_job}', '{board}', 'queued', 1, NULL, 5, NULL), ('{done_job}', '{board}', 'succeeded', 1, NULL, 5, 9)"),
        format!(
            "INSERT INTO tasks (id, job_id, kind, state, family, attempt, max_attempts, inversion_key, payload, created_at, updated_at) VALUES
             ('{invert}', '{waiting_job}', 'invert', 'queued', 'sd', 1, 3, 'key-old', x'01', 6, 6),
             ('{render}', '{waiting_job}', 'render', 'waiting', 'sd', 1, 3, 'key-old', x'02', 6, 6),
             ('{done_render}', '{done_job}', 'render', 'succeeded', 'sd', 1, 3, 'key-done', x'03', 6, 8)"
        ),
        format!(
            "INSERT INTO frames (job_id, frame_index, prompt, negative_prompt, seed, state, task_id, png_key, finished_at) VALUES
             ('{waiting_job}', 0, 'a', '', 1, 'pending', '{render}', NULL, NULL),
             ('{done_job}', 0, 'a', '', 1, 'succeeded', '{done_render}', 'png', 8)"
        ),
        format!("INSERT INTO outbox (task_id, attempt, created_at) VALUES ('{invert}', 1, 6), ('{done_render}', 1, 6)"),
        "DELETE FROM outbox WHERE id = 2".into(),
    ];
    for statement in &statements {
        sqlx::query(statement)
            .execute(&mut old)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    old.close().await.unwrap();

    let store = open(&path).await;
    let mut check = SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    let dangling: Vec<(String,)> = sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
        .fetch_all(&mut check)
        .await
        .unwrap();
    assert!(dangling.is_empty(), "{dangling:?}");
    let renders_with_keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE kind = 'render' AND inversion_key IS NOT NULL",
    )
    .fetch_one(&mut check)
    .await
    .unwrap();
    assert_eq!(renders_with_keys, 0);
    // AUTOINCREMENT's high-water mark survived: a deleted row's id is not handed out again.
    let next: i64 = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
        .fetch_one(&mut check)
        .await
        .unwrap();
    assert_eq!(next, 2);

    let migrated = store.get_reference(ReferenceId(reference)).await.unwrap();
    assert_eq!(
        (
            migrated.kind,
            migrated.name.as_str(),
            migrated.subject_words.len(),
            migrated
                .image
                .map(|i| (i.key, i.width, i.height, i.size_bytes))
        ),
        (
            ReferenceKind::Style,
            "",
            0,
            Some(("sha256/ab".to_string(), 640, 480, 5000))
        )
    );
    for (job, key, state) in [
        (waiting_job, "key-old", CacheState::Pending),
        (done_job, "key-done", CacheState::Ready),
    ] {
        let prerequisites = store.job_prerequisites(job).await.unwrap();
        assert_eq!(
            prerequisites
                .iter()
                .map(|p| (p.kind, p.name.as_str(), p.cache_key.as_str(), p.state))
                .collect::<Vec<_>>(),
            vec![(PrerequisiteKind::Style, "", key, state)]
        );
    }
    let job = store.get_job(waiting_job).await.unwrap();
    assert_eq!(
        (job.inversion_tasks, job.anchor_tasks, job.render_tasks),
        (1, 0, 1)
    );
    let frame = store.get_frame(done_job, 0).await.unwrap();
    assert_eq!(
        (frame.state, frame.task_id, frame.png_key.as_deref()),
        (FrameState::Succeeded, Some(done_render), Some("png"))
    );

    let out = store.pending_outbox(10).await.unwrap();
    assert_eq!(
        out.iter().map(|m| (m.id, m.task_id)).collect::<Vec<_>>(),
        vec![(1, invert)]
    );
    store.mark_published(&[1]).await.unwrap();
    let done = TaskEventRecord {
        task_id: invert,
        attempt: 1,
        seq: 0,
        worker_id: "w".into(),
        kind: TaskEventKind::Succeeded {
            frames: vec![],
            trajectory_key: Some("traj-old".into()),
        },
    };
    let outcome = store
        .record_event(&done, &RetryPolicy::default())
        .await
        .unwrap();
    assert!(
        matches!(outcome, EventOutcome::Applied { ref affected_jobs, .. } if affected_jobs == &vec![waiting_job]),
        "{outcome:?}"
    );
    let out = store.pending_outbox(10).await.unwrap();
    assert_eq!(
        out.iter()
            .map(|m| (m.id, m.task_id, m.payload.clone()))
            .collect::<Vec<_>>(),
        vec![(3, render, vec![2])],
        "released, with an id after every one handed out before"
    );
}
