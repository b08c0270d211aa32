//! `locus serve`: the gRPC services (Learn, Query, Admin), health and reflection, auth and limits.
//!
//! The server holds one live model ([`crate::live`]): a dedicated learner thread applies batches
//! from a bounded queue and publishes an immutable snapshot after every update; queries compute on
//! the snapshot they took when they started. Conversions between the API and the library live in
//! this module; nothing here writes weights.

mod admin;
mod auth;
mod convert;
mod deadline;
mod error;
mod http;
mod ingest;
mod metrics;
mod openai;
mod outbox;
mod page;
mod query;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tonic::service::interceptor::InterceptedService;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::learn::history::History;
use crate::learn::LearnConfig;
use crate::live;
use crate::model::Model;
use crate::proto::v1::admin_server::AdminServer;
use crate::proto::v1::learn_server::LearnServer;
use crate::proto::v1::query_server::QueryServer;
use crate::snapshot::{Snapshot, Snapshots};
use crate::store::publish::Published;

pub use crate::live::Guard;
pub use auth::{Auth, Token};
pub use error::{ServerError, MAX_CLIENT_MESSAGE};
pub use metrics::serve as serve_metrics;
pub use openai::serve as serve_openai;
pub use openai::{MODEL as OPENAI_MODEL, VERSION_HEADER};

/// The services whose health is reported, besides the whole server (`""`).
const SERVICES: [&str; 3] = [
    crate::proto::v1::learn_server::SERVICE_NAME,
    crate::proto::v1::query_server::SERVICE_NAME,
    crate::proto::v1::admin_server::SERVICE_NAME,
];

/// Bytes a client may send on one stream before the server reads them.
const STREAM_WINDOW: u32 = 1 << 20;

/// Limits on what one request or client may ask of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest encoded message in either direction, in bytes.
    pub max_message_bytes: usize,
    /// Longest document or query text, in tokens.
    pub max_document_tokens: usize,
    /// Documents in one ingest batch, texts in one trace or perplexity request, prompts in one
    /// HTTP completion request.
    pub max_documents: usize,
    /// Candidates in one score request.
    pub max_candidates: usize,
    /// Stop strings in one completion request.
    pub max_stop_strings: usize,
    /// Bytes of all stop strings of one completion request together.
    pub max_stop_bytes: usize,
    /// Salient strings of one document or traced text.
    pub max_salient: usize,
    /// Spans of one document or traced text.
    pub max_spans: usize,
    /// Bytes of a document's `source` and of a batch's `client_batch_id`.
    pub max_label_bytes: usize,
    /// Tokens one completion may generate.
    pub max_complete_tokens: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Queries computed at once (each occupies a CPU thread pool for its forward passes).
    pub query_concurrency: usize,
    /// How long a query waits for a free slot before RESOURCE_EXHAUSTED.
    pub query_wait: Duration,
    /// Batches waiting for the learner; a full queue makes ingest streams wait (flow control).
    pub queue_depth: usize,
    /// How long an answer of a stream (a completion's chunk, an ingest answer) waits for the client
    /// to take it; then the stream ends with DEADLINE_EXCEEDED and frees what it holds. Over HTTP,
    /// how long a client has to send a request's headers, and then its body.
    pub send_timeout: Duration,
    /// How long an ingest stream may go without a batch, the first included, before it is ended.
    pub ingest_idle: Duration,
    /// Quiet time on a connection before the server pings the client (`None`: no pings).
    pub keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered before the server closes the connection.
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 << 20,
            max_document_tokens: 512,
            max_documents: 64,
            max_candidates: 64,
            max_stop_strings: 64,
            max_stop_bytes: 4096,
            max_salient: 64,
            max_spans: 256,
            max_label_bytes: 256,
            max_complete_tokens: 256,
            max_concurrent_streams: 64,
            query_concurrency: 2,
            query_wait: Duration::from_secs(30),
            queue_depth: 4,
            send_timeout: Duration::from_secs(30),
            ingest_idle: Duration::from_secs(300),
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Everything the server is configured with besides the model.
#[derive(Debug, Clone)]
pub struct Config {
    /// Learning settings (strategy, localization, learning rate, ...).
    pub learn: LearnConfig,
    /// Documents per learning step; a larger batch is learned in consecutive steps.
    pub batch_size: usize,
    /// Replay paragraphs for Mix-Review strategies.
    pub replay: Vec<String>,
    /// Model versions retained for rollback (each shares unchanged tensors with its neighbours).
    pub keep_versions: usize,
    /// How far below queries the learner computes, as a `nice` increment (0 to 19).
    pub learner_nice: i32,
    /// Request limits.
    pub limits: Limits,
    /// Bearer tokens.
    pub auth: Auth,
    /// How long shutdown waits for streams in flight before it drops them.
    pub shutdown_grace: Duration,
    /// Serve over TLS with this certificate and key (`None`: plaintext).
    pub tls: Option<Tls>,
    /// Journal and checkpoints in a data directory (`None`: in memory only).
    pub durability: Option<crate::store::Durability>,
    /// Whether this server learns and publishes, or follows a writer.
    pub role: Role,
    /// The store (a directory or an object-store URL) a writer publishes its versions to and
    /// readers follow.
    pub store: Option<String>,
    /// How often a reader looks for new versions in the store.
    pub follow_interval: Duration,
    /// Undo updates that raise canary perplexity too much (`None`: off).
    pub guard: Option<Guard>,
}

/// What a server does with model versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Learns from ingested documents and publishes each version (one per deployment).
    #[default]
    Writer,
    /// Serves queries on the versions a writer publishes to the store (any number).
    Reader,
}

impl Role {
    /// The role's name, as `--role` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Reader => "reader",
        }
    }
}

/// A PEM certificate chain and its PEM private key.
#[derive(Clone)]
pub struct Tls {
    /// The certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// The private key of the leaf certificate.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret; say only that there is one.
        f.write_str("Tls(<certificate and key>)")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            learn: LearnConfig::default(),
            batch_size: 8,
            replay: Vec::new(),
            keep_versions: 4,
            learner_nice: 10,
            limits: Limits::default(),
            auth: Auth::default(),
            shutdown_grace: Duration::from_secs(30),
            tls: None,
            durability: None,
            role: Role::Writer,
            store: None,
            follow_interval: Duration::from_secs(1),
            guard: None,
        }
    }
}

/// The live model once loaded: its snapshots, the learner and the query slots.
struct Loaded {
    model: Arc<Model>,
    snapshots: Arc<Snapshots>,
    learner: Arc<live::Handle>,
    queries: Arc<Semaphore>,
    paused: Arc<AtomicBool>,
    /// The newest version published (writer) or seen in the store (reader).
    published: Arc<AtomicU64>,
    /// Whether the store of published versions answers.
    store_health: Arc<live::StoreHealth>,
    /// The recent learning steps, for the status page.
    history: Arc<History>,
}

/// What [`State::open`] makes before the learner starts.
struct Opened {
    /// The first served version: the base model, or the data directory's newest checkpoint.
    snapshot: Snapshot,
    /// The data directory, when there is one.
    store: Option<crate::store::Store>,
    /// What the learner replays from it.
    restored: Option<crate::store::Restored>,
    /// The base model's hash (readers only).
    base_hash: Option<String>,
}

/// The state the services share; the model is installed once it has loaded.
pub struct State {
    config: Config,
    health: HealthReporter,
    loaded: OnceLock<Loaded>,
    shutdown: watch::Sender<bool>,
    metrics: Arc<metrics::Metrics>,
}

impl State {
    /// A server state without a model: health says NOT_SERVING and the services UNAVAILABLE until
    /// [`State::install`].
    pub async fn new(mut config: Config) -> Arc<State> {
        // Accepted documents are within the token limit; the learner must not truncate them.
        config.learn.max_tokens = config.limits.max_document_tokens;
        let health = HealthReporter::new();
        for name in std::iter::once("").chain(SERVICES) {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        Arc::new(State {
            config,
            health,
            loaded: OnceLock::new(),
            shutdown: watch::channel(false).0,
            metrics: Arc::new(metrics::Metrics::new()),
        })
    }

    /// Installs the model: copies its weights into the first snapshot, starts the learner thread
    /// and reports SERVING.
    pub async fn install(&self, model: Model) -> Result<(), ServerError> {
        let publish = self.store()?;
        let model = Arc::new(model);
        let reader = self.config.role == Role::Reader;
        let Opened {
            snapshot,
            store,
            restored,
            base_hash,
        } = self.open(Arc::clone(&model), reader).await?;
        let snapshots = Arc::new(Snapshots::new(snapshot, self.config.keep_versions));
        let paused = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let store_health = Arc::new(live::StoreHealth::new(self.metrics.clone()));
        let history = Arc::new(History::default());
        let learner = Arc::new(live::Handle::spawn(live::Setup {
            model: Arc::clone(&model),
            snapshots: Arc::clone(&snapshots),
            learn: self.config.learn.clone(),
            replay: self.config.replay.clone(),
            batch_size: self.config.batch_size.max(1),
            queue_depth: self.config.limits.queue_depth.max(1),
            nice: self.config.learner_nice,
            paused: Arc::clone(&paused),
            store,
            publish: publish.clone().filter(|_| !reader),
            guard: self
                .config
                .guard
                .as_ref()
                .map(|g| g.prepare(&model))
                .transpose()?,
            published: Arc::clone(&published),
            metrics: self.metrics.clone(),
            history: Arc::clone(&history),
            store_health: Arc::clone(&store_health),
        })?);
        if let Some(restored) = restored {
            learner.replay(restored).await?;
        }
        live::keep_store_repaired(Arc::clone(&learner), self.shutting_down());
        if let (Some(store), Some(base_hash)) = (publish, base_hash) {
            let follower = live::Follower {
                store,
                base_hash,
                device: model.device().clone(),
                snapshots: Arc::clone(&snapshots),
                learner: Arc::clone(&learner),
                published: Arc::clone(&published),
                health: Arc::clone(&store_health),
                history: Arc::clone(&history),
            };
            let version = follower.catch_up().await?;
            tracing::info!(version, "reader caught up with the store");
            follower.spawn(self.config.follow_interval, self.shutting_down());
        }
        let loaded = Loaded {
            model,
            snapshots,
            learner,
            queries: Arc::new(Semaphore::new(self.config.limits.query_concurrency.max(1))),
            paused,
            published,
            store_health,
            history,
        };
        if self.loaded.set(loaded).is_err() {
            return Err(ServerError::Internal("a model is already installed".into()));
        }
        if !*self.shutdown.borrow() {
            self.set_health(ServingStatus::Serving).await;
        }
        tracing::info!(role = self.config.role.name(), "model installed; serving");
        Ok(())
    }

    /// Opens the data directory and makes the first snapshot, off the async threads: the data
    /// directory's checkpoint goes into the weights before the snapshot is taken, and a reader
    /// hashes the base model to check the store's versions against it.
    async fn open(&self, model: Arc<Model>, reader: bool) -> Result<Opened, ServerError> {
        let durability = self.config.durability.clone();
        let strategy = self.config.learn.strategy.name.clone();
        tokio::task::spawn_blocking(move || {
            let (store, restored) = live::open_store(&model, durability, &strategy)?;
            let base_hash = if reader {
                Some(crate::store::model_hash(&model)?)
            } else {
                None
            };
            let version = restored.as_ref().map_or(0, |r| r.version);
            Ok(Opened {
                snapshot: Snapshot::load(model, version)?,
                store,
                restored,
                base_hash,
            })
        })
        .await
        .map_err(|e| ServerError::Internal(format!("loading the snapshot: {e}")))?
    }

    /// The store of published versions, checked against the role: a writer publishes only what
    /// its data directory makes durable, and a reader keeps no data directory of its own.
    fn store(&self) -> Result<Option<Published>, ServerError> {
        let c = &self.config;
        let Some(dir) = &c.store else {
            return match c.role {
                Role::Writer => Ok(None),
                Role::Reader => Err(ServerError::invalid(
                    "store",
                    "a reader needs --store, the directory or object-store URL its writer publishes to",
                )),
            };
        };
        match (c.role, &c.durability) {
            (Role::Writer, None) => Err(ServerError::invalid(
                "store",
                "a writer publishes only with --data-dir, so that versions survive its restarts",
            )),
            (Role::Reader, Some(_)) => Err(ServerError::invalid(
                "data-dir",
                "a reader keeps no data directory; it restores from --store",
            )),
            _ => Published::open(dir)
                .map(Some)
                .map_err(|e| ServerError::invalid("store", e.to_string())),
        }
    }

    /// Refuses `what` on a reader, which follows its writer's versions and changes none itself.
    fn writable(&self, what: &'static str) -> Result<(), ServerError> {
        match (self.config.role, &self.config.store) {
            (Role::Reader, Some(store)) => Err(ServerError::Reader {
                store: store.clone(),
                what,
            }),
            _ => Ok(()),
        }
    }

    fn loaded(&self) -> Result<&Loaded, ServerError> {
        self.loaded.get().ok_or(ServerError::NotLoaded)
    }

    fn shutting_down(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    async fn set_health(&self, status: ServingStatus) {
        for name in std::iter::once("").chain(SERVICES) {
            self.health.set_service_status(name, status).await;
        }
    }

    /// Reports NOT_SERVING and tells open ingest streams to stop reading new batches.
    async fn begin_shutdown(&self) {
        self.set_health(ServingStatus::NotServing).await;
        self.shutdown.send_replace(true);
        tracing::info!("shutting down: health NOT_SERVING, ingest streams finishing");
    }

    /// Stops the learner thread once the batches already queued are done.
    async fn stop_learner(&self) {
        if let Some(loaded) = self.loaded.get() {
            loaded.learner.stop().await;
        }
    }
}

/// Server reflection (both protocol versions) over locus's and the health service's descriptors.
fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServerError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let error = |e: tonic_reflection::server::Error| {
        ServerError::Internal(format!("reflection descriptors: {e}"))
    };
    Ok((
        builder().build_v1().map_err(error)?,
        builder().build_v1alpha().map_err(error)?,
    ))
}

/// Accepted connections with Nagle's algorithm off: without it a response written in pieces (a
/// message and then its trailers) waits for the client's delayed ACK, about 40 ms on Linux.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The HTTP/2 transport with the configured TLS, stream limit, keep-alive and flow-control
/// windows, before any layer or service.
fn transport(state: &State) -> Result<tonic::transport::Server, ServerError> {
    let limits = &state.config.limits;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &state.config.tls {
        crate::tls::choose_provider();
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        ))?;
    }
    Ok(builder
        .max_concurrent_streams(limits.max_concurrent_streams)
        // A peer that is gone without closing (a dead host, a dropped route) answers no ping; its
        // connection and every stream on it are dropped.
        .http2_keepalive_interval(limits.keepalive_interval)
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        // HTTP/2 flow control is per connection as well as per stream: an ingest stream waiting
        // for the learner leaves up to one stream window unread, and with equal windows that
        // would stall every query sharing its connection. The connection window has room for
        // many stalled streams.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW * 16))
}

/// Serves every service on `listener` until `shutdown` completes, then shuts down gracefully:
/// health NOT_SERVING first, no new connections, ingest streams finish the batches they already
/// read, and after `Config::shutdown_grace` whatever is left is dropped. The learner thread is
/// stopped before this returns.
pub async fn run(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let limits = &state.config.limits;
    let bytes = limits.max_message_bytes;
    let send_timeout = limits.send_timeout;
    let health = tonic_health::pb::health_server::HealthServer::new(
        HealthService::from_health_reporter(state.health.clone()),
    );
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let auth = &state.config.auth;
    let learn = InterceptedService::new(
        LearnServer::new(ingest::LearnService::new(Arc::clone(&state)))
            .max_decoding_message_size(bytes)
            .max_encoding_message_size(bytes),
        auth::Bearer::write(auth),
    );
    let query = InterceptedService::new(
        QueryServer::new(query::QueryService::new(Arc::clone(&state)))
            .max_decoding_message_size(bytes)
            .max_encoding_message_size(bytes),
        auth::Bearer::query(auth),
    );
    let admin = InterceptedService::new(
        AdminServer::new(admin::AdminService::new(Arc::clone(&state)))
            .max_decoding_message_size(bytes)
            .max_encoding_message_size(bytes),
        auth::Bearer::write(auth),
    );
    let (fired, signalled) = tokio::sync::oneshot::channel::<()>();
    let signal_state = Arc::clone(&state);
    let signal = async move {
        shutdown.await;
        signal_state.begin_shutdown().await;
        let _ = fired.send(());
    };
    let serve = transport(&state)?
        // One span per RPC, health and reflection included; handlers' spans nest inside it.
        .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()))
        .layer(tower::layer::layer_fn(error::CodecErrors::new))
        .layer(tower::layer::layer_fn(move |s| {
            deadline::MessageDeadline::new(s, send_timeout)
        }))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(learn)
        .add_service(query)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming(listener), signal);
    tokio::pin!(serve);
    let grace = state.config.shutdown_grace;
    let result = tokio::select! {
        r = &mut serve => r,
        _ = signalled => match tokio::time::timeout(grace, &mut serve).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("streams still open after {grace:?}; dropping them");
                Ok(())
            }
        },
    };
    state.stop_learner().await;
    result.map_err(ServerError::from)
}
