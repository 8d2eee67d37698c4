//! The coordinator (`storyfarm serve`): the gRPC API, the planner that turns a storyboard into a
//! task graph, the outbox dispatcher and event ingestion. Postgres is the truth; the coordinator
//! can restart at any time.

pub mod convert;
pub mod dispatch;
pub mod ingest;
pub mod metrics;
pub mod model_facts;
pub mod planner;
pub mod service;
pub mod status;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use storyfarm_blob::BlobStore;
use storyfarm_proto::v1 as pb;
use storyfarm_queue::TaskQueue;
use storyfarm_store::{MetadataStore, RetryPolicy};
use tokio::sync::Notify;

/// Why the coordinator's background work or server stopped.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Store(#[from] storyfarm_store::StoreError),
    #[error(transparent)]
    Queue(#[from] storyfarm_queue::QueueError),
    #[error("stored task payload is corrupt: {0}")]
    Payload(#[from] prost::DecodeError),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("grpc reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything the coordinator runs with.
pub struct Coordinator {
    pub store: Arc<dyn MetadataStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub queue: Arc<dyn TaskQueue>,
    pub families: Vec<String>,
    pub policy: planner::PlanPolicy,
    pub retry: RetryPolicy,
    pub max_reference_bytes: usize,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listener: Option<tokio::net::TcpListener>,
}

/// Default upper bound of an uploaded reference image.
pub const DEFAULT_MAX_REFERENCE_BYTES: usize = 20 * 1024 * 1024;

impl Coordinator {
    /// Serves the API on `listener` and runs dispatch and ingestion until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), CoordinatorError> {
        let families: Vec<&str> = self.families.iter().map(String::as_str).collect();
        self.queue.declare_topology(&families).await?;
        let hub = watch::WatchHub::new();
        let wake = Arc::new(Notify::new());
        let metrics = storyfarm_telemetry::CoordinatorMetrics::new();
        let api = service::Api {
            store: self.store.clone(),
            blobs: self.blobs.clone(),
            queue: self.queue.clone(),
            hub: hub.clone(),
            dispatch: wake.clone(),
            policy: self.policy.clone(),
            max_reference_bytes: self.max_reference_bytes,
            metrics: metrics.clone(),
        };
        let ingestor = Arc::new(ingest::Ingestor {
            store: self.store.clone(),
            queue: self.queue.clone(),
            hub,
            dispatch: wake.clone(),
            retry: self.retry,
            metrics: metrics.clone(),
        });
        let mut background = tokio::task::JoinSet::new();
        background.spawn(dispatch::run_dispatcher(
            self.store.clone(),
            self.queue.clone(),
            wake,
            Duration::from_millis(250),
            metrics.clone(),
        ));
        if let Some(listener) = self.metrics_listener {
            let scrape = Arc::new(crate::metrics::CoordinatorScrape {
                metrics: metrics.clone(),
                store: self.store.clone(),
                queue: self.queue.clone(),
                families: self.families.clone(),
            });
            background.spawn(async move {
                if let Err(e) =
                    storyfarm_telemetry::serve_metrics(listener, scrape, std::future::pending())
                        .await
                {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            });
        }
        let events = ingestor.clone();
        background.spawn(async move {
            if let Err(e) = events.run_events().await {
                tracing::error!(error = %e, "event ingestion stopped");
            }
        });
        background.spawn(async move {
            if let Err(e) = ingestor.run_dead_letters().await {
                tracing::error!(error = %e, "dead-letter ingestion stopped");
            }
        });

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<pb::job_service_server::JobServiceServer<service::Api>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let addr: SocketAddr = listener.local_addr()?;
        tracing::info!(%addr, "coordinator serving");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let max = self.max_reference_bytes + 1024 * 1024;
        tonic::transport::Server::builder()
            .trace_fn(|request| {
                let span = tracing::info_span!("grpc", path = %request.uri().path());
                if let Some(tp) = request
                    .headers()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                {
                    storyfarm_telemetry::continue_trace(&span, tp);
                }
                span
            })
            .add_service(health_service)
            .add_service(reflection)
            .add_service(pb::project_service_server::ProjectServiceServer::new(
                api.clone(),
            ))
            .add_service(
                pb::reference_service_server::ReferenceServiceServer::new(api.clone())
                    .max_decoding_message_size(max),
            )
            .add_service(pb::storyboard_service_server::StoryboardServiceServer::new(
                api.clone(),
            ))
            .add_service(pb::job_service_server::JobServiceServer::new(api))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        background.abort_all();
        Ok(())
    }
}
