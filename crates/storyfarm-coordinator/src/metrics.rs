//! What the coordinator's `/metrics` endpoint serves: its counters, plus the store's live counts
//! and the broker's queue depths read at scrape time.

use std::sync::Arc;

use futures::future::BoxFuture;
use storyfarm_queue::TaskQueue;
use storyfarm_store::MetadataStore;
use storyfarm_telemetry::{CoordinatorMetrics, FarmSnapshot, QueueSnapshot, Registry, Scrape};

pub struct CoordinatorScrape {
    pub metrics: CoordinatorMetrics,
    pub store: Arc<dyn MetadataStore>,
    pub queue: Arc<dyn TaskQueue>,
    pub families: Vec<String>,
}

impl CoordinatorScrape {
    async fn refresh_store(&self) {
        match self.store.farm_counts().await {
            Ok(c) => self.metrics.set_farm(&FarmSnapshot {
                jobs: c
                    .jobs
                    .iter()
                    .map(|(s, n)| (s.as_str().to_string(), *n))
                    .collect(),
                frames: c
                    .frames
                    .iter()
                    .map(|(s, n)| (s.as_str().to_string(), *n))
                    .collect(),
                tasks: c
                    .tasks
                    .iter()
                    .map(|(k, s, n)| (k.as_str().to_string(), s.to_string(), *n))
                    .collect(),
                busy_workers: c.busy_workers,
                oldest_heartbeat_age_seconds: c
                    .oldest_heartbeat_age
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: store counts not read");
                self.metrics.refresh_failed("store");
            }
        }
    }

    async fn refresh_broker(&self) {
        let families: Vec<&str> = self.families.iter().map(String::as_str).collect();
        match self.queue.queue_stats(&families).await {
            Ok(stats) => self.metrics.set_queues(
                &stats
                    .into_iter()
                    .map(|s| QueueSnapshot {
                        queue: s.queue,
                        messages: s.messages,
                        consumers: s.consumers,
                    })
                    .collect::<Vec<_>>(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: queue depths not read");
                self.metrics.refresh_failed("broker");
            }
        }
    }
}

impl Scrape for CoordinatorScrape {
    fn refresh(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            tokio::join!(self.refresh_store(), self.refresh_broker());
        })
    }

    fn registry(&self) -> &Registry {
        self.metrics.registry()
    }
}
