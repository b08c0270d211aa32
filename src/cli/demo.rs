//! `locus demo`: the server on a free local port, drifted facts streamed through the real gRPC API,
//! and the probe answers before and after.

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Args;
use locus::client::Client;
use locus::eval::data::Update;
use locus::proto::v1 as pb;
use tokio_stream::StreamExt;

use super::client::group_name;
use super::progress::IngestProgress;
use super::serve::LearnArgs;

/// The bundled drifted facts (documents, salient strings and probes).
const UPDATES: &str = include_str!("../../data/drift/updates.jsonl");

/// Arguments of `locus demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// A Hugging Face model directory, a .gguf file, or `default` (SmolLM2-135M-Instruct).
    #[arg(long, default_value = "default", env = "LOCUS_MODEL")]
    model: String,
    #[command(flatten)]
    device: super::DeviceArg,
    /// How many `dev-` facts of data/drift/updates.jsonl to stream.
    #[arg(long, default_value_t = 4)]
    facts: usize,
    /// Passes over their documents.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[command(flatten)]
    learn: LearnArgs,
}

/// A probe's scores: (new answer, old answer) log-probabilities.
type Pair = (f64, f64);

/// Runs `locus demo`.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let device = a.device.open()?;
    let facts: Vec<Update> = UPDATES
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<Vec<Update>, _>>()?
        .into_iter()
        .filter(|u| u.id.starts_with("dev-"))
        .take(a.facts.max(1))
        .collect();
    let model = super::load_model(&a.model, &device)?;
    super::inproc::with_server(model, &a.learn, |addr| async move {
        demo(&addr, &facts, a.epochs).await
    })
}

async fn demo(addr: &str, facts: &[Update], epochs: usize) -> anyhow::Result<()> {
    let mut client = Client::connect(addr, None).await?;
    let info = client.info().await?;
    eprintln!(
        "locus: {} ({} layers), strategy {} ({}), lr {}",
        info.architecture, info.layers, info.strategy, info.localization, info.lr
    );
    let (v0, before) = probe(&mut client, facts).await?;

    let batches: Vec<pb::IngestRequest> = (0..epochs.max(1))
        .flat_map(|e| {
            facts.iter().map(move |u| pb::IngestRequest {
                documents: u
                    .docs
                    .iter()
                    .map(|d| pb::Document {
                        text: d.clone(),
                        salient: u.salient.clone(),
                        source: "data/drift/updates.jsonl".into(),
                        ..Default::default()
                    })
                    .collect(),
                client_batch_id: format!("epoch {} {}", e + 1, u.id),
            })
        })
        .collect();
    let total = batches.len();
    let documents = batches.iter().map(|b| b.documents.len() as u64).sum();
    let mut progress = IngestProgress::new(documents);
    let start = Instant::now();
    let mut answers = client.ingest(progress.counting(batches)).await?;
    // Keyed by (layer, module) so layers sort by number.
    let mut updated: BTreeMap<(u32, i32), (String, usize)> = BTreeMap::new();
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
    drop(progress);
    let (v1, after) = probe(&mut client, facts).await?;

    println!(
        "\n{:<46} {:<22} {:<22} {:>16} {:>16}",
        "probe",
        "new answer",
        "old answer",
        format!("v{v0} new-old"),
        format!("v{v1} new-old")
    );
    let probes = facts.iter().flat_map(|u| &u.probes);
    let mut wins = (0, 0);
    for (p, (b, f)) in probes.zip(before.iter().zip(&after)) {
        let (db, da) = (b.0 - b.1, f.0 - f.1);
        wins.0 += usize::from(db > 0.0);
        wins.1 += usize::from(da > 0.0);
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
    println!(
        "\nnew answer preferred: {}/{} at version {v0}, {}/{} at version {v1}",
        wins.0,
        before.len(),
        wins.1,
        after.len()
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
    Ok(())
}

/// Scores every probe's new and old answer; all on one version (nothing learns meanwhile).
async fn probe(client: &mut Client, facts: &[Update]) -> anyhow::Result<(u64, Vec<Pair>)> {
    let mut out = Vec::new();
    let mut version = 0;
    for p in facts.iter().flat_map(|u| &u.probes) {
        let r = client
            .score(&p.prompt, &[p.new.clone(), p.old.clone()])
            .await?;
        version = r.version;
        let lp = |i: u32| {
            r.ranked
                .iter()
                .find(|c| c.index == i)
                .map_or(f64::NAN, |c| c.logprob)
        };
        out.push((lp(0), lp(1)));
    }
    Ok((version, out))
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
