//! Dispatch throughput and latency through Postgres (outbox) + RabbitMQ (quorum queue, publisher
//! confirms, manual acks), fully durable, with a load-test worker that acknowledges tasks without
//! rendering.
//!
//! - burst: one job of N single-frame tasks is submitted; tasks/s from the submit's commit to the
//!   last task held by the worker.
//! - latency: single-task jobs submitted at a steady rate; p50/p99 from the commit (the task is
//!   ready) to the worker holding the delivery.
//!
//! `cargo run -p storyfarm-coordinator --example dispatch_bench -- [burst tasks] [latency jobs] [rate/s]`
//! Needs DATABASE_URL (a database it may create others in) and STORYFARM_AMQP_URL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use storyfarm_coordinator::dispatch::run_dispatcher;
use storyfarm_coordinator::planner::{plan_job, JobReferences, ModelFacts, PlanPolicy};
use storyfarm_core::{JobId, StoryboardSpec};
use storyfarm_queue::{QueueConfig, RabbitQueue, TaskQueue};
use storyfarm_store::{MetadataStore, PgStore, StoredStoryboard};
use tokio::sync::Notify;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn spec(frames: usize) -> StoredStoryboard {
    let mut spec = StoryboardSpec::from_yaml(
        "model: bench\nwidth: 64\nheight: 64\nsteps: 4\nframes_per_task: 1\nframes: []\n",
    )
    .expect("valid board");
    spec.frames = (0..frames)
        .map(|i| storyfarm_core::FrameSpec {
            prompt: format!("f{i}"),
            negative_prompt: None,
            seed: None,
            characters: Vec::new(),
        })
        .collect();
    StoredStoryboard {
        spec,
        reference_id: None,
        character_references: Vec::new(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let burst = args.first().copied().unwrap_or(10_000);
    let latency_jobs = args.get(1).copied().unwrap_or(500);
    let rate = args.get(2).copied().unwrap_or(200);

    let admin = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL not set")?;
    let name = format!("sf_bench_{}", std::process::id());
    psql_exec(&admin, &format!("CREATE DATABASE {name}"))?;
    let url = format!(
        "{}/{name}",
        admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin)
    );
    let store = PgStore::connect(&url, 8).await?;
    store.migrate().await?;
    let store: Arc<dyn MetadataStore> = Arc::new(store);
    let queue: Arc<dyn TaskQueue> =
        Arc::new(RabbitQueue::connect(QueueConfig::from_env().with_namespace(name.clone())).await?);
    queue.declare_topology(&["sd"]).await?;

    // The load-test worker: hold (ack) every task, note when.
    let held: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut consumer = queue.consume_tasks("sd", 500).await?;
    let seen = held.clone();
    let worker = tokio::spawn(async move {
        while let Ok(Some(delivery)) = consumer.next().await {
            let now = Instant::now();
            if let Some(id) = delivery.headers.get("task_id") {
                seen.lock().expect("lock").insert(id.clone(), now);
            }
            let _ = delivery.acker.ack().await;
        }
    });
    let wake = Arc::new(Notify::new());
    let dispatcher = tokio::spawn(run_dispatcher(
        store.clone(),
        queue.clone(),
        wake.clone(),
        Duration::from_millis(250),
        storyfarm_telemetry::CoordinatorMetrics::new(),
    ));
    let project = store.create_project("bench").await?;
    let facts = ModelFacts {
        family: "sd".into(),
        scheduler: "ddim".into(),
    };

    // Burst.
    let sb = store
        .create_storyboard(project.id, "burst", &spec(burst))
        .await?;
    let plan = plan_job(
        JobId::new(),
        sb.id,
        &sb.stored,
        JobReferences::default(),
        &facts,
        &PlanPolicy::default(),
        "",
    );
    let started = Instant::now();
    store.submit_job(&plan).await?;
    let committed = Instant::now();
    wake.notify_one();
    while held.lock().expect("lock").len() < burst {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let last = held
        .lock()
        .expect("lock")
        .values()
        .max()
        .copied()
        .unwrap_or(committed);
    let seconds = last.duration_since(committed).as_secs_f64();
    println!(
        "burst: {burst} tasks, submit transaction {:.0} ms, commit -> last task held {:.2} s = {:.0} tasks/s",
        committed.duration_since(started).as_secs_f64() * 1e3,
        seconds,
        burst as f64 / seconds
    );
    held.lock().expect("lock").clear();

    // Latency at a steady rate.
    let sb = store
        .create_storyboard(project.id, "single", &spec(1))
        .await?;
    let mut ready = HashMap::new();
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let begin = Instant::now();
    for i in 0..latency_jobs {
        let plan = plan_job(
            JobId::new(),
            sb.id,
            &sb.stored,
            JobReferences::default(),
            &facts,
            &PlanPolicy::default(),
            "",
        );
        let id = plan.render_tasks[0].id.to_string();
        store.submit_job(&plan).await?;
        ready.insert(id, Instant::now());
        wake.notify_one();
        let next = begin + period * (i as u32 + 1);
        tokio::time::sleep_until(next.into()).await;
    }
    while held.lock().expect("lock").len() < latency_jobs {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let held = held.lock().expect("lock").clone();
    let mut ms: Vec<f64> = ready
        .iter()
        .filter_map(|(id, t0)| {
            held.get(id)
                .map(|t1| t1.saturating_duration_since(*t0).as_secs_f64() * 1e3)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "latency: {latency_jobs} single-task jobs at {rate}/s, ready -> held p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    );
    dispatcher.abort();
    worker.abort();
    queue.delete_topology(&["sd"]).await?;
    drop(store);
    psql_exec(
        &admin,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )?;
    Ok(())
}

/// Database-level statements through psql (only storyfarm-store talks SQL from Rust).
fn psql_exec(url: &str, sql: &str) -> Result<(), Box<dyn std::error::Error>> {
    let out = std::process::Command::new("psql")
        .args([url, "-tAc", sql])
        .output()?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
    }
    Ok(())
}
