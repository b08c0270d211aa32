//! `locus eval-stream`: a drift set streamed once through a real server, as a client streams it,
//! with the server's defaults unless flags say otherwise. Probes are scored through the query API
//! before the stream, along it (each fact again some documents after its last one: does an early
//! fact survive the later ones?) and at its end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use locus::client::Client;
use locus::eval::data::{DriftSet, Update};
use locus::eval::metrics::{compare, Metrics, Scores};
use locus::proto::v1 as pb;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::probes::{self, preference, ProbeScore};
use super::serve::LearnArgs;

/// Arguments of `locus eval-stream`.
#[derive(Args)]
pub struct StreamArgs {
    #[command(flatten)]
    drift: super::eval::DriftArgs,
    #[command(flatten)]
    pub(super) malloc: super::malloc::MallocArgs,
    /// Send each fact's salient strings with its documents (by default documents go raw, as most
    /// clients send them, and the server finds the spans).
    #[arg(long)]
    salient: bool,
    /// `data`: each fact's documents together, facts in file order; `shuffled`: the same with the
    /// facts in an order drawn from `--seed` (what seeds vary when nothing else is random);
    /// `interleaved`: the first document of every fact, then every second one, and so on.
    #[arg(long, default_value = "data")]
    order: String,
    /// Documents after a fact's last one at which its probes are scored again.
    #[arg(long, default_value = "0,10,40", value_delimiter = ',')]
    lags: Vec<usize>,
    /// Only the first N facts of each split (`dev-`, `test-`); all when omitted.
    #[arg(long)]
    facts: Option<usize>,
    /// Which facts to stream: `dev` (for choosing settings), `test` (held out, for reporting once
    /// the choices are fixed) or `all`.
    #[arg(long, default_value = "all")]
    split: String,
    /// Print the result as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Write the uptake along the stream as an SVG chart.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    learn: LearnArgs,
}

/// Uptake of the facts measured some documents after their last one.
#[derive(Debug, Clone, Serialize)]
pub struct LagPoint {
    /// Documents streamed after the fact's last one (at least; batches end where they end).
    pub lag: usize,
    /// Mean actual lag of the facts measured.
    pub mean_actual_lag: f64,
    /// Share of development probes answered with the new answer.
    pub dev: Option<f64>,
    /// The same for held-out probes.
    pub heldout: Option<f64>,
    /// Facts measured at this lag (facts too near the stream's end are not).
    pub facts: usize,
}

/// The whole streaming evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    /// The learning settings and the stream's shape.
    pub settings: BTreeMap<String, String>,
    /// Documents streamed.
    pub documents: usize,
    /// Development and held-out facts.
    pub facts: (usize, usize),
    /// Before the stream.
    pub before: Metrics,
    /// After it.
    pub after: Metrics,
    /// Uptake along the stream.
    pub lags: Vec<LagPoint>,
    /// Learning steps taken, and applied.
    pub steps: (usize, usize),
    /// Documents rehearsed.
    pub rehearsed: usize,
    /// Replay paragraphs mixed in.
    pub replayed: usize,
    /// Documents whose given spans marked no target token.
    pub span_fallbacks: usize,
    /// Seconds the learner spent in steps.
    pub learn_seconds: f64,
    /// Documents per second of learning.
    pub documents_per_s: f64,
    /// Seconds from the first batch sent to the last answer, probing along the stream included.
    pub wall_seconds: f64,
    /// The model version at the end.
    pub version: u64,
    /// Every update probe's margin before and after, so a reader can see which facts stuck.
    pub probes: Vec<ProbeOutcome>,
    /// Each streamed document's fact and the text its span loss leaned on, in stream order.
    pub spans: Vec<DocumentSpans>,
}

/// What the update leaned on in one streamed document.
#[derive(Debug, Clone, Serialize)]
pub struct DocumentSpans {
    /// The document's fact.
    pub fact: String,
    /// The text of its span targets (the server's [`pb::DocumentSpans`]).
    pub texts: Vec<String>,
}

/// One update probe's new-minus-old log-probability margin before and after the stream.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeOutcome {
    /// The fact's id.
    pub fact: String,
    /// The probe's prompt.
    pub prompt: String,
    /// The new answer.
    pub new: String,
    /// The outdated answer.
    pub old: String,
    /// Margin before the stream (positive: the new answer wins).
    pub before: f64,
    /// Margin after it.
    pub after: f64,
}

/// Runs `locus eval-stream`.
pub fn run(a: StreamArgs) -> anyhow::Result<()> {
    let (device, set) = a.drift.open()?;
    let mut facts = pick(&set, a.facts, &a.split)?;
    if a.order == "shuffled" {
        facts.shuffle(&mut rand::rngs::StdRng::seed_from_u64(a.learn.seed));
    }
    let stream = order(&facts, &a.order, a.salient)?;
    let mut lags = a.lags.clone();
    lags.sort_unstable();
    lags.dedup();
    let model = a.drift.model(&device)?;
    let l = &a.learn;
    let settings: BTreeMap<String, String> = [
        ("strategy", l.strategy.clone()),
        ("localization", l.localization.clone()),
        ("lr", l.lr.to_string()),
        ("beta1", l.beta1.to_string()),
        ("batch_size", l.batch_size.to_string()),
        ("rehearse", l.rehearse.to_string()),
        ("span_weight", l.span_weight.to_string()),
        ("auto_spans", l.auto_spans.clone()),
        ("minor_name_weight", l.minor_name_weight.to_string()),
        ("trending_window", l.trending_window.to_string()),
        ("replay_per_batch", l.replay_per_batch.to_string()),
        ("seed", l.seed.to_string()),
        ("order", a.order.clone()),
        ("salient", a.salient.to_string()),
        ("split", a.split.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let batch = l.batch_size;
    let mut report = super::inproc::with_server(model, l, |addr| async move {
        evaluate(&addr, &set, &facts, &stream, batch, &lags).await
    })?;
    report.settings = settings;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", markdown(&report));
    }
    if let Some(p) = &a.plot {
        let line = |f: fn(&LagPoint) -> Option<f64>| -> Vec<(f64, f64)> {
            report
                .lags
                .iter()
                .filter_map(|l| Some((l.lag as f64, f(l)?)))
                .collect()
        };
        let flat = |v: f64| report.lags.iter().map(|l| (l.lag as f64, v)).collect();
        locus::plot::write_lines(
            p,
            &[
                ("dev facts".into(), line(|l| l.dev)),
                ("held-out facts".into(), line(|l| l.heldout)),
                (
                    "dev, before".into(),
                    flat(report.before.new_pref_accuracy_dev),
                ),
                (
                    "held-out, before".into(),
                    flat(report.before.new_pref_accuracy_heldout),
                ),
            ],
            "documents streamed after the fact's last document",
            "new answer preferred (share of probes)",
            "uptake along the stream",
        )?;
        eprintln!("locus: wrote {}", p.display());
    }
    Ok(())
}

/// The first `n` facts of each split chosen by `split`, in file order.
fn pick(set: &DriftSet, n: Option<usize>, split: &str) -> anyhow::Result<Vec<Update>> {
    let (dev, test) = match split {
        "all" => (true, true),
        "dev" => (true, false),
        "test" => (false, true),
        other => anyhow::bail!("--split {other}: use dev, test or all"),
    };
    let (mut d, mut t) = (0, 0);
    let limit = n.unwrap_or(usize::MAX);
    Ok(set
        .updates
        .iter()
        .filter(|u| {
            let count = if u.id.starts_with("test-") {
                test.then_some(&mut t)
            } else {
                dev.then_some(&mut d)
            };
            count.is_some_and(|c| {
                *c += 1;
                *c <= limit
            })
        })
        .cloned()
        .collect())
}

/// The documents in streaming order, each with the index of its fact.
fn order(
    facts: &[Update],
    order: &str,
    salient: bool,
) -> anyhow::Result<Vec<(usize, pb::Document)>> {
    let doc = |k: usize, text: &String| {
        (
            k,
            pb::Document {
                text: text.clone(),
                salient: if salient {
                    facts[k].salient_in(text)
                } else {
                    Vec::new()
                },
                source: facts[k].id.clone(),
                ..Default::default()
            },
        )
    };
    Ok(match order {
        "data" | "shuffled" => facts
            .iter()
            .enumerate()
            .flat_map(|(k, u)| u.docs.iter().map(move |d| doc(k, d)))
            .collect(),
        "interleaved" => {
            let most = facts.iter().map(|u| u.docs.len()).max().unwrap_or(0);
            (0..most)
                .flat_map(|i| {
                    facts
                        .iter()
                        .enumerate()
                        .filter_map(move |(k, u)| u.docs.get(i).map(|d| doc(k, d)))
                })
                .collect()
        }
        other => anyhow::bail!("--order {other}: use data, shuffled or interleaved"),
    })
}

/// Every probe, stable probe and the general text's perplexity, through the query API.
async fn scores(client: &mut Client, set: &DriftSet, facts: &[Update]) -> anyhow::Result<Scores> {
    Ok(Scores {
        updates: probes::updates(client, &facts.iter().collect::<Vec<_>>()).await?,
        stable: probes::stable(client, &set.stable).await?,
        general_ppl: probes::perplexity(client, &set.general).await?,
        entity_span_ppl: f64::NAN,
    })
}

/// Streams the documents through the server at `addr` and scores the probes before, along and
/// after the stream.
async fn evaluate(
    addr: &str,
    set: &DriftSet,
    facts: &[Update],
    stream: &[(usize, pb::Document)],
    batch: usize,
    lags: &[usize],
) -> anyhow::Result<StreamReport> {
    let mut client = Client::connect(addr, None).await?;
    let start_scores = scores(&mut client, set, facts).await?;
    eprintln!(
        "locus: before: new answer preferred on {:.3} of probes; streaming {} documents",
        preference(&start_scores.updates),
        stream.len()
    );
    let streamed = stream_documents(&mut client, facts, stream, batch, lags).await?;
    let end_scores = scores(&mut client, set, facts).await?;
    let version = client.info().await?.version;
    let test = facts.iter().filter(|u| u.id.starts_with("test-")).count();
    let t = &streamed.tally;
    Ok(StreamReport {
        settings: BTreeMap::new(),
        documents: stream.len(),
        facts: (facts.len() - test, test),
        before: compare(&start_scores, &start_scores),
        after: compare(&start_scores, &end_scores),
        lags: lag_points(lags, &streamed.measured),
        steps: (t.steps, t.applied),
        rehearsed: t.rehearsed,
        replayed: t.replayed,
        span_fallbacks: t.fallbacks,
        learn_seconds: t.learn_seconds,
        documents_per_s: stream.len() as f64 / t.learn_seconds.max(1e-9),
        wall_seconds: streamed.wall_seconds,
        version,
        probes: outcomes(facts, &start_scores.updates, &end_scores.updates),
        spans: stream
            .iter()
            .zip(&t.spans)
            .map(|((k, _), texts)| DocumentSpans {
                fact: facts[*k].id.clone(),
                texts: texts.clone(),
            })
            .collect(),
    })
}

/// Each probe of `facts` with its margins in `before` and `after` (scored in the same order).
fn outcomes(facts: &[Update], before: &[ProbeScore], after: &[ProbeScore]) -> Vec<ProbeOutcome> {
    facts
        .iter()
        .flat_map(|u| u.probes.iter().map(move |p| (u, p)))
        .zip(before.iter().zip(after))
        .map(|((u, p), (b, a))| ProbeOutcome {
            fact: u.id.clone(),
            prompt: p.prompt.clone(),
            new: p.new.clone(),
            old: p.old.clone(),
            before: b.0 - b.2,
            after: a.0 - a.2,
        })
        .collect()
}

/// What the learner's step reports add up to.
#[derive(Default)]
struct Tally {
    steps: usize,
    applied: usize,
    rehearsed: usize,
    replayed: usize,
    fallbacks: usize,
    learn_seconds: f64,
    /// Each learned document's span texts, in order.
    spans: Vec<Vec<String>>,
}

impl Tally {
    fn add(&mut self, steps: &[pb::UpdateReport]) {
        for s in steps {
            self.steps += 1;
            self.applied += usize::from(s.applied);
            self.rehearsed += s.rehearsed as usize;
            self.replayed += s.replay as usize;
            self.fallbacks += s.span_fallbacks as usize;
            self.learn_seconds += s.seconds;
            self.spans.extend(s.spans.iter().map(|d| d.texts.clone()));
        }
    }
}

/// Probe scores keyed by (fact, index of the lag), each with the lag actually reached.
type Measured = BTreeMap<(usize, usize), (usize, Vec<ProbeScore>)>;

/// What streaming the documents gave.
struct Streamed {
    tally: Tally,
    measured: Measured,
    /// Seconds from the first batch sent to the last answer, probing along the stream included.
    wall_seconds: f64,
}

/// Sends the documents a batch at a time, each after the last one's answer, and scores each
/// fact's probes once the stream is `lag` documents past its last one.
async fn stream_documents(
    client: &mut Client,
    facts: &[Update],
    stream: &[(usize, pb::Document)],
    batch: usize,
    lags: &[usize],
) -> anyhow::Result<Streamed> {
    // Where each fact's last document sits in the stream (1-based count of documents).
    let mut last = vec![0usize; facts.len()];
    for (i, (k, _)) in stream.iter().enumerate() {
        last[*k] = i + 1;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = client.ingest(ReceiverStream::new(rx)).await?;
    let mut measured = Measured::new();
    let mut tally = Tally::default();
    let mut done = 0;
    let wall = Instant::now();
    for (n, chunk) in stream.chunks(batch.max(1)).enumerate() {
        let request = pb::IngestRequest {
            documents: chunk.iter().map(|(_, d)| d.clone()).collect(),
            client_batch_id: n.to_string(),
        };
        tx.send(request).await?;
        let Some(r) = answers.next().await else {
            anyhow::bail!("the server closed the ingest stream");
        };
        let r = r?;
        if let Some(j) = r.rejected.first() {
            anyhow::bail!(
                "batch {n}: document {} rejected: {}: {}",
                j.index,
                j.field,
                j.reason
            );
        }
        done += chunk.len();
        tally.add(&r.steps);
        for (k, &end) in last.iter().enumerate() {
            for (li, &lag) in lags.iter().enumerate() {
                if done >= end + lag && !measured.contains_key(&(k, li)) {
                    let s = probes::updates(client, &[&facts[k]]).await?;
                    measured.insert((k, li), (done - end, s));
                }
            }
        }
        eprintln!(
            "locus: [{done}/{}] version {}, {:.1} s learning, {}",
            stream.len(),
            r.version,
            tally.learn_seconds,
            super::client::steps_summary(&r.steps)
        );
    }
    drop(tx);
    Ok(Streamed {
        tally,
        measured,
        wall_seconds: wall.elapsed().as_secs_f64(),
    })
}

/// Uptake at each lag, over the facts measured there.
fn lag_points(lags: &[usize], measured: &Measured) -> Vec<LagPoint> {
    lags.iter()
        .enumerate()
        .map(|(li, &lag)| {
            let at: Vec<&(usize, Vec<ProbeScore>)> = measured
                .iter()
                .filter(|((_, l), _)| *l == li)
                .map(|(_, v)| v)
                .collect();
            let split = |held: bool| {
                let s: Vec<ProbeScore> = at
                    .iter()
                    .flat_map(|(_, s)| s.iter().filter(|p| p.3 == held).copied())
                    .collect();
                (!s.is_empty()).then(|| preference(&s))
            };
            LagPoint {
                lag,
                mean_actual_lag: at.iter().map(|(a, _)| *a as f64).sum::<f64>()
                    / at.len().max(1) as f64,
                dev: split(false),
                heldout: split(true),
                facts: at.len(),
            }
        })
        .collect()
}

fn ci(c: (f64, f64)) -> String {
    format!("[{:.2}, {:.2}]", c.0, c.1)
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

/// The result as markdown tables.
fn markdown(r: &StreamReport) -> String {
    let settings: Vec<String> = r.settings.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let mut s = format!(
        "{} documents of {} dev and {} held-out facts streamed once ({}).\n\n\
         | | dev new pref (95% CI) | held-out new pref (95% CI) | stable pref | general ppl ratio | FUAR |\n|---|---|---|---|---|---|\n",
        r.documents,
        r.facts.0,
        r.facts.1,
        settings.join(", ")
    );
    for (name, m) in [("before", &r.before), ("after the stream", &r.after)] {
        s += &format!(
            "| {name} | {:.3} {} | {:.3} {} | {:.3} | {:.3} | {} |\n",
            m.new_pref_accuracy_dev,
            ci(m.new_pref_ci_dev),
            m.new_pref_accuracy_heldout,
            ci(m.new_pref_ci_heldout),
            m.stable_pref_accuracy,
            m.general_ppl_ratio,
            opt(m.fuar)
        );
    }
    s += "\n| documents after the fact | mean actual | dev new pref | held-out new pref | facts |\n|---|---|---|---|---|\n";
    for l in &r.lags {
        s += &format!(
            "| {} | {:.1} | {} | {} | {} |\n",
            l.lag,
            l.mean_actual_lag,
            opt(l.dev),
            opt(l.heldout),
            l.facts
        );
    }
    s += &format!(
        "\n{} steps ({} applied), {} documents rehearsed, {} replay paragraphs, {} span fallbacks; \
         {:.0} s learning ({:.2} documents/s), {:.0} s wall; version {}\n",
        r.steps.0,
        r.steps.1,
        r.rehearsed,
        r.replayed,
        r.span_fallbacks,
        r.learn_seconds,
        r.documents_per_s,
        r.wall_seconds,
        r.version
    );
    let missed: Vec<&ProbeOutcome> = r.probes.iter().filter(|p| p.after <= 0.0).collect();
    if !missed.is_empty() {
        s += &format!(
            "\n{} probes still prefer the old answer after the stream (margin = new minus old \
             log-probability; spans: what the updates leaned on in the fact's documents):\n\n\
             | fact | prompt | new | old | margin before | margin after | spans |\n\
             |---|---|---|---|---|---|---|\n",
            missed.len()
        );
        for p in missed {
            let mut learned: Vec<&str> = Vec::new();
            for t in r
                .spans
                .iter()
                .filter(|d| d.fact == p.fact)
                .flat_map(|d| &d.texts)
            {
                if !learned.contains(&t.as_str()) {
                    learned.push(t);
                }
            }
            s += &format!(
                "| {} | {} | {} | {} | {:.2} | {:.2} | {} |\n",
                p.fact,
                p.prompt,
                p.new.trim(),
                p.old.trim(),
                p.before,
                p.after,
                learned.join(", ")
            );
        }
    }
    s
}
