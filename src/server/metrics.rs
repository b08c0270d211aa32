//! Prometheus metrics and what is served beside them: `/metrics`, `/healthz` and `/readyz` over
//! plain HTTP/1.1 on their own port, so scrapers and Kubernetes HTTP probes need no gRPC, and the
//! status page at `/` for people.
//!
//! Counters and histograms are recorded where things happen (documents at validation, steps and
//! publishing in the learner, so a batch whose client hung up still counts); the model version,
//! queue depth, selection and store lag are read from the live state at scrape time, so they
//! cannot go stale. The learner's step reports also go to a short ring for the status page.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramTimer, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use super::{page, State};
use crate::learn::UpdateReport;
use crate::live::Counters;

/// The server's metrics, in a registry of its own so that several servers in one process (tests,
/// the demo) do not mix their numbers.
pub(crate) struct Metrics {
    registry: Registry,
    ingest_tokens: IntCounter,
    ingest_documents: IntCounterVec,
    update_steps: IntCounterVec,
    update_seconds: Histogram,
    query_seconds: HistogramVec,
    queue_depth: IntGauge,
    model_version: IntGauge,
    selected_groups: IntGaugeVec,
    published_bytes: IntCounterVec,
    last_published_bytes: IntGaugeVec,
    publish_failures: IntCounterVec,
    model_bytes: IntGauge,
    published_version: IntGauge,
    learning_blocked: IntGauge,
    store_reached: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric.
    pub(crate) fn new() -> Metrics {
        // The names, labels and buckets are constants: registering them fails only on a bug.
        Self::register().expect("the metric definitions are valid")
    }

    fn register() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let ingest_tokens = IntCounter::new(
            "locus_ingest_tokens_total",
            "Tokens of ingested documents learned from (rate() gives tokens/s)",
        )?;
        let ingest_documents = IntCounterVec::new(
            Opts::new(
                "locus_ingest_documents_total",
                "Ingested documents by outcome",
            ),
            &["outcome"],
        )?;
        let update_steps = IntCounterVec::new(
            Opts::new(
                "locus_update_steps_total",
                "Learning steps, by whether they changed the weights",
            ),
            &["outcome"],
        )?;
        let update_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "locus_update_seconds",
                "Wall-clock seconds of a learning step",
            )
            .buckets(exponential_buckets(0.05, 2.0, 14)?),
        )?;
        let query_seconds = HistogramVec::new(
            HistogramOpts::new(
                "locus_query_seconds",
                "Query latency in seconds by RPC (Complete: until its last token; Completions: \
                 POST /v1/completions)",
            )
            .buckets(exponential_buckets(0.002, 2.0, 15)?),
            &["rpc"],
        )?;
        let queue_depth =
            IntGauge::new("locus_queue_depth", "Jobs waiting for the learner thread")?;
        let model_version = IntGauge::new(
            "locus_model_version",
            "Version of the snapshot queries are served from",
        )?;
        let selected_groups = IntGaugeVec::new(
            Opts::new(
                "locus_selected_groups",
                "1 for each layer group the strategy updates now, 0 for the others",
            ),
            &["layer", "module"],
        )?;
        let published_bytes = IntCounterVec::new(
            Opts::new(
                "locus_published_bytes_total",
                "Bytes a writer published to its store, by kind (delta or checkpoint)",
            ),
            &["kind"],
        )?;
        let last_published_bytes = IntGaugeVec::new(
            Opts::new(
                "locus_last_published_bytes",
                "Size of the newest published file, by kind; compare with locus_model_bytes",
            ),
            &["kind"],
        )?;
        let publish_failures = IntCounterVec::new(
            Opts::new(
                "locus_publish_failures_total",
                "Files a writer failed to publish, by kind",
            ),
            &["kind"],
        )?;
        let model_bytes = IntGauge::new(
            "locus_model_bytes",
            "Bytes of every weight of the served model, as a delta would hold them (f32)",
        )?;
        let published_version = IntGauge::new(
            "locus_published_version",
            "Newest version in the store (a writer: published; a reader: seen); the served \
             version is locus_model_version",
        )?;
        let learning_blocked = IntGauge::new(
            "locus_learning_blocked",
            "1 while batches cannot be journaled (Admin.Info.learning_blocked says why), else 0",
        )?;
        let store_reached = IntGauge::new(
            "locus_store_reached_timestamp_seconds",
            "Unix time the store of published versions last answered (time() minus it: how stale \
             a reader may be while its store is away)",
        )?;
        // Series that exist from the start read 0 rather than absent, so rates and alerts work
        // before the first event.
        for kind in ["delta", "checkpoint"] {
            published_bytes.with_label_values(&[kind]);
            last_published_bytes.with_label_values(&[kind]);
            publish_failures.with_label_values(&[kind]);
        }
        for outcome in ["accepted", "rejected"] {
            ingest_documents.with_label_values(&[outcome]);
        }
        for outcome in ["applied", "skipped"] {
            update_steps.with_label_values(&[outcome]);
        }
        for rpc in ["Score", "Complete", "Perplexity", "Completions"] {
            query_seconds.with_label_values(&[rpc]);
        }
        registry.register(Box::new(ingest_tokens.clone()))?;
        registry.register(Box::new(ingest_documents.clone()))?;
        registry.register(Box::new(update_steps.clone()))?;
        registry.register(Box::new(update_seconds.clone()))?;
        registry.register(Box::new(query_seconds.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(model_version.clone()))?;
        registry.register(Box::new(selected_groups.clone()))?;
        registry.register(Box::new(published_bytes.clone()))?;
        registry.register(Box::new(last_published_bytes.clone()))?;
        registry.register(Box::new(publish_failures.clone()))?;
        registry.register(Box::new(model_bytes.clone()))?;
        registry.register(Box::new(published_version.clone()))?;
        registry.register(Box::new(learning_blocked.clone()))?;
        registry.register(Box::new(store_reached.clone()))?;
        Ok(Metrics {
            registry,
            ingest_tokens,
            ingest_documents,
            update_steps,
            update_seconds,
            query_seconds,
            queue_depth,
            model_version,
            selected_groups,
            published_bytes,
            last_published_bytes,
            publish_failures,
            model_bytes,
            published_version,
            learning_blocked,
            store_reached,
        })
    }

    /// A timer that records the latency of one query RPC when dropped.
    pub(crate) fn query_timer(&self, rpc: &str) -> HistogramTimer {
        self.query_seconds.with_label_values(&[rpc]).start_timer()
    }

    /// Records the documents of one validated ingest batch.
    pub(crate) fn documents(&self, accepted: usize, rejected: usize) {
        self.ingest_documents
            .with_label_values(&["accepted"])
            .inc_by(accepted as u64);
        self.ingest_documents
            .with_label_values(&["rejected"])
            .inc_by(rejected as u64);
    }

    /// Files that failed to publish, of every kind.
    pub(crate) fn publish_failures(&self) -> u64 {
        ["delta", "checkpoint"]
            .iter()
            .map(|k| self.publish_failures.with_label_values(&[k]).get())
            .sum()
    }

    /// The metrics in the Prometheus text format, with the live gauges read from `state` now.
    fn render(&self, state: &State) -> Vec<u8> {
        if let Ok(loaded) = state.loaded() {
            let current = loaded.snapshots.current();
            self.model_version.set(current.version() as i64);
            self.model_bytes.set(current.bytes() as i64);
            self.published_version
                .set(loaded.published.load(Ordering::SeqCst) as i64);
            self.queue_depth.set(loaded.learner.queued() as i64);
            let selection = loaded.learner.progress().selection;
            for g in loaded.model.groups() {
                let layer = g.layer.to_string();
                let module = g.module.to_string();
                self.selected_groups
                    .with_label_values(&[layer.as_str(), module.as_str()])
                    .set(i64::from(selection.contains(&g)));
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec fails only for invalid metric names, which `new` already rejected.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

impl Counters for Metrics {
    /// Counts one learning step, as the learner finishes it.
    fn stepped(&self, report: &UpdateReport) {
        self.ingest_tokens.inc_by(report.tokens as u64);
        self.update_seconds.observe(report.seconds);
        let outcome = if report.applied { "applied" } else { "skipped" };
        self.update_steps.with_label_values(&[outcome]).inc();
    }

    /// Records a file published to the store, with its size (`None`: it failed).
    fn published(&self, kind: &str, bytes: Option<u64>) {
        match bytes {
            Some(n) => {
                self.published_bytes.with_label_values(&[kind]).inc_by(n);
                self.last_published_bytes
                    .with_label_values(&[kind])
                    .set(n as i64);
            }
            None => self.publish_failures.with_label_values(&[kind]).inc(),
        }
    }

    fn set_learning_blocked(&self, blocked: bool) {
        self.learning_blocked.set(i64::from(blocked));
    }

    fn store_reached(&self, unix: u64) {
        self.store_reached.set(unix as i64);
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` and the status page `/` on `listener` until the task is dropped; it keeps
/// answering while the gRPC server drains, so probes see `/readyz` fail during shutdown.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    let patience = state.config.limits.send_timeout;
    super::http::serve(listener, "metrics", patience, None, move |request| {
        let answer = respond(&state, &request);
        async move { answer }
    })
    .await
}

/// The answer to one HTTP request.
fn respond<B>(state: &State, request: &Request<B>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| (status, "text/plain", Bytes::from(body));
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            Bytes::from(state.metrics.render(state)),
        ),
        (&Method::GET, "/") => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from(page::render(state)),
        ),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.loaded().is_err() {
                text(StatusCode::SERVICE_UNAVAILABLE, "model not loaded\n")
            } else if *state.shutdown.borrow() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (_, "/" | "/metrics" | "/healthz" | "/readyz") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /, /metrics, /healthz, /readyz\n",
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
