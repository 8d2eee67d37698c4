//! `storyfarm serve`, `storyfarm worker` and `storyfarm migrate`: the farm's server roles.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use storyfarm_coordinator::planner::PlanPolicy;
use storyfarm_coordinator::{Coordinator, DEFAULT_MAX_REFERENCE_BYTES};
use storyfarm_diffusion::device::{DeviceSpec, Precision};
use storyfarm_diffusion::model::HubOptions;
use storyfarm_queue::{QueueConfig, RabbitQueue, TaskQueue};
use storyfarm_store::{MetadataStore, PgStore, RetryPolicy};
use storyfarm_worker::{ModelCache, ModelLoader, Worker, WorkerConfig, WorkerScrape};

/// Where the farm's services are (shared by serve and worker).
#[derive(Args, Debug, Clone)]
pub struct QueueArgs {
    #[arg(
        long,
        env = "STORYFARM_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Prefix of every exchange and queue (several farms on one broker).
    #[arg(long, env = "STORYFARM_QUEUE_NAMESPACE", default_value = "storyfarm")]
    queue_namespace: String,
    /// Deliveries of a task before it is dead-lettered.
    #[arg(long, env = "STORYFARM_DELIVERY_LIMIT", default_value_t = 5)]
    delivery_limit: u32,
    /// Artifact store: s3://bucket/prefix (endpoint and credentials from STORYFARM_S3_* / AWS_*)
    /// or file:///path.
    #[arg(long, env = "STORYFARM_BLOBS")]
    blobs: String,
    /// Model families served (queues): sd, sdxl.
    #[arg(
        long,
        env = "STORYFARM_FAMILIES",
        value_delimiter = ',',
        default_value = "sd,sdxl"
    )]
    families: Vec<String>,
}

impl QueueArgs {
    async fn connect(&self, name: &str) -> Result<Arc<dyn TaskQueue>> {
        let config = QueueConfig {
            url: self.amqp_url.clone(),
            namespace: self.queue_namespace.clone(),
            delivery_limit: self.delivery_limit,
            connection_name: name.to_string(),
            ..QueueConfig::default()
        };
        let queue = RabbitQueue::connect(config)
            .await
            .context("connecting to RabbitMQ")?;
        Ok(Arc::new(queue))
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[arg(long, env = "STORYFARM_LISTEN", default_value = "127.0.0.1:7070")]
    listen: String,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[command(flatten)]
    queue: QueueArgs,
    /// Attempts of a task before its frames fail.
    #[arg(long, default_value_t = 4)]
    max_attempts: u32,
    /// First retry delay in milliseconds (doubles per attempt, capped at a minute).
    #[arg(long, default_value_t = 2000)]
    retry_base_ms: u64,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// Where Prometheus scrapes this process.
#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on this address (`/metrics`), e.g. 0.0.0.0:9464; off if unset.
    #[arg(long, env = "STORYFARM_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

impl MetricsArgs {
    async fn bind(&self) -> Result<Option<tokio::net::TcpListener>> {
        let Some(addr) = &self.metrics_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics endpoint {addr}"))?;
        Ok(Some(listener))
    }
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    queue: QueueArgs,
    /// Unique per worker process (default: host name and process id).
    #[arg(long, env = "STORYFARM_WORKER_ID")]
    worker_id: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long)]
    precision: Option<Precision>,
    /// Where trajectories are cached between tasks.
    #[arg(long, env = "STORYFARM_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Models kept loaded.
    #[arg(long, default_value_t = 2)]
    models: usize,
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Resend a final event when the coordinator has not confirmed it after this long.
    #[arg(long, default_value_t = 30)]
    recorded_timeout_seconds: u64,
    #[command(flatten)]
    metrics: MetricsArgs,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}

pub async fn migrate(args: MigrateArgs) -> Result<()> {
    let store = PgStore::connect(&args.database_url, 2)
        .await
        .context("connecting to Postgres")?;
    store.migrate().await?;
    println!("migrations applied");
    Ok(())
}

pub async fn serve(args: ServeArgs) -> Result<()> {
    let store = PgStore::connect(&args.database_url, 16)
        .await
        .context("connecting to Postgres")?;
    store.migrate().await?;
    let store: Arc<dyn MetadataStore> = Arc::new(store);
    let blobs = storyfarm_blob::open_blob_store(&args.queue.blobs).await?;
    let queue = args.queue.connect("storyfarm-coordinator").await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics_listener = args.metrics.bind().await?;
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let coordinator = Coordinator {
        store,
        blobs,
        queue,
        families: args.queue.families.clone(),
        policy: PlanPolicy {
            max_attempts: args.max_attempts,
        },
        retry: RetryPolicy {
            base: Duration::from_millis(args.retry_base_ms),
            max: Duration::from_secs(60),
        },
        max_reference_bytes: DEFAULT_MAX_REFERENCE_BYTES,
        metrics_listener,
    };
    println!("listening on {}", listener.local_addr()?);
    if let Some(addr) = metrics_addr {
        println!("metrics on http://{addr}/metrics");
    }
    coordinator.serve(listener, shutdown_signal()).await?;
    Ok(())
}

pub async fn worker(args: WorkerArgs) -> Result<()> {
    let worker_id = args.worker_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("storyfarm-worker-cache"));
    let blobs = storyfarm_blob::open_blob_store(&args.queue.blobs).await?;
    let queue = args.queue.connect(&worker_id).await?;
    let models = Arc::new(ModelCache::new(
        ModelLoader {
            device: args.device,
            precision: args.precision,
            hub: HubOptions::from_env()?,
        },
        args.models,
    ));
    let config = WorkerConfig {
        worker_id,
        families: args.queue.families.clone(),
        cache_dir,
        heartbeat: Duration::from_secs(args.heartbeat_seconds.max(1)),
        progress_every: 1,
        recorded_timeout: Duration::from_secs(args.recorded_timeout_seconds.max(1)),
    };
    let worker = Arc::new(Worker::new(config, queue, blobs, models));
    let metrics = match args.metrics.bind().await? {
        Some(listener) => {
            println!("metrics on http://{}/metrics", listener.local_addr()?);
            let scrape = Arc::new(WorkerScrape::new(worker.metrics().clone(), args.device));
            Some(tokio::spawn(async move {
                if let Err(e) =
                    storyfarm_telemetry::serve_metrics(listener, scrape, std::future::pending())
                        .await
                {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            }))
        }
        None => None,
    };
    let result = worker.run(shutdown_signal()).await;
    if let Some(m) = metrics {
        m.abort();
    }
    result?;
    Ok(())
}
