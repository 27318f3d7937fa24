//! The adapter process's HTTP endpoints: `/healthz`, `/readyz` and `/metrics`.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{COUNTERS, Metrics};

/// Checks whether the system can be worked with (see `SystemAdapter::check`).
pub(crate) type Check =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What the endpoints read.
#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) ready: watch::Receiver<bool>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) check: Check,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState").finish_non_exhaustive()
    }
}

impl HttpState {
    pub(crate) fn new(
        system: &str,
        ready: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        check: Check,
    ) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "concord_adapter",
            [("system".into(), system.to_owned().into())].into_iter(),
        );
        registry.register_collector(Box::new(Counters {
            metrics,
            ready: ready.clone(),
        }));
        HttpState {
            ready,
            registry: Arc::new(registry),
            check,
        }
    }
}

/// The engine's counters, read at every scrape.
#[derive(Debug)]
struct Counters {
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
}

impl Collector for Counters {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshot = self.metrics.snapshot();
        for (name, help, value) in COUNTERS
            .iter()
            .map(|c| (c.name, c.help, (c.read)(&snapshot)))
        {
            let counter = ConstCounter::new(value);
            let m = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(m)?;
        }
        let connected = ConstGauge::new(i64::from(*self.ready.borrow()));
        let m = encoder.encode_descriptor(
            "connected",
            "1 while connected to the broker and consuming the inbox",
            None,
            connected.metric_type(),
        )?;
        connected.encode(m)?;
        Ok(())
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if !*state.ready.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not connected to the broker\n".to_owned(),
        );
    }
    match tokio::time::timeout(std::time::Duration::from_secs(5), (state.check)()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the system: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the system did not answer in 5 s\n".to_owned(),
        ),
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        let _ = write!(text, "# encoding failed: {e}");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// Serves the endpoints on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
