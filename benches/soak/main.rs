//! Soak of the real `locus serve` binary: for `LOCUS_SOAK_MINUTES` (default 10) one writer
//! ingests the drift documents while Score, Complete and Perplexity clients query in loops, a
//! stream of each kind is cancelled every minute and a client reconnects every 20 s. Every 10 s
//! the server's RSS, open descriptors and version are sampled. At the end the server is stopped
//! with SIGTERM and started again on its data directory, which must give back the same version
//! and the same scores. `cargo bench --bench soak` prints one JSON object on stdout (and writes it
//! to `LOCUS_SOAK_OUT` when set), and a markdown summary on stderr. See docs/soak.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use locus::client::Client;
use serde_json::{json, Value};

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

mod clients;
mod record;
mod report;
mod server;

use clients::Soak;
use record::Recorder;
use server::{Server, Setup};

/// Two scores of the probe agree when they differ by less than this (restoring replays the
/// journal on the same kernels, so they should agree to the last bits).
const SAME_LOGPROB: f64 = 1e-4;

/// What the environment asks for.
pub struct Settings {
    pub minutes: f64,
    pub warmup_minutes: f64,
    /// Pause of each query client between calls, so that the learner gets CPU time too.
    pub query_gap: Duration,
    pub model: String,
    pub bin: PathBuf,
    pub out: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        Ok(Settings {
            minutes: minutes("LOCUS_SOAK_MINUTES", 10.0)?,
            warmup_minutes: minutes("LOCUS_SOAK_WARMUP_MINUTES", 3.0)?,
            query_gap: Duration::from_millis(match std::env::var("LOCUS_SOAK_QUERY_GAP_MS") {
                Ok(ms) => ms.parse().map_err(|_| {
                    anyhow::anyhow!("LOCUS_SOAK_QUERY_GAP_MS={ms}: must be whole milliseconds")
                })?,
                Err(_) => 500,
            }),
            // The server runs in a temporary directory: a relative model path is made absolute.
            model: match std::env::var("LOCUS_SOAK_MODEL") {
                Ok(m) => std::fs::canonicalize(&m).map_or(m, |p| p.display().to_string()),
                Err(_) => "default".into(),
            },
            bin: std::env::var_os("LOCUS_BIN")
                .map_or_else(|| env!("CARGO_BIN_EXE_locus").into(), PathBuf::from),
            out: std::env::var_os("LOCUS_SOAK_OUT").map(PathBuf::from),
        })
    }
}

/// A positive number of minutes from `var`, or `default` when unset.
fn minutes(var: &str, default: f64) -> anyhow::Result<f64> {
    let Ok(text) = std::env::var(var) else {
        return Ok(default);
    };
    match text.parse::<f64>() {
        Ok(m) if m.is_finite() && m > 0.0 => Ok(m),
        _ => anyhow::bail!("{var}={text}: must be a positive number of minutes"),
    }
}

fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(soak(&settings))?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(out) = &settings.out {
        std::fs::write(out, format!("{text}\n"))?;
    }
    eprintln!("{}", report::markdown(&report));
    let goals = &report["goals"];
    anyhow::ensure!(
        goals["no_unexpected_status"] == true && goals["restart_same_model"] == true,
        "the soak found unexpected statuses or a changed model after the restart"
    );
    Ok(())
}

/// Runs the soak and the restart check, and returns the report.
async fn soak(settings: &Settings) -> anyhow::Result<Value> {
    let tmp = tempfile::tempdir()?;
    let setup = Setup {
        bin: settings.bin.clone(),
        model: settings.model.clone(),
        data: tmp.path().join("data"),
    };
    let mut server = Server::start(&setup, tmp.path());
    let mut client = server.ready().await?;
    let info = client.info().await?;
    eprintln!(
        "soak: {} ready on {}; {} minutes",
        info.architecture, server.addr, settings.minutes
    );
    let rec = Arc::new(Recorder::new());
    let soak = Soak {
        client: client.clone(),
        addr: server.addr.clone(),
        rec: Arc::clone(&rec),
        query_gap: settings.query_gap,
        deadline: Instant::now() + Duration::from_secs_f64(settings.minutes * 60.0),
    };
    let loops = [
        tokio::spawn(clients::writer(soak.clone())),
        tokio::spawn(clients::scores(soak.clone())),
        tokio::spawn(clients::completions(soak.clone())),
        tokio::spawn(clients::perplexities(soak.clone())),
        tokio::spawn(clients::cancellations(soak.clone())),
        tokio::spawn(clients::reconnects(soak.clone())),
    ];
    let samples = clients::samples(soak, server.pid()).await;
    for task in loops {
        task.await?;
    }
    let restart = restart(server, client, &setup, tmp.path()).await?;
    Ok(report::build(settings, &info, &rec, &samples, restart))
}

/// Stops the server with SIGTERM once it has learned everything, starts it again on the same
/// data directory and compares version and probe scores.
async fn restart(
    server: Server,
    mut client: Client,
    setup: &Setup,
    cwd: &std::path::Path,
) -> anyhow::Result<Value> {
    eprintln!("soak: over; learning what is still queued");
    let (version, before) = settled(&mut client).await?;
    drop(client);
    eprintln!("soak: stopping the server at version {version} (SIGTERM), then restarting it");
    let began = Instant::now();
    let exit = server.terminate()?;
    let stop_seconds = began.elapsed().as_secs_f64();
    let began = Instant::now();
    let mut again = Server::start(setup, cwd);
    let mut client = again.ready().await?;
    let restart_seconds = began.elapsed().as_secs_f64();
    let version_after = client.info().await?.version;
    let after = probe(&mut client).await?;
    let max_abs_diff = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    Ok(json!({
        "exit": exit.to_string(),
        "stop_seconds": stop_seconds,
        "restart_seconds": restart_seconds,
        "version_before": version,
        "version_after": version_after,
        "logprobs_before": before,
        "logprobs_after": after,
        "max_abs_diff": max_abs_diff,
        "same_model": exit.success() && version == version_after && max_abs_diff < SAME_LOGPROB,
    }))
}

/// The served version and the probe's scores once everything ingested is learned: a last batch
/// goes in after all clients stopped, and batches are learned in order, so its answer comes once
/// the learner is idle (batches of cancelled streams that were already read included).
async fn settled(client: &mut Client) -> anyhow::Result<(u64, Vec<f64>)> {
    let last = support::batches("soak-last", 1).swap_remove(0);
    let mut answers = client.ingest(tokio_stream::iter([last])).await?;
    let answer = answers
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the last batch got no answer"))?;
    let scores = probe(client).await?;
    let version = client.info().await?.version;
    anyhow::ensure!(
        version == answer.version,
        "the version moved from {} to {version} after the last batch",
        answer.version
    );
    Ok((version, scores))
}

/// Log-probabilities of the first drift probe's candidates, in candidate order.
async fn probe(client: &mut Client) -> anyhow::Result<Vec<f64>> {
    let (prompt, candidates) = support::probes().swap_remove(0);
    let mut ranked = client.score(&prompt, &candidates).await?.ranked;
    ranked.sort_by_key(|c| c.index);
    Ok(ranked.into_iter().map(|c| c.logprob).collect())
}
