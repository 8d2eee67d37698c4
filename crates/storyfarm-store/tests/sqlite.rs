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
            },
        )
        .await
        .unwrap();
    let job = NewJob {
        id: JobId::new(),
        storyboard_id: board.id,
        frames: spec.resolved_frames(),
        inversion: None,
        render_tasks: vec![PlannedTask {
            id: TaskId::new(),
            kind: TaskKind::Render,
            family: "sd".into(),
            max_attempts: 3,
            frames: vec![0],
            payload: vec![1],
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
