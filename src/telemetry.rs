//! Logging and distributed tracing: the `tracing` subscriber of the `locus` binary, with spans
//! exported over plaintext OTLP/gRPC (a collector beside the server) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! Log lines go to stderr, filtered by `RUST_LOG` (default `warn`). The exporter gets `locus`'s
//! spans and events at `info` and above whatever `RUST_LOG` says, so a quiet terminal still sends
//! every RPC and update span. The standard `OTEL_*` variables (service name, headers, timeout,
//! resource attributes) apply.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The variable whose presence turns OTLP export on.
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// What setting up telemetry can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter rejected its configuration (a malformed endpoint, say).
    #[error("OTLP exporter ({OTLP_ENDPOINT}): {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The runtime the exporter sends from could not start.
    #[error("starting the OTLP export runtime: {0}")]
    Runtime(std::io::Error),
    /// A global subscriber was already installed.
    #[error("installing the tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Installed telemetry; dropping it flushes the spans not yet exported.
pub struct Telemetry {
    otlp: Option<Otlp>,
}

/// The OTLP pipeline and the runtime its gRPC client lives on.
struct Otlp {
    provider: SdkTracerProvider,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Installs the global subscriber: stderr logs, plus OTLP export when [`OTLP_ENDPOINT`] is set
/// and not empty.
pub fn init() -> Result<Telemetry, TelemetryError> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")));
    let otlp = match std::env::var_os(OTLP_ENDPOINT) {
        Some(v) if !v.is_empty() => Some(Otlp::start()?),
        _ => None,
    };
    let export = otlp.as_ref().map(|o| {
        tracing_opentelemetry::layer()
            .with_tracer(o.provider.tracer("locus"))
            .with_filter(Targets::new().with_target("locus", Level::INFO))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(export)
        .try_init()?;
    Ok(Telemetry { otlp })
}

impl Otlp {
    fn start() -> Result<Otlp, TelemetryError> {
        // The SDK exports from its own thread with a plain executor, but tonic needs a tokio
        // reactor: export calls are handed to this runtime, which every command then has.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("locus-otlp")
            .enable_all()
            .build()
            .map_err(TelemetryError::Runtime)?;
        let exporter = {
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?
        };
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("locus");
        }
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_batch_exporter(OnRuntime {
                inner: Arc::new(exporter),
                runtime: runtime.handle().clone(),
            })
            .build();
        Ok(Otlp {
            provider,
            runtime: Some(runtime),
        })
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(otlp) = &mut self.otlp {
            if let Err(e) = otlp.provider.shutdown() {
                eprintln!("locus: flushing spans to {OTLP_ENDPOINT}: {e}");
            }
            if let Some(runtime) = otlp.runtime.take() {
                // Dropping a runtime blocks, which panics when this runs inside another runtime.
                runtime.shutdown_background();
            }
        }
    }
}

/// An exporter that runs each export on a tokio runtime.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = Arc::clone(&self.inner);
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            task.await
                .map_err(|e| OTelSdkError::InternalFailure(format!("OTLP export task: {e}")))?
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // The provider sets the resource while it is built, before any export holds a clone.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}
