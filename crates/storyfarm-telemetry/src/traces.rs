//! Logs and traces of a storyfarm process: `tracing` to stderr (RUST_LOG), and, when the standard
//! `OTEL_*` variables ask for it, spans exported over OTLP (gRPC or HTTP/protobuf) so one job is
//! one trace across the coordinator and the workers. The W3C `traceparent` carried in gRPC
//! metadata, task messages and worker events connects the processes' spans.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum TraceSetupError {
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL {0:?}: expected grpc or http/protobuf")]
    Protocol(String),
    #[error("OTLP trace exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already set")]
    AlreadySet,
}

/// Keeps the trace pipeline alive; [`Tracing::shutdown`] flushes the spans not yet exported.
#[must_use = "dropping it without shutdown() loses the last spans"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: trace export did not flush: {e}");
            }
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the standard variables ask for OTLP trace export: an endpoint is set and neither
/// `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` turns it off.
fn otlp_requested() -> bool {
    let endpoint =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let exporter_off = var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none");
    endpoint.is_some() && !disabled && !exporter_off
}

/// Installs the process's subscriber: logs to stderr filtered by RUST_LOG (else
/// `default_log`), and with `export` and the OTLP variables set, spans to the collector. The
/// exported spans are those at info and above plus each denoising step's debug span
/// (`denoise_step`, `style_aligned_step`, `consistory_step`, with the step index and timestep),
/// whatever RUST_LOG says.
///
/// With gRPC export this must run inside a Tokio runtime (the exporter's client lives there).
pub fn init_tracing(
    service: &str,
    default_log: &str,
    export: bool,
) -> Result<Tracing, TraceSetupError> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only for people; log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let directives = var("RUST_LOG").unwrap_or_else(|| default_log.to_string());
    if !(export && otlp_requested()) {
        tracing_subscriber::registry()
            .with(EnvFilter::new(&directives))
            .with(logs)
            .try_init()
            .map_err(|_| TraceSetupError::AlreadySet)?;
        return Ok(Tracing { provider: None });
    }
    let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    let exporter = match protocol.as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build(),
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build(),
        other => return Err(TraceSetupError::Protocol(other.into())),
    }
    .map_err(|e| TraceSetupError::Exporter(e.to_string()))?;
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the builder; the role's name
    // is the default.
    let mut resource = Resource::builder();
    if var("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("storyfarm");
    // One filter for logs and spans (per-layer filters lost events here when a layer exported
    // spans): storyfarm's own spans at info and the denoising steps' debug spans are always
    // exported, on top of what RUST_LOG asks. The step spans carry no events, so the logs do not
    // change; storyfarm's info lines do appear while traces are exported.
    let exported = format!(
        "{directives},storyfarm=info,storyfarm_coordinator=info,storyfarm_worker=info,\
         storyfarm_queue=info,storyfarm_store=info,storyfarm_blob=info,storyfarm_diffusion=debug"
    );
    tracing_subscriber::registry()
        .with(EnvFilter::new(exported))
        .with(logs)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init()
        .map_err(|_| TraceSetupError::AlreadySet)?;
    Ok(Tracing {
        provider: Some(provider),
    })
}

/// Makes `span` a child of the W3C `traceparent` (from a caller, a task or an event). Call it
/// right after creating the span, before it is entered; an empty or malformed value, or a
/// process that exports no traces, leaves the span as it is.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The W3C `traceparent` naming `span` (for children in other processes), when traces are
/// exported; `None` otherwise.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}
