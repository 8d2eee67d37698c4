//! The `/metrics` HTTP endpoint (Prometheus text format 0.0.4) of the coordinator and the workers,
//! beside their real work: a scrape first refreshes the figures read from elsewhere (the store,
//! the broker, the GPU), bounded in time so a hung dependency cannot hang the scrape.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// How long a scrape waits for live figures before answering with the last ones.
const REFRESH_BOUND: Duration = Duration::from_secs(5);

/// What a `/metrics` endpoint serves.
pub trait Scrape: Send + Sync + 'static {
    /// Updates the figures read from other systems; failures are counted and logged by the
    /// implementation, never returned (the scrape still answers).
    fn refresh(&self) -> BoxFuture<'_, ()>;
    fn registry(&self) -> &Registry;
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsEndpointError {
    #[error("metrics listener {addr}: {source}")]
    Accept {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

async fn answer(source: Arc<dyn Scrape>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => {
            if tokio::time::timeout(REFRESH_BOUND, source.refresh())
                .await
                .is_err()
            {
                tracing::warn!(
                    "metrics refresh took longer than {REFRESH_BOUND:?}; serving the last figures"
                );
            }
            let mut text = String::new();
            match prometheus_client::encoding::prometheus_text::encode(&mut text, source.registry())
            {
                Ok(()) => reply(
                    StatusCode::OK,
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    text,
                ),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "metrics could not be encoded\n".into(),
                ),
            }
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".into(),
        ),
    }
}

/// Serves `/metrics` (and `/healthz`) on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    source: Arc<dyn Scrape>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), MetricsEndpointError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tracing::info!(%addr, "metrics endpoint serving /metrics");
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: wait instead of spinning.
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "metrics endpoint could not accept; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(source) => return Err(MetricsEndpointError::Accept { addr, source }),
            },
        };
        let source = source.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let source = source.clone();
                async move { Ok::<_, Infallible>(answer(source, request).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(24) // EMFILE
        || e.raw_os_error() == Some(23) // ENFILE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::CoordinatorMetrics;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Counting {
        metrics: CoordinatorMetrics,
        refreshes: AtomicUsize,
        hang: bool,
    }

    impl Scrape for Counting {
        fn refresh(&self) -> BoxFuture<'_, ()> {
            Box::pin(async move {
                self.refreshes.fetch_add(1, Ordering::SeqCst);
                self.metrics.job_submitted();
                if self.hang {
                    std::future::pending::<()>().await;
                }
            })
        }
        fn registry(&self) -> &Registry {
            self.metrics.registry()
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    async fn start(hang: bool) -> (SocketAddr, Arc<Counting>, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source = Arc::new(Counting {
            metrics: CoordinatorMetrics::new(),
            refreshes: AtomicUsize::new(0),
            hang,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served: Arc<dyn Scrape> = source.clone();
        tokio::spawn(serve_metrics(listener, served, async {
            let _ = stopped.await;
        }));
        (addr, source, stop)
    }

    #[tokio::test]
    async fn a_scrape_refreshes_then_answers_in_the_text_format() {
        let (addr, source, _stop) = start(false).await;
        let response = get(addr, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.contains("content-type: text/plain; version=0.0.4"),
            "{response}"
        );
        assert!(
            response.contains("storyfarm_jobs_submitted_total 1"),
            "{response}"
        );
        assert_eq!(source.refreshes.load(Ordering::SeqCst), 1);
        let response = get(addr, "/nope").await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
        let response = get(addr, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_refresh_still_answers_with_the_last_figures() {
        let (addr, _source, _stop) = start(true).await;
        let response = get(addr, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("storyfarm_build_info"), "{response}");
    }
}
