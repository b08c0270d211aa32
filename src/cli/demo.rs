//! `locus demo`: the server on a free local port, drifted facts streamed through the real gRPC API,
//! and the probe answers before and after.

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Args;
use locus::client::Client;
use locus::eval::data::{DriftSet, StableProbe, Update};
use locus::proto::v1 as pb;
use tokio_stream::StreamExt;

use super::client::group_name;
use super::probes::{self, ProbeScore};
use super::progress::IngestProgress;
use super::serve::LearnArgs;

/// The bundled drifted facts (documents, salient strings and probes).
const UPDATES: &str = include_str!("../../data/drift/updates.jsonl");
/// Facts that did not change, which learning must not disturb.
const STABLE: &str = include_str!("../../data/drift/stable.jsonl");
/// General prose, whose perplexity learning must not raise.
const GENERAL: &str = include_str!("../../data/drift/general.txt");
/// Stable facts and general paragraphs the demo checks (all of them would take minutes).
const CHECKS: usize = 20;

/// Arguments of `locus demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// A Hugging Face model directory, a .gguf file, or `default` (SmolLM2-135M-Instruct).
    #[arg(long, default_value = "default", env = "LOCUS_MODEL")]
    model: String,
    #[command(flatten)]
    device: super::DeviceArg,
    #[command(flatten)]
    pub(super) malloc: super::malloc::MallocArgs,
    /// How many `dev-` facts of data/drift/updates.jsonl to stream.
    #[arg(long, default_value_t = 4)]
    facts: usize,
    /// Passes over their documents (one is what the service promises: a fact streamed once sticks).
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[command(flatten)]
    learn: LearnArgs,
}

/// Runs `locus demo`.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let device = a.device.open()?;
    let set = DriftSet::parse(
        ("data/drift/updates.jsonl", UPDATES),
        ("data/drift/stable.jsonl", STABLE),
        GENERAL,
    )?;
    let facts: Vec<Update> = set
        .updates
        .into_iter()
        .filter(|u| u.id.starts_with("dev-"))
        .take(a.facts.max(1))
        .collect();
    let checks = Checks {
        stable: set.stable.into_iter().take(CHECKS).collect(),
        general: set.general.into_iter().take(CHECKS).collect(),
    };
    let model = super::load_model(&a.model, &device)?;
    super::inproc::with_server(model, &a.learn, |addr| async move {
        demo(&addr, &facts, &checks, a.epochs).await
    })
}

/// What learning must leave alone.
struct Checks {
    stable: Vec<StableProbe>,
    general: Vec<String>,
}

/// The model at one version, as the demo reads it.
struct Reading {
    version: u64,
    /// One score per probe of the streamed facts.
    probes: Vec<ProbeScore>,
    /// Stable answers kept (gold over foil).
    kept: usize,
    /// General-text perplexity.
    ppl: f64,
}

/// Reads the served version: its number, the facts' probes and the checks.
async fn read(client: &mut Client, facts: &[Update], checks: &Checks) -> anyhow::Result<Reading> {
    let version = client.info().await?.version;
    let all: Vec<&Update> = facts.iter().collect();
    let probes = probes::updates(client, &all).await?;
    let stable = probes::stable(client, &checks.stable).await?;
    Ok(Reading {
        version,
        probes,
        kept: stable.iter().filter(|(g, f)| g > f).count(),
        ppl: probes::perplexity(client, &checks.general).await?,
    })
}

async fn demo(addr: &str, facts: &[Update], checks: &Checks, epochs: usize) -> anyhow::Result<()> {
    let mut client = Client::connect(addr, None).await?;
    let info = client.info().await?;
    eprintln!(
        "locus: {} ({} layers), strategy {} ({}), lr {}",
        info.architecture, info.layers, info.strategy, info.localization, info.lr
    );
    let before = read(&mut client, facts, checks).await?;
    let updated = stream(&mut client, batches(facts, epochs)).await?;
    let after = read(&mut client, facts, checks).await?;
    print_probes(facts, &before, &after);
    print_summary(&before, &after, checks.stable.len(), &updated);
    Ok(())
}

/// The facts' documents as ingest batches, one per fact and pass.
fn batches(facts: &[Update], epochs: usize) -> Vec<pb::IngestRequest> {
    (0..epochs.max(1))
        .flat_map(|e| {
            facts.iter().map(move |u| pb::IngestRequest {
                documents: u
                    .docs
                    .iter()
                    .map(|d| pb::Document {
                        text: d.clone(),
                        salient: u.salient_in(d),
                        source: "data/drift/updates.jsonl".into(),
                        ..Default::default()
                    })
                    .collect(),
                client_batch_id: format!("epoch {} {}", e + 1, u.id),
            })
        })
        .collect()
}

/// Updated groups by name with how many updates touched them, keyed by (layer, module) so
/// layers sort by number.
type Updated = BTreeMap<(u32, i32), (String, usize)>;

/// Streams the batches with a line of progress per answer; returns the groups updated.
async fn stream(client: &mut Client, batches: Vec<pb::IngestRequest>) -> anyhow::Result<Updated> {
    let total = batches.len();
    let documents = batches.iter().map(|b| b.documents.len() as u64).sum();
    let mut progress = IngestProgress::new(documents);
    let start = Instant::now();
    let mut answers = client.ingest(progress.counting(batches)).await?;
    let mut updated = Updated::new();
    let mut done = 0;
    while let Some(r) = answers.next().await {
        let r = r?;
        progress.answered(&r);
        done += 1;
        for g in r.steps.iter().flat_map(|s| &s.groups) {
            updated
                .entry((g.layer, g.module))
                .or_insert_with(|| (group_name(g), 0))
                .1 += 1;
        }
        let loss = super::client::steps_summary(&r.steps);
        progress.println(&format!(
            "locus: [{done}/{total}] {}: version {}, {loss}, {:.0} s elapsed",
            r.client_batch_id,
            r.version,
            start.elapsed().as_secs_f64()
        ));
    }
    Ok(updated)
}

/// The probe table: each probe's new-over-old margin before and after.
fn print_probes(facts: &[Update], before: &Reading, after: &Reading) {
    println!(
        "\n{:<46} {:<22} {:<22} {:>16} {:>16}",
        "probe",
        "new answer",
        "old answer",
        format!("v{} new-old", before.version),
        format!("v{} new-old", after.version)
    );
    let probes = facts.iter().flat_map(|u| &u.probes);
    for (p, (b, f)) in probes.zip(before.probes.iter().zip(&after.probes)) {
        let (db, da) = (margin(b), margin(f));
        let mark = |d: f64| if d > 0.0 { "new" } else { "old" };
        println!(
            "{:<46} {:<22} {:<22} {:>+10.2} {:>5} {:>+10.2} {:>5}",
            clip(&p.prompt, 46),
            clip(&format!("{:?}", p.new), 22),
            clip(&format!("{:?}", p.old), 22),
            db,
            mark(db),
            da,
            mark(da)
        );
    }
}

/// How far a probe's new answer outscores its old one.
fn margin(s: &ProbeScore) -> f64 {
    s.0 - s.2
}

/// Uptake, stable answers kept, general perplexity and the groups learning touched.
fn print_summary(before: &Reading, after: &Reading, stable: usize, updated: &Updated) {
    let (v0, v1) = (before.version, after.version);
    let wins = |r: &Reading| r.probes.iter().filter(|s| margin(s) > 0.0).count();
    println!(
        "\nnew answer preferred: {}/{} at version {v0}, {}/{} at version {v1}",
        wins(before),
        before.probes.len(),
        wins(after),
        after.probes.len()
    );
    println!(
        "stable answers kept: {}/{stable} at version {v0}, {}/{stable} at version {v1}",
        before.kept, after.kept
    );
    println!(
        "general-text perplexity: {:.2} at version {v0}, {:.2} at version {v1} (ratio {:.3})",
        before.ppl,
        after.ppl,
        after.ppl / before.ppl
    );
    let layers: Vec<String> = updated.values().map(|(g, n)| format!("{g} x{n}")).collect();
    println!(
        "layer groups updated (times): {}",
        if layers.is_empty() {
            "none".to_string()
        } else {
            layers.join(", ")
        }
    );
}

/// `text` cut to `n` characters with an ellipsis.
fn clip(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(n - 1).collect();
        s.push('…');
        s
    }
}
