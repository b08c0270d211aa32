//! `locus serve`: the gRPC server that learns from streamed text while it answers queries.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use locus::learn::{LearnConfig, Localization, Strategy};
use locus::server::{self, Auth, Config, Limits, State, Token};

/// The replay corpus Mix-Review samples when no `--replay` is given.
const REPLAY: &str = include_str!("../../data/replay/general.txt");

/// Arguments of `locus serve`; every flag can also come from the environment variable it names.
#[derive(Args)]
pub struct ServeArgs {
    /// A Hugging Face model directory, a .gguf file, or `default` (SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long, default_value = "default", env = "LOCUS_MODEL")]
    model: String,
    /// Address to serve gRPC on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50051", env = "LOCUS_GRPC_ADDR")]
    grpc_addr: String,
    #[command(flatten)]
    learn: LearnArgs,
    /// Model versions kept in memory for Admin.Rollback (unchanged tensors are shared between them).
    #[arg(long, default_value_t = 4, env = "LOCUS_KEEP_VERSIONS")]
    keep_versions: usize,
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
}

/// Learning settings shared by `serve` and `demo`.
#[derive(Args, Clone)]
pub struct LearnArgs {
    /// Strategy: full, tgl-fp, tgl-alr, topk[:K], random-k, frozen, mix-review, and `+` combinations.
    #[arg(long, default_value = "tgl-fp", env = "LOCUS_STRATEGY")]
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
    #[arg(long, default_value_t = 1e-4, env = "LOCUS_LR")]
    pub lr: f64,
    /// Documents per learning step; larger client batches are learned in consecutive steps.
    #[arg(long, default_value_t = 8, env = "LOCUS_BATCH_SIZE")]
    pub batch_size: usize,
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
            warmup: self.warmup,
            weight_decay: self.weight_decay,
            clip: self.clip,
            seed: self.seed,
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
    /// Documents per ingest batch (and texts per trace or perplexity request).
    #[arg(long, default_value_t = 64, env = "LOCUS_MAX_DOCUMENTS")]
    max_documents: usize,
    /// Candidates per score request.
    #[arg(long, default_value_t = 64, env = "LOCUS_MAX_CANDIDATES")]
    max_candidates: usize,
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
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.max_message_bytes,
            max_document_tokens: self.max_document_tokens,
            max_documents: self.max_documents,
            max_candidates: self.max_candidates,
            max_complete_tokens: self.max_complete_tokens,
            max_concurrent_streams: self.max_concurrent_streams,
            query_concurrency: self.query_concurrency,
            query_wait: Duration::from_secs(self.query_wait),
            queue_depth: self.queue_depth,
        }
    }
}

/// Runs `locus serve` until SIGTERM or Ctrl-C.
pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let (learn, replay) = a.learn.config()?;
    let config = Config {
        learn,
        batch_size: a.learn.batch_size,
        replay,
        keep_versions: a.keep_versions,
        limits: a.limits.limits(),
        auth: Auth {
            write: a.write_token.as_deref().map(Token::new),
            query: a.query_token.as_deref().map(Token::new),
        },
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.grpc_addr)
            .await
            .with_context(|| format!("--grpc-addr {}", a.grpc_addr))?;
        eprintln!(
            "locus: serving gRPC on {} (health NOT_SERVING until the model is loaded)",
            listener.local_addr()?
        );
        let state = State::new(config).await;
        let (failed, load_failure) = tokio::sync::oneshot::channel();
        let loading = std::sync::Arc::clone(&state);
        let spec = a.model.clone();
        tokio::spawn(async move {
            let loaded = async {
                let model = tokio::task::spawn_blocking(move || super::load_model(&spec)).await??;
                loading.install(model).await?;
                eprintln!("locus: model loaded; serving");
                anyhow::Ok(())
            };
            if let Err(e) = loaded.await {
                let _ = failed.send(e);
            }
        });
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
