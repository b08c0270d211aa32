//! `locus client`: talks to a running `locus serve` through the typed client.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use locus::client::Client;
use locus::proto::v1 as pb;
use serde::Deserialize;
use tokio_stream::StreamExt;

use super::progress::IngestProgress;
use super::Usage;

/// Arguments of `locus client`.
#[derive(Args)]
pub struct ClientArgs {
    /// Server address, `host:port`, `http://host:port` or (with --ca-cert) `https://host:port`.
    #[arg(long, default_value = "127.0.0.1:50051", env = "LOCUS_ADDR")]
    addr: String,
    /// Bearer token sent with every call.
    #[arg(long, env = "LOCUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Connect over TLS, trusting the server certificate if this PEM certificate authority signed it.
    #[arg(long, env = "LOCUS_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Print each answer as one JSON object on stdout (one per line for ingest and complete),
    /// with the API's field names; messages for people stay on stderr.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Stream a JSONL file of `{"text", "spans"?: [[start, end]], "salient"?: [...], "source"?}` lines to the server.
    Ingest {
        /// The JSONL file.
        file: PathBuf,
        /// Documents per batch sent.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// Rank candidate continuations of a prompt by log-probability.
    Score {
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Candidate continuations (include the leading space: " Paris").
        #[arg(required = true)]
        candidates: Vec<String>,
    },
    /// Continue a prompt, printing tokens as they arrive.
    Complete(CompleteArgs),
    /// Perplexity of each text.
    Perplexity {
        /// The texts.
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// The model, its version and the learning settings.
    Info,
    /// The model versions the server retains.
    Versions,
    /// Pause learning.
    Pause,
    /// Resume learning.
    Resume,
    /// Restore a retained version (in memory, a checkpoint, or 0 for the base model) as a new version.
    Rollback {
        /// The version to restore.
        version: u64,
    },
    /// Write a checkpoint of the served version to the server's data directory now.
    Checkpoint,
}

/// Arguments of `locus client complete`, the request's fields.
#[derive(Args)]
struct CompleteArgs {
    /// The prompt.
    prompt: String,
    /// Tokens to generate at most (0: the server's default).
    #[arg(long, default_value_t = 0)]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Sampler seed.
    #[arg(long)]
    seed: Option<u64>,
}

/// One line of an ingest file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    text: String,
    #[serde(default)]
    spans: Vec<(u64, u64)>,
    #[serde(default)]
    salient: Vec<String>,
    #[serde(default)]
    source: String,
}

/// Prints an answer as one line of JSON.
fn print_json<T: serde::Serialize>(answer: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(answer)?);
    Ok(())
}

/// Runs `locus client`.
pub fn run(a: ClientArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut client = connect(&a).await?;
        command(&mut client, a.command, a.json).await
    })
}

/// Connects to `--addr`, over TLS when `--ca-cert` is given.
async fn connect(a: &ClientArgs) -> anyhow::Result<Client> {
    Ok(match &a.ca_cert {
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| locus::Error::io(ca, e))?;
            Client::connect_tls(&a.addr, a.token.as_deref(), &pem).await?
        }
        None => Client::connect(&a.addr, a.token.as_deref()).await?,
    })
}

/// Sends one subcommand's call and prints its answer.
async fn command(client: &mut Client, command: ClientCommand, json: bool) -> anyhow::Result<()> {
    match command {
        ClientCommand::Ingest { file, batch_size } => ingest(client, &file, batch_size, json).await,
        ClientCommand::Score { prompt, candidates } => show(
            json,
            &client.score(&prompt, &candidates).await?,
            print_score,
        ),
        ClientCommand::Complete(c) => {
            let request = pb::CompleteRequest {
                prompt: c.prompt,
                max_tokens: c.max_tokens,
                temperature: c.temperature,
                top_p: c.top_p,
                stop: c.stop,
                seed: c.seed,
            };
            complete(client, request, json).await
        }
        ClientCommand::Perplexity { texts } => {
            let r = client.perplexity(texts.clone()).await?;
            show(json, &r, |r| print_perplexity(&texts, r))
        }
        ClientCommand::Info => show(json, &client.info().await?, print_info),
        ClientCommand::Versions => show(json, &client.list_versions().await?, print_versions),
        ClientCommand::Pause => show(json, &client.pause().await?, |r| {
            println!("learning paused at version {}", r.version)
        }),
        ClientCommand::Resume => show(json, &client.resume().await?, |r| {
            println!("learning resumed at version {}", r.version)
        }),
        ClientCommand::Rollback { version } => show(json, &client.rollback(version).await?, |r| {
            println!(
                "restored version {} as version {}",
                r.restored_from, r.version
            )
        }),
        ClientCommand::Checkpoint => show(json, &client.checkpoint().await?, print_checkpoint),
    }
}

/// Prints an answer as one line of JSON under `--json`, else as `human` writes it for people.
fn show<T: serde::Serialize>(json: bool, answer: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        return print_json(answer);
    }
    human(answer);
    Ok(())
}

fn print_score(r: &pb::ScoreResponse) {
    println!("model version {}", r.version);
    for c in &r.ranked {
        println!(
            "{:>10.4}  {:>3} tokens  {:?}",
            c.logprob, c.tokens, c.candidate
        );
    }
}

/// Streams a completion: the prompt and the tokens as they arrive on stdout, the finish on stderr
/// (each chunk as a JSON line under `json`).
async fn complete(
    client: &mut Client,
    request: pb::CompleteRequest,
    json: bool,
) -> anyhow::Result<()> {
    let prompt = request.prompt.clone();
    let mut stream = client.complete(request).await?;
    if json {
        while let Some(chunk) = stream.next().await {
            print_json(&chunk?)?;
        }
        return Ok(());
    }
    let mut out = std::io::stdout();
    write!(out, "{prompt}")?;
    let mut last = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        write!(out, "{}", chunk.text)?;
        out.flush()?;
        last = Some(chunk);
    }
    writeln!(out)?;
    if let Some(c) = last {
        eprintln!(
            "locus: {} tokens, finished by {}, model version {}",
            c.tokens,
            c.finish_reason().as_str_name(),
            c.version
        );
    }
    Ok(())
}

fn print_perplexity(texts: &[String], r: &pb::PerplexityResponse) {
    println!("model version {}", r.version);
    for (t, p) in texts.iter().zip(&r.texts) {
        println!("{:>10.3}  {:>4} tokens  {t:?}", p.perplexity, p.tokens);
    }
}

fn print_info(r: &pb::InfoResponse) {
    let selection: Vec<String> = r.selection.iter().map(group_name).collect();
    println!(
        "model        {} ({} layers, {} parameters) from {}",
        r.architecture, r.layers, r.parameters, r.source
    );
    println!("version      {}", r.version);
    println!(
        "strategy     {} ({}), lr {}, batch size {}",
        r.strategy, r.localization, r.lr, r.batch_size
    );
    println!(
        "learning     {}, {} steps, {} batches queued",
        if r.paused { "paused" } else { "on" },
        r.steps,
        r.queue_depth
    );
    println!("selection    {}", or_dash(&selection));
    println!(
        "role         {}; store at version {} ({} behind), {} publish failures",
        r.role, r.published_version, r.behind, r.publish_failures
    );
    if !r.learning_blocked.is_empty() {
        println!("learning     blocked: {}", r.learning_blocked);
    }
    if !r.store_error.is_empty() {
        println!(
            "store        not answering for {} s: {}",
            r.seconds_since_store, r.store_error
        );
    }
}

fn print_versions(r: &pb::ListVersionsResponse) {
    for v in &r.versions {
        let changed: Vec<String> = v.changed.iter().map(group_name).collect();
        let mark = if v.version == r.current { '*' } else { ' ' };
        println!(
            "{mark}{:>5}  {:<14} {}",
            v.version,
            v.origin,
            changed.join(" ")
        );
    }
    if !r.checkpoints.is_empty() {
        let on_disk: Vec<String> = r.checkpoints.iter().map(u64::to_string).collect();
        println!("checkpoints: {} (and 0, the base model)", on_disk.join(" "));
    }
}

fn print_checkpoint(r: &pb::CheckpointResponse) {
    println!("version      {}", r.version);
    println!("path         {}", r.path);
    println!("bytes        {}", r.bytes);
    println!(
        "parent       {}",
        r.parent.map_or("-".to_string(), |p| p.to_string())
    );
    println!("journal seq  {}", r.journal_seq);
    println!("groups       {}", or_dash(&r.groups));
}

/// `3.attn` for a layer group.
pub fn group_name(g: &pb::UpdatedGroup) -> String {
    let module = match g.module() {
        pb::Module::Attn => "attn",
        pb::Module::Mlp => "mlp",
        pb::Module::Unspecified => "?",
    };
    format!("{}.{module}", g.layer)
}

/// Streams a JSONL file in batches and prints one line per answered batch (the answer itself
/// under `json`).
async fn ingest(
    client: &mut Client,
    file: &PathBuf,
    batch_size: usize,
    json: bool,
) -> anyhow::Result<()> {
    let (docs, lines) = read_documents(file)?;
    let batch_size = batch_size.max(1);
    let batches: Vec<pb::IngestRequest> = docs
        .chunks(batch_size)
        .enumerate()
        .map(|(k, chunk)| pb::IngestRequest {
            documents: chunk.to_vec(),
            client_batch_id: k.to_string(),
        })
        .collect();
    let total = batches.len();
    let start = std::time::Instant::now();
    let mut progress = IngestProgress::new(docs.len() as u64);
    let mut answers = client.ingest(progress.counting(batches)).await?;
    let (mut done, mut accepted, mut rejected, mut version) = (0, 0, 0, None);
    while let Some(r) = answers.next().await {
        let r = r?;
        progress.answered(&r);
        done += 1;
        accepted += r.accepted.len();
        rejected += r.rejected.len();
        version = Some(r.version);
        if json {
            print_json(&r)?;
        } else {
            let position = format!("[{done}/{total}]");
            print_batch(&progress, &position, &r, |k, index| {
                lines.get(k * batch_size + index).copied().unwrap_or(0)
            });
        }
    }
    // The bar is cleared first, so the summary is the last line on a terminal too.
    drop(progress);
    eprintln!(
        "locus: ingested {} documents in {done}/{total} batches: {accepted} accepted, {rejected} rejected, model version {}, {:.1} s",
        docs.len(),
        version.map_or("-".to_string(), |v| v.to_string()),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The documents of a JSONL file, each with its 1-based line number.
fn read_documents(file: &PathBuf) -> Result<(Vec<pb::Document>, Vec<usize>), Usage> {
    let content =
        std::fs::read_to_string(file).map_err(|e| Usage(locus::Error::io(file, e).to_string()))?;
    let mut docs = Vec::new();
    let mut lines = Vec::new();
    for (i, raw) in content.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(raw)
            .map_err(|e| Usage(format!("{} line {}: {e}", file.display(), i + 1)))?;
        docs.push(pb::Document {
            text: l.text,
            spans: l
                .spans
                .into_iter()
                .map(|(start, end)| pb::Span { start, end })
                .collect(),
            salient: l.salient,
            source: if l.source.is_empty() {
                file.display().to_string()
            } else {
                l.source
            },
            timestamp: None,
        });
        lines.push(i + 1);
    }
    if docs.is_empty() {
        return Err(Usage(format!("{}: no documents", file.display())));
    }
    Ok((docs, lines))
}

/// One answered batch for people: its summary, the steps not applied and the rejected documents
/// by the file line `line_of` finds for (batch, index in the batch).
fn print_batch(
    progress: &IngestProgress,
    position: &str,
    r: &pb::IngestResponse,
    line_of: impl Fn(usize, usize) -> usize,
) {
    let k: usize = r.client_batch_id.parse().unwrap_or(0);
    let groups: Vec<String> = r
        .steps
        .iter()
        .flat_map(|s| s.groups.iter().map(group_name))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let seconds: f64 = r.steps.iter().map(|s| s.seconds).sum();
    progress.println(&format!(
        "{position} batch {k}: version {}, {} accepted, {} rejected, {}, {seconds:.1} s, groups {}",
        r.version,
        r.accepted.len(),
        r.rejected.len(),
        steps_summary(&r.steps),
        or_dash(&groups)
    ));
    for s in r.steps.iter().filter(|s| !s.skipped.is_empty()) {
        progress.println(&format!("  step {} not applied: {}", s.batch, s.skipped));
    }
    for j in &r.rejected {
        let line = line_of(k, j.index as usize);
        progress.println(&format!("  line {line}: {}: {}", j.field, j.reason));
    }
}

/// A batch's steps in a few words: losses, rehearsed documents and span fallbacks.
pub fn steps_summary(steps: &[pb::UpdateReport]) -> String {
    let (Some(first), Some(last)) = (steps.first(), steps.last()) else {
        return "no step".into();
    };
    let mut out = format!("loss {:.3}", first.loss_before);
    if let Some(after) = last.loss_after {
        out += &format!(" -> {after:.3}");
    }
    let rehearsed: u32 = steps.iter().map(|s| s.rehearsed).sum();
    let replay: u32 = steps.iter().map(|s| s.replay).sum();
    let fallbacks: u32 = steps.iter().map(|s| s.span_fallbacks).sum();
    if rehearsed > 0 {
        out += &format!(", {rehearsed} rehearsed");
    }
    if replay > 0 {
        out += &format!(", {replay} replayed");
    }
    if fallbacks > 0 {
        out += &format!(", {fallbacks} without a span target (automatic spans)");
    }
    let spans: Vec<String> = steps
        .iter()
        .flat_map(|s| &s.spans)
        .map(|d| d.texts.join(", "))
        .filter(|t| !t.is_empty())
        .collect();
    if !spans.is_empty() {
        out += &format!(", spans: {}", spans.join("; "));
    }
    out
}

/// The items joined by spaces, or `-` when there are none.
fn or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_string()
    } else {
        items.join(" ")
    }
}
