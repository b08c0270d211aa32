//! `locus eval`: every strategy trained from the same weights on a drift set, then scored.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use locus::eval::data::DriftSet;
use locus::eval::run::{markdown, run, EvalOptions};
use locus::learn::strategy::Localization;
use locus::learn::{LearnConfig, Strategy};

/// The replay corpus Mix-Review samples when no `--replay` is given; it shares no text with data/drift.
const REPLAY: &str = include_str!("../../data/replay/general.txt");

/// The model and the drift set an evaluation runs on.
#[derive(Args)]
pub struct DriftArgs {
    /// A Hugging Face model directory, a .gguf file, or `default`.
    #[arg(long, default_value = "default", env = "LOCUS_MODEL")]
    model: String,
    #[command(flatten)]
    device: super::DeviceArg,
    /// Drift-set directory (updates.jsonl, stable.jsonl, general.txt).
    #[arg(long, default_value = "data/drift")]
    data: PathBuf,
}

impl DriftArgs {
    /// Opens the device and reads the drift set, both before the slow model load.
    pub fn open(&self) -> anyhow::Result<(candle_core::Device, DriftSet)> {
        Ok((self.device.open()?, DriftSet::load(&self.data)?))
    }

    /// Loads the model onto `device`.
    pub fn model(&self, device: &candle_core::Device) -> anyhow::Result<locus::model::Model> {
        super::load_model(&self.model, device)
    }
}

/// Arguments of `locus eval`.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    drift: DriftArgs,
    /// Comma-separated strategies: full, tgl-fp, tgl-alr, topk[:K], random-k, frozen, mix-review, lora, units, and `+` combinations.
    #[arg(
        long,
        default_value = "frozen,full,tgl-fp,tgl-alr,random-k,mix-review,mix-review+tgl-fp",
        value_delimiter = ','
    )]
    strategy: Vec<String>,
    /// Passes over the update documents.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Documents per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Seed of data order, random-k and replay sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest document in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// `static` (trace once, as in the paper) or `per-batch` (trace every batch, moving average).
    #[arg(long, default_value = "static")]
    localization: String,
    /// Weight of the past in the per-batch moving average.
    #[arg(long, default_value_t = 0.9)]
    ema: f64,
    /// Batches between per-batch re-selections.
    #[arg(long, default_value_t = 4)]
    reselect_every: usize,
    /// Replay corpus for mix-review, one paragraph a line; the bundled one if omitted.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Print the result as JSON instead of the markdown table.
    #[arg(long)]
    json: bool,
    /// Write a plot of uptake against forgetting per strategy (.svg).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Runs `locus eval`.
pub fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    let (device, set) = a.drift.open()?;
    for s in &a.strategy {
        Strategy::parse(s)?;
    }
    let localization = match a.localization.as_str() {
        "static" => Localization::Static,
        "per-batch" => Localization::PerBatch {
            ema: a.ema,
            reselect_every: a.reselect_every,
        },
        other => anyhow::bail!("--localization {other}: use static or per-batch"),
    };
    let replay = match &a.replay {
        Some(p) => std::fs::read_to_string(p).map_err(|e| locus::Error::io(p, e))?,
        None => REPLAY.to_string(),
    };
    let replay: Vec<String> = replay
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    let model = Arc::new(a.drift.model(&device)?);
    let opts = EvalOptions {
        strategies: a.strategy.clone(),
        epochs: a.epochs,
        batch_size: a.batch_size,
        learn: LearnConfig {
            strategy: Strategy::parse("full")?,
            localization,
            lr: a.lr,
            warmup: a.warmup,
            weight_decay: a.weight_decay,
            clip: a.clip,
            seed: a.seed,
            max_tokens: a.max_tokens,
            ..LearnConfig::default()
        },
    };
    let report = run(model, &set, &opts, &replay, |line| {
        eprintln!("locus: {line}")
    })?;
    if report.span_fallbacks > 0 {
        eprintln!(
            "locus: {} document(s) had no target token in their salient spans; their spans came from the entity rule",
            report.span_fallbacks
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", markdown(&report));
    }
    if let Some(p) = &a.plot {
        let b = &report.before;
        let points: Vec<(String, f64, f64)> = report
            .strategies
            .iter()
            .map(|s| {
                let m = &s.metrics;
                (
                    s.name.clone(),
                    b.stable_pref_accuracy - m.stable_pref_accuracy,
                    m.new_pref_accuracy - b.new_pref_accuracy,
                )
            })
            .collect();
        locus::plot::write_scatter(
            p,
            &points,
            "forgetting: drop in stable-probe accuracy",
            "uptake: gain in new-answer preference accuracy",
            "uptake against forgetting per strategy",
        )?;
        eprintln!("locus: wrote {}", p.display());
    }
    Ok(())
}
