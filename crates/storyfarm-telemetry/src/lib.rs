//! Telemetry of the farm's processes: the Prometheus metrics the coordinator and every worker
//! export, the `/metrics` endpoint that serves them, and logs and OTLP trace export. Metric names and labels are defined here
//! and nowhere else, so dashboards and alert rules have one place to check against.

pub mod endpoint;
pub mod metrics;
pub mod traces;

pub use endpoint::{serve_metrics, MetricsEndpointError, Scrape};
pub use futures::future::BoxFuture;
pub use metrics::{CoordinatorMetrics, FarmSnapshot, QueueSnapshot, WorkerMetrics, METRIC_NAMES};
/// The registry a [`Scrape`] encodes (re-exported so callers need no prometheus-client).
pub use prometheus_client::registry::Registry;
pub use traces::{continue_trace, init_tracing, traceparent_of, TraceSetupError, Tracing};
