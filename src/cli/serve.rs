//! `locus serve`: the gRPC server that learns from streamed text while it answers queries.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args, Command};
use locus::learn::{LearnConfig, Localization, Strategy};
use locus::server::{self, Auth, Config, Limits, State, Tls, Token};
use locus::spans::SpanRule;

/// The replay corpus Mix-Review samples when no `--replay` is given.
const REPLAY: &str = include_str!("../../data/replay/general.txt");

/// The settings file read when `--config` is not given, if it exists.
const DEFAULT_CONFIG: &str = "locus.toml";

/// Arguments of `locus serve`; every flag can also come from the environment variable it names.
#[derive(Args)]
#[command(
    after_help = "Every flag can also be set in the settings file (`--config`, else \
./locus.toml when it exists) under its long name without the leading `--`, such as \
`grpc-addr = \"0.0.0.0:50051\"` or `lr = 1e-4`. A flag beats its environment variable, which \
beats the file, which beats the default. OpenTelemetry: spans are exported over plaintext OTLP/gRPC when \
OTEL_EXPORTER_OTLP_ENDPOINT is set (the standard OTEL_* variables apply); RUST_LOG filters the \
log on stderr."
)]
pub struct ServeArgs {
    /// Settings file in TOML with the flags' long names as keys (default: ./locus.toml if it exists).
    #[arg(long, env = "LOCUS_CONFIG")]
    config: Option<PathBuf>,
    /// A Hugging Face model directory, a .gguf file, or `default` (SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long, default_value = "default", env = "LOCUS_MODEL")]
    model: String,
    #[command(flatten)]
    device: super::DeviceArg,
    #[command(flatten)]
    pub(super) malloc: super::malloc::MallocArgs,
    /// Address to serve gRPC on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50051", env = "LOCUS_GRPC_ADDR")]
    grpc_addr: String,
    /// Address for Prometheus `/metrics`, `/healthz`, `/readyz` and the status page `/` over HTTP
    /// (unset: not served).
    #[arg(long, env = "LOCUS_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Address for the OpenAI-style HTTP API, `POST /v1/completions` and `GET /v1/models` (unset:
    /// not served); HTTPS with --tls-cert, else plain HTTP; the query token and limits of gRPC queries.
    #[arg(long, env = "LOCUS_HTTP_ADDR")]
    http_addr: Option<String>,
    /// PEM certificate chain: serve gRPC and the OpenAI-style API (`--http-addr`) over TLS (rustls); needs --tls-key.
    #[arg(long, env = "LOCUS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "LOCUS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    learn: LearnArgs,
    /// Model versions kept in memory for Admin.Rollback (unchanged tensors are shared between them).
    #[arg(long, default_value_t = 4, env = "LOCUS_KEEP_VERSIONS")]
    keep_versions: usize,
    /// CPU priority of learning below queries, as a `nice` increment: 0 shares the cores equally,
    /// 19 learns almost only in CPU time that queries leave idle.
    #[arg(long, default_value_t = 10, env = "LOCUS_LEARNER_NICE",
          value_parser = clap::value_parser!(i32).range(0..=19))]
    learner_nice: i32,
    /// Bearer token required by Learn and Admin (unset: open).
    #[arg(long, env = "LOCUS_WRITE_TOKEN", hide_env_values = true)]
    write_token: Option<String>,
    /// Bearer token required by Query (unset: open); the write token is accepted too.
    #[arg(long, env = "LOCUS_QUERY_TOKEN", hide_env_values = true)]
    query_token: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Seconds shutdown waits for open streams before it drops them.
    #[arg(long, default_value_t = 30, env = "LOCUS_SHUTDOWN_GRACE")]
    shutdown_grace: u64,
    /// Data directory for the batch journal and checkpoints; restored on start (unset: in memory only).
    #[arg(long, env = "LOCUS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Applied updates between checkpoints (0: only on shutdown, rollback and Admin.Checkpoint).
    #[arg(long, default_value_t = 100, env = "LOCUS_CHECKPOINT_EVERY")]
    checkpoint_every: u64,
    /// Checkpoints kept in the data directory, newest first.
    #[arg(long, default_value_t = 3, env = "LOCUS_KEEP_CHECKPOINTS")]
    keep_checkpoints: usize,
    /// `writer` learns from ingested documents and publishes each version to --store; `reader`
    /// serves queries on the versions it finds there (Ingest and Admin changes are refused).
    #[arg(long, value_enum, default_value_t = RoleArg::Writer, env = "LOCUS_ROLE")]
    role: RoleArg,
    /// Store of published versions that the writer writes and readers follow: a shared directory
    /// (path or `file://` URL) or object storage by URL (`s3://bucket/prefix`, `gs://…`, `az://…`;
    /// credentials and endpoints from AWS_*, GOOGLE_*, AZURE_* variables). A writer needs
    /// --data-dir to publish.
    #[arg(long, env = "LOCUS_STORE")]
    store: Option<String>,
    /// Forgetting guard: a file of canary texts, one a line; an update that raises their
    /// perplexity by more than --canary-max-ratio is undone and reported (unset: off).
    #[arg(long, env = "LOCUS_CANARY")]
    canary: Option<PathBuf>,
    /// Largest canary perplexity ratio (after / before) one update may cause.
    #[arg(long, default_value_t = 1.05, env = "LOCUS_CANARY_MAX_RATIO")]
    canary_max_ratio: f64,
    /// Seconds between a reader's looks at --store for new versions.
    #[arg(long, default_value_t = 1.0, env = "LOCUS_FOLLOW_INTERVAL")]
    follow_interval: f64,
}

/// `--role`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Writer,
    Reader,
}

/// The forgetting guard of `--canary` and `--canary-max-ratio`.
fn guard(path: &Path, max_ratio: f64) -> anyhow::Result<locus::server::Guard> {
    let text = std::fs::read_to_string(path).map_err(|e| locus::Error::io(path, e))?;
    let canaries: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if canaries.is_empty() {
        anyhow::bail!("--canary {}: no canary texts (one a line)", path.display());
    }
    if !(max_ratio.is_finite() && max_ratio >= 1.0) {
        anyhow::bail!("--canary-max-ratio {max_ratio}: must be a number of at least 1");
    }
    Ok(locus::server::Guard {
        canaries,
        max_ratio,
    })
}

/// `--store`, checked before the server starts (reaching it waits for the model).
fn check_store(spec: String) -> anyhow::Result<String> {
    locus::store::location::check(&spec).map_err(|e| anyhow::anyhow!("--store {e}"))?;
    Ok(spec)
}

/// Learning settings shared by `serve` and `demo`.
#[derive(Args, Clone)]
pub struct LearnArgs {
    /// Strategy: full, tgl-fp, tgl-alr, topk[:K], random-k, frozen, mix-review, and `+` combinations.
    #[arg(long, default_value = "mix-review+tgl-fp", env = "LOCUS_STRATEGY")]
    pub strategy: String,
    /// `per-batch` (trace every batch, moving average of norms) or `static` (localize on the first batch, then keep it).
    #[arg(long, default_value = "per-batch", env = "LOCUS_LOCALIZATION")]
    pub localization: String,
    /// Weight of the past in the per-batch moving average.
    #[arg(long, default_value_t = 0.9, env = "LOCUS_EMA")]
    pub ema: f64,
    /// Batches between per-batch re-selections.
    #[arg(long, default_value_t = 4, env = "LOCUS_RESELECT_EVERY")]
    pub reselect_every: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4, env = "LOCUS_LR")]
    pub lr: f64,
    /// Documents per learning step; larger client batches are learned in consecutive steps.
    #[arg(long, default_value_t = 2, env = "LOCUS_BATCH_SIZE")]
    pub batch_size: usize,
    /// AdamW's first-moment decay: how long a step's gradient keeps moving the weights in later
    /// steps. The default 0.5 applies it mostly in its own step and the next, so a fact is known
    /// once its batch is learned; AdamW's usual 0.9 spreads it over about ten steps.
    #[arg(long, default_value_t = 0.5, env = "LOCUS_BETA1")]
    pub beta1: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0, env = "LOCUS_WARMUP")]
    pub warmup: usize,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0, env = "LOCUS_WEIGHT_DECAY")]
    pub weight_decay: f64,
    /// Gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0, env = "LOCUS_CLIP")]
    pub clip: f64,
    /// Seed of random-k and replay sampling.
    #[arg(long, default_value_t = 0, env = "LOCUS_SEED")]
    pub seed: u64,
    /// Replay corpus for mix-review, one paragraph a line; the bundled one if omitted.
    #[arg(long, env = "LOCUS_REPLAY")]
    pub replay: Option<PathBuf>,
    /// General-text paragraphs mixed into each step by mix-review.
    #[arg(long, default_value_t = 1, env = "LOCUS_REPLAY_PER_BATCH")]
    pub replay_per_batch: usize,
    /// Times each document is learned again at spaced later steps (1, 3, 7, ... steps after it
    /// arrived), its sentences reordered; 0 learns each document once.
    #[arg(long, default_value_t = 0, env = "LOCUS_REHEARSE")]
    pub rehearse: usize,
    /// Recent documents kept for rehearsal at most (they are saved in checkpoints).
    #[arg(long, default_value_t = 1024, env = "LOCUS_REHEARSAL_WINDOW")]
    pub rehearsal_window: usize,
    /// Weight of the salient-span loss added to the full loss in the update objective (0: the plain
    /// language-modelling loss).
    #[arg(long, default_value_t = 1.0, env = "LOCUS_SPAN_WEIGHT")]
    pub span_weight: f64,
    /// Under `--auto-spans trending`, the weight in the update's loss of a document's other names
    /// (those the step mentions less often, such as the outgoing office holder a report names
    /// once); 0 leaves them out, 1 learns them as any other token.
    #[arg(long, default_value_t = 0.0, env = "LOCUS_MINOR_NAME_WEIGHT")]
    pub minor_name_weight: f64,
    /// Under `--auto-spans trending`, documents learned before a step whose words are counted
    /// with the step's own, so a fact whose documents fall into two steps is counted as one burst
    /// (0: the step's documents only). They are saved in checkpoints.
    #[arg(long, default_value_t = 2, env = "LOCUS_TRENDING_WINDOW")]
    pub trending_window: usize,
    /// How spans are found in documents sent without any: `entity` (capitalised names, numbers and
    /// dates; the highest-loss tokens where there are none), `novel` (the names the model finds
    /// most surprising in context), `trending` (the name the step's documents mention most
    /// often, the first mentioned where several tie) or `surprisal` (the highest-loss tokens).
    #[arg(long, default_value = "trending", env = "LOCUS_AUTO_SPANS")]
    pub auto_spans: String,
    /// Measure each batch's loss again after its update (one more forward pass per step).
    #[arg(long, env = "LOCUS_MEASURE_AFTER")]
    pub measure_after: bool,
}

impl LearnArgs {
    /// The learning settings and the replay corpus.
    pub fn config(&self) -> anyhow::Result<(LearnConfig, Vec<String>)> {
        let localization = match self.localization.as_str() {
            "static" => Localization::Static,
            "per-batch" => Localization::PerBatch {
                ema: self.ema,
                reselect_every: self.reselect_every,
            },
            other => anyhow::bail!("--localization {other}: use static or per-batch"),
        };
        if self.batch_size == 0 {
            anyhow::bail!("--batch-size must be at least 1");
        }
        if !(self.span_weight.is_finite() && self.span_weight >= 0.0) {
            anyhow::bail!(
                "--span-weight {}: must be a finite number >= 0",
                self.span_weight
            );
        }
        if !(self.minor_name_weight.is_finite() && self.minor_name_weight >= 0.0) {
            anyhow::bail!(
                "--minor-name-weight {}: must be a finite number >= 0",
                self.minor_name_weight
            );
        }
        if !(0.0..1.0).contains(&self.beta1) {
            anyhow::bail!("--beta1 {}: must be >= 0 and < 1", self.beta1);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            anyhow::bail!("--lr {}: must be a finite number > 0", self.lr);
        }
        let replay = match &self.replay {
            Some(p) => std::fs::read_to_string(p).map_err(|e| locus::Error::io(p, e))?,
            None => REPLAY.to_string(),
        };
        let replay = replay
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect();
        let learn = LearnConfig {
            strategy: Strategy::parse(&self.strategy)?,
            localization,
            lr: self.lr,
            betas: (self.beta1, LearnConfig::default().betas.1),
            warmup: self.warmup,
            weight_decay: self.weight_decay,
            clip: self.clip,
            seed: self.seed,
            replay_per_batch: self.replay_per_batch,
            rehearse: self.rehearse,
            rehearsal_window: self.rehearsal_window,
            span_weight: self.span_weight,
            minor_name_weight: self.minor_name_weight,
            trending_window: self.trending_window,
            measure_after: self.measure_after,
            auto_spans: match self.auto_spans.as_str() {
                "entity" => SpanRule::Entity,
                "surprisal" => SpanRule::Surprisal,
                "novel" => SpanRule::Novel,
                "trending" => SpanRule::Trending,
                other => {
                    anyhow::bail!("--auto-spans {other}: use entity, novel, trending or surprisal")
                }
            },
            ..LearnConfig::default()
        };
        Ok((learn, replay))
    }
}

/// Request limits.
#[derive(Args)]
struct LimitArgs {
    /// Largest gRPC message in bytes, either direction.
    #[arg(long, default_value_t = 4 << 20, env = "LOCUS_MAX_MESSAGE_BYTES")]
    max_message_bytes: usize,
    /// Longest document or query text in tokens; longer documents are rejected.
    #[arg(long, default_value_t = 512, env = "LOCUS_MAX_DOCUMENT_TOKENS")]
    max_document_tokens: usize,
    /// Documents per ingest batch (and texts per trace or perplexity request, prompts per HTTP
    /// completion request).
    #[arg(long, default_value_t = 64, env = "LOCUS_MAX_DOCUMENTS")]
    max_documents: usize,
    /// Candidates per score request.
    #[arg(long, default_value_t = 64, env = "LOCUS_MAX_CANDIDATES")]
    max_candidates: usize,
    /// Stop strings per completion request.
    #[arg(long, default_value_t = 64, env = "LOCUS_MAX_STOP_STRINGS")]
    max_stop_strings: usize,
    /// Bytes of all stop strings of a completion request together.
    #[arg(long, default_value_t = 4096, env = "LOCUS_MAX_STOP_BYTES")]
    max_stop_bytes: usize,
    /// Salient strings per document or traced text.
    #[arg(long, default_value_t = 64, env = "LOCUS_MAX_SALIENT")]
    max_salient: usize,
    /// Spans per document or traced text.
    #[arg(long, default_value_t = 256, env = "LOCUS_MAX_SPANS")]
    max_spans: usize,
    /// Bytes of a document's source and of a batch's client_batch_id.
    #[arg(long, default_value_t = 256, env = "LOCUS_MAX_LABEL_BYTES")]
    max_label_bytes: usize,
    /// Tokens one completion may generate.
    #[arg(long, default_value_t = 256, env = "LOCUS_MAX_COMPLETE_TOKENS")]
    max_complete_tokens: usize,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, default_value_t = 64, env = "LOCUS_MAX_CONCURRENT_STREAMS")]
    max_concurrent_streams: u32,
    /// Queries computed at once.
    #[arg(long, default_value_t = 2, env = "LOCUS_QUERY_CONCURRENCY")]
    query_concurrency: usize,
    /// Seconds a query waits for a free slot before RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 30, env = "LOCUS_QUERY_WAIT")]
    query_wait: u64,
    /// Batches queued for the learner before ingest streams wait.
    #[arg(long, default_value_t = 4, env = "LOCUS_QUEUE_DEPTH")]
    queue_depth: usize,
    /// Seconds an answer of a stream (a completion chunk, an ingest answer) waits for the client
    /// to read it; then the stream ends with DEADLINE_EXCEEDED and frees its query slot. Also the
    /// time a gRPC call has to send its request message (Ingest excepted: --ingest-idle) and, over
    /// HTTP, a request's headers and then its body (else 408).
    #[arg(long, default_value_t = 30.0, env = "LOCUS_SEND_TIMEOUT")]
    send_timeout: f64,
    /// Seconds an ingest stream may go without sending a batch (the first included) before it is
    /// ended with DEADLINE_EXCEEDED.
    #[arg(long, default_value_t = 300.0, env = "LOCUS_INGEST_IDLE")]
    ingest_idle: f64,
    /// Seconds of quiet on a connection before the server pings the client (0: no pings).
    #[arg(long, default_value_t = 60.0, env = "LOCUS_KEEPALIVE_INTERVAL")]
    keepalive_interval: f64,
    /// Seconds a ping may go unanswered before the server closes the connection and its streams.
    #[arg(long, default_value_t = 20.0, env = "LOCUS_KEEPALIVE_TIMEOUT")]
    keepalive_timeout: f64,
}

impl LimitArgs {
    fn limits(&self) -> anyhow::Result<Limits> {
        let keepalive_interval = match self.keepalive_interval {
            0.0 => None,
            s => Some(seconds("--keepalive-interval", s)?),
        };
        Ok(Limits {
            max_message_bytes: self.max_message_bytes,
            max_document_tokens: self.max_document_tokens,
            max_documents: self.max_documents,
            max_candidates: self.max_candidates,
            max_stop_strings: self.max_stop_strings,
            max_stop_bytes: self.max_stop_bytes,
            max_salient: self.max_salient,
            max_spans: self.max_spans,
            max_label_bytes: self.max_label_bytes,
            max_complete_tokens: self.max_complete_tokens,
            max_concurrent_streams: self.max_concurrent_streams,
            query_concurrency: self.query_concurrency,
            query_wait: Duration::from_secs(self.query_wait),
            queue_depth: self.queue_depth,
            send_timeout: seconds("--send-timeout", self.send_timeout)?,
            ingest_idle: seconds("--ingest-idle", self.ingest_idle)?,
            keepalive_interval,
            keepalive_timeout: seconds("--keepalive-timeout", self.keepalive_timeout)?,
        })
    }
}

/// `secs` of the flag `flag` as a duration, when it is a positive number of seconds.
fn seconds(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("{flag} {secs}: must be a positive number of seconds"))
}

/// The settings file: `--config`, else `./locus.toml` when it exists.
fn config_file(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit.map(Path::to_path_buf).or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG);
        default.is_file().then_some(default)
    })
}

/// The settings file and, as `--flag=value` arguments, its settings that neither the command line
/// nor the environment gives (`None`: no file); `serve` is the `serve` command as parsed into
/// `matches`. Appended to the command line, these give the file its place in the precedence.
pub fn config_flags(
    serve: &Command,
    matches: &ArgMatches,
) -> anyhow::Result<Option<(PathBuf, Vec<String>)>> {
    let explicit = matches.get_one::<PathBuf>("config");
    let Some(path) = config_file(explicit.map(PathBuf::as_path)) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| locus::Error::io(&path, e))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{}", path.display()))?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let arg = serve
            .get_arguments()
            .filter(|a| a.get_id() != "config")
            .filter(|a| {
                a.get_action().takes_values() || matches!(a.get_action(), ArgAction::SetTrue)
            })
            .find(|a| a.get_long() == Some(key.as_str()))
            .with_context(|| {
                format!(
                    "{}: unknown key `{key}` (the keys are the long flags of `locus serve --help`)",
                    path.display()
                )
            })?;
        if matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let values = match value {
            toml::Value::Array(items) => items.iter().collect(),
            v => vec![v],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if !arg.get_action().takes_values() => {
                    if *b {
                        flags.push(format!("--{key}"));
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                other => anyhow::bail!(
                    "{}: `{key}` must be a string, number or boolean, not {}",
                    path.display(),
                    other.type_str()
                ),
            };
            flags.push(format!("--{key}={text}"));
        }
    }
    Ok(Some((path, flags)))
}

/// Runs `locus serve` until SIGTERM or Ctrl-C.
pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    if let Some(file) = config_file(a.config.as_deref()) {
        eprintln!("locus: settings from {}", file.display());
    }
    // Before the listener binds: a bad --device is a start-up error, not a failed model load.
    let device = a.device.open()?;
    let config = server_config(&a)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.grpc_addr)
            .await
            .with_context(|| format!("--grpc-addr {}", a.grpc_addr))?;
        eprintln!(
            "locus: serving gRPC{} on {} (health NOT_SERVING until the model is loaded)",
            if config.tls.is_some() {
                " over TLS"
            } else {
                ""
            },
            listener.local_addr()?
        );
        let state = State::new(config).await;
        start_http_listeners(&a, &state).await?;
        let load_failure = load_in_background(&state, a.model.clone(), device);
        let mut load_error = None;
        let shutdown = async {
            tokio::select! {
                _ = signal() => eprintln!("locus: shutting down"),
                Ok(e) = load_failure => load_error = Some(e),
            }
        };
        server::run(listener, state, shutdown).await?;
        match load_error {
            Some(e) => Err(e.context("loading the model")),
            None => {
                eprintln!("locus: stopped");
                Ok(())
            }
        }
    })
}

/// The server's settings from the command line (files read, values checked).
fn server_config(a: &ServeArgs) -> anyhow::Result<Config> {
    let (learn, replay) = a.learn.config()?;
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(Tls {
            cert_pem: std::fs::read(cert).map_err(|e| locus::Error::io(cert, e))?,
            key_pem: std::fs::read(key).map_err(|e| locus::Error::io(key, e))?,
        }),
        _ => None,
    };
    Ok(Config {
        learn,
        batch_size: a.learn.batch_size,
        replay,
        keep_versions: a.keep_versions,
        learner_nice: a.learner_nice,
        limits: a.limits.limits()?,
        auth: Auth {
            write: a.write_token.as_deref().map(Token::new),
            query: a.query_token.as_deref().map(Token::new),
        },
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
        tls,
        durability: a.data_dir.clone().map(|dir| locus::store::Durability {
            dir,
            checkpoint_every: a.checkpoint_every,
            keep_checkpoints: a.keep_checkpoints,
        }),
        role: match a.role {
            RoleArg::Writer => locus::server::Role::Writer,
            RoleArg::Reader => locus::server::Role::Reader,
        },
        store: a.store.clone().map(check_store).transpose()?,
        guard: a
            .canary
            .as_deref()
            .map(|path| guard(path, a.canary_max_ratio))
            .transpose()?,
        follow_interval: seconds("--follow-interval", a.follow_interval)?,
    })
}

/// Binds the metrics and OpenAI-style listeners that were asked for; both end with the runtime,
/// after gRPC has drained (so /readyz answers 503 meanwhile).
async fn start_http_listeners(a: &ServeArgs, state: &Arc<State>) -> anyhow::Result<()> {
    if let Some(addr) = &a.metrics_addr {
        let metrics = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-addr {addr}"))?;
        eprintln!(
            "locus: metrics on http://{0}/metrics (and /healthz, /readyz; status page http://{0}/)",
            metrics.local_addr()?
        );
        tokio::spawn(server::serve_metrics(metrics, Arc::clone(state)));
    }
    if let Some(addr) = &a.http_addr {
        let http = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--http-addr {addr}"))?;
        let scheme = if a.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        eprintln!(
            "locus: OpenAI-style API on {scheme}://{}/v1 (model `{}`)",
            http.local_addr()?,
            server::OPENAI_MODEL
        );
        tokio::spawn(server::serve_openai(http, Arc::clone(state))?);
    }
    Ok(())
}

/// Loads the model off the runtime and installs it; the receiver gets the error if that fails.
fn load_in_background(
    state: &Arc<State>,
    spec: String,
    device: Device,
) -> tokio::sync::oneshot::Receiver<anyhow::Error> {
    let (failed, load_failure) = tokio::sync::oneshot::channel();
    let loading = Arc::clone(state);
    tokio::spawn(async move {
        let loaded = async {
            let model =
                tokio::task::spawn_blocking(move || super::load_model(&spec, &device)).await??;
            loading.install(model).await?;
            eprintln!("locus: model loaded; serving");
            anyhow::Ok(())
        };
        if let Err(e) = loaded.await {
            let _ = failed.send(e);
        }
    });
    load_failure
}

/// Completes on Ctrl-C or, on Unix, SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => tracing::warn!("cannot watch SIGTERM ({e}); Ctrl-C only"),
        }
    }
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!("cannot watch Ctrl-C ({e}); serving until killed");
        std::future::pending::<()>().await;
    }
}
