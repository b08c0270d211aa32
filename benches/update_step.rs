//! Seconds per learning step of 4 x 128 tokens on the default model, CPU: `full`, `tgl-fp` with a
//! static selection of a third of the groups (layers 20-29), `tgl-fp` traced every batch, and
//! `tgl-fp` re-selected every 4th batch as `serve` does. Steps run as `serve` runs them, without
//! the loss-after forward pass. Then the served setting once more on the first four and the first
//! eight real drift documents (`data/drift/updates.jsonl`, 40-70 tokens each), for tokens per
//! second on the text a server is streamed: four of them take a row each, eight pack two to a row
//! (see `locus::model::packing`). `cargo bench --bench update_step` prints one JSON object: per
//! setting, the median of 5 cycles' mean step time after one warm-up cycle (as PyTorch's baseline
//! takes the median of 5 runs), a cycle being one step, or the 4 steps between re-selections (one
//! traced, three that reuse the selection). `cargo bench --bench update_step -- --traced-only`
//! runs the step traced every batch alone, for `scripts/bench.sh`'s repeated rounds.
//! `LOCUS_DEVICE=cuda:0` runs it on a GPU (a build with `--features cuda`).

use std::sync::Arc;

use locus::learn::strategy::Localization;
use locus::learn::{Doc, LearnConfig, Learner, Strategy};
use locus::model::{load, Model};
use locus::trace::GroupStat;

const SAMPLE: &str = include_str!("../data/sample/trace.jsonl");
/// Cycles timed per setting, after the warm-up one.
const CYCLES: usize = 5;
#[path = "support/drift.rs"]
mod drift;

fn docs() -> Vec<Doc> {
    let text: String = SAMPLE
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(String::from))
        .collect::<Vec<_>>()
        .join(" ");
    (0..4)
        .map(|i| Doc {
            text: format!("{} {text} {text}", i),
            spans: None,
        })
        .collect()
}

/// The first `n` documents of the drift set's updates.
fn drift_docs(n: usize) -> Vec<Doc> {
    drift::update_texts()
        .into_iter()
        .take(n)
        .map(|text| Doc { text, spans: None })
        .collect()
}

fn bench(
    model: &Arc<Model>,
    batch: &[Doc],
    strategy: &str,
    localization: Localization,
    fixed: bool,
) -> anyhow::Result<serde_json::Value> {
    let cfg = LearnConfig {
        strategy: Strategy::parse(strategy)?,
        localization,
        max_tokens: 128,
        measure_after: false,
        ..LearnConfig::default()
    };
    let cycle = match localization {
        Localization::PerBatch { reselect_every, .. } => reselect_every.max(1),
        Localization::Static => 1,
    };
    let mut learner = Learner::new(Arc::clone(model), cfg, vec![], 0)?;
    if fixed {
        let stats: Vec<GroupStat> = model
            .groups()
            .into_iter()
            .map(|g| GroupStat {
                layer: g.layer,
                module: g.module,
                span_norm: if g.layer >= 20 { 2.0 } else { 1.0 },
                full_norm: 1.0,
                relative: 0.0,
            })
            .collect();
        learner.set_static_norms(&stats);
    }
    for _ in 0..cycle {
        learner.step(batch)?;
    }
    let mut secs = Vec::new();
    let (mut groups, mut tokens) = (0, 0);
    for _ in 0..CYCLES {
        let mut total = 0.0;
        for _ in 0..cycle {
            let r = learner.step(batch)?;
            (groups, tokens) = (r.groups.len(), r.tokens);
            total += r.seconds;
        }
        secs.push(total / cycle as f64);
    }
    secs.sort_by(f64::total_cmp);
    let median = secs[CYCLES / 2];
    let (params, state) = learner.optimizer_footprint();
    Ok(serde_json::json!({
        "strategy": strategy, "localization": localization, "steps_per_cycle": cycle, "groups_updated": groups,
        "seconds_per_batch": median, "tokens_per_batch": tokens, "tokens_per_s": tokens as f64 / median,
        "optimizer_params": params, "optimizer_state_mb": state as f64 * 4.0 / 1048576.0,
    }))
}

fn main() -> anyhow::Result<()> {
    locus::compute::configure_threads(false);
    let model = Arc::new(load::load("default", &locus::model::device::from_env()?)?);
    let served = Localization::PerBatch {
        ema: 0.9,
        reselect_every: 4,
    };
    let traced = Localization::PerBatch {
        ema: 0.9,
        reselect_every: 1,
    };
    let full_rows = docs();
    let traced_only = std::env::args().any(|a| a == "--traced-only");
    let settings = [
        ("full", Localization::Static, false),
        ("tgl-fp", Localization::Static, true),
        ("tgl-fp", traced, false),
        ("tgl-fp", served, false),
    ];
    let runs = settings
        .into_iter()
        .filter(|&(_, localization, _)| !traced_only || localization == traced)
        .map(|(strategy, localization, fixed)| {
            bench(&model, &full_rows, strategy, localization, fixed)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for r in &runs {
        assert_eq!(
            r["tokens_per_batch"],
            4 * 128,
            "documents must fill 128 tokens"
        );
    }
    let drift_sizes: &[usize] = if traced_only { &[] } else { &[4, 8] };
    let drift = drift_sizes
        .iter()
        .copied()
        .map(|n| {
            let mut r = bench(&model, &drift_docs(n), "tgl-fp", served, false)?;
            r["documents"] = n.into();
            Ok(r)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!(
        "{}",
        serde_json::to_string_pretty(
            &serde_json::json!({"batch": 4, "seq": 128, "runs": runs, "drift_documents": drift})
        )?
    );
    Ok(())
}
