//! The conformance suite (`storyfarm_store::conformance`) on a real Postgres: one test per case,
//! each on a fresh database with the migrations applied (`sqlx::test`, `DATABASE_URL`).

use std::sync::Arc;

use sqlx::PgPool;
use storyfarm_store::{conformance, PgStore};

macro_rules! on_postgres {
    ($($case:ident),* $(,)?) => {$(
        #[sqlx::test(migrator = "storyfarm_store::MIGRATOR")]
        async fn $case(pool: PgPool) {
            conformance::$case(Arc::new(PgStore::from_pool(pool))).await;
        }
    )*};
}

storyfarm_store::conformance_cases!(on_postgres);

/// A database written by the schema before prerequisites (a render waiting for a pending
/// inversion, a finished job that used a ready one, a style reference) migrates to it: the
/// waiting render waits in task_waits, each job has its style prerequisite, renders produce no
/// key, and the inversion's success releases the render.
#[sqlx::test(migrations = false)]
async fn a_database_of_the_previous_schema_migrates(pool: PgPool) {
    use sqlx::migrate::Migrator;
    use storyfarm_core::{JobId, ReferenceId, TaskId};
    use storyfarm_store::{
        CacheState, EventOutcome, MetadataStore, PrerequisiteKind, ReferenceKind, RetryPolicy,
        TaskEventKind, TaskEventRecord, MIGRATOR,
    };

    const PREREQUISITES: i64 = 20261127000001;
    let previous = Migrator {
        migrations: std::borrow::Cow::Owned(
            MIGRATOR
                .iter()
                .filter(|m| m.version < PREREQUISITES)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    };
    previous.run(&pool).await.unwrap();
    let (project, reference, board) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    let (waiting_job, done_job) = (JobId::new(), JobId::new());
    let (invert, render, done_render) = (TaskId::new(), TaskId::new(), TaskId::new());
    let statements = [
        format!("INSERT INTO projects (id, name) VALUES ('{project}', 'p')"),
        format!(
            "INSERT INTO style_references (id, project_id, kind, prompt, image_sha256, image_key, width, height, size_bytes)
             VALUES ('{reference}', '{project}', 'style', 'a lighthouse', 'ab', 'sha256/ab', 640, 480, 5000)"
        ),
        format!("INSERT INTO storyboards (id, project_id, name, spec) VALUES ('{board}', '{project}', 'b', '{{}}')"),
        "INSERT INTO inversions (cache_key, state, trajectory_key) VALUES ('key-old', 'pending', NULL), ('key-done', 'ready', 'traj-done')".into(),
        format!("INSERT INTO jobs (id, storyboard_id, state, frames_total) VALUES ('{waiting_job}', '{board}', 'queued', 1), ('{done_job}', '{board}', 'succeeded', 1)"),
        format!(
            "INSERT INTO tasks (id, job_id, kind, state, family, max_attempts, inversion_key, payload) VALUES
             ('{invert}', '{waiting_job}', 'invert', 'queued', 'sd', 3, 'key-old', '\\x01'),
             ('{render}', '{waiting_job}', 'render', 'waiting', 'sd', 3, 'key-old', '\\x02'),
             ('{done_render}', '{done_job}', 'render', 'succeeded', 'sd', 3, 'key-done', '\\x03')"
        ),
        format!(
            "INSERT INTO frames (job_id, frame_index, prompt, negative_prompt, seed, state, task_id) VALUES
             ('{waiting_job}', 0, 'a', '', 1, 'pending', '{render}'),
             ('{done_job}', 0, 'a', '', 1, 'succeeded', '{done_render}')"
        ),
        format!("INSERT INTO outbox (task_id, attempt) VALUES ('{invert}', 1)"),
    ];
    for statement in &statements {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    MIGRATOR.run(&pool).await.unwrap();

    let renders_with_keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE kind = 'render' AND inversion_key IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(renders_with_keys, 0);
    let store = PgStore::from_pool(pool);
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
    let out = store.pending_outbox(10).await.unwrap();
    assert_eq!(
        out.iter().map(|m| m.task_id).collect::<Vec<_>>(),
        vec![invert]
    );
    store.mark_published(&[out[0].id]).await.unwrap();
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
            .map(|m| (m.task_id, m.payload.clone()))
            .collect::<Vec<_>>(),
        vec![(render, vec![2])]
    );
}
