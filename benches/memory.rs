//! Where `locus serve`'s memory goes: resident memory after each phase of loading the default
//! model and learning from the drift documents with the serve defaults, and the peak of each step.
//! `cargo bench --bench memory` prints one JSON object; `LOCUS_MEMORY_STEPS` sets the steps
//! (default 12, three re-selections) and `LOCUS_KEEP_VERSIONS` the versions kept (default 4).
//! A checkpoint into a temporary data directory ends the run, as `--data-dir` writes one every
//! `--checkpoint-every` updates. It applies `serve`'s allocator settings, read from
//! `LOCUS_MALLOC_MMAP_THRESHOLD` and `LOCUS_MALLOC_ARENA_MAX` as `serve` reads them (0: glibc's own).

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::Device;
use locus::learn::{Doc, LearnConfig, Learner, Localization, Strategy};
use locus::malloc::Tuning;
use locus::memory::{peak_rss_mb, reset_peak, rss_mb};
use locus::model::{load, Model};
use locus::snapshot::{Snapshot, Snapshots};
use locus::spans::SpanRule;
use locus::store::{Durability, Store};
use serde_json::{json, Value};

#[path = "support/drift.rs"]
mod drift;
const REPLAY: &str = include_str!("../data/replay/general.txt");
const MIB: f64 = 1048576.0;

/// The drift documents, in the order the soak ingests them.
fn documents() -> Vec<Doc> {
    drift::update_texts()
        .into_iter()
        .map(|text| Doc { text, spans: None })
        .collect()
}

/// `locus serve`'s learning defaults (src/cli/serve.rs `LearnArgs`).
fn serve_defaults() -> anyhow::Result<LearnConfig> {
    Ok(LearnConfig {
        strategy: Strategy::parse("mix-review+tgl-fp")?,
        localization: Localization::PerBatch {
            ema: 0.9,
            reselect_every: 4,
        },
        lr: 3e-4,
        clip: 1.0,
        replay_per_batch: 1,
        span_weight: 1.0,
        auto_spans: SpanRule::Trending,
        ..LearnConfig::default()
    })
}

/// MiB of distinct tensors the kept versions hold (shared tensors counted once).
fn kept_mb(model: &Model, snapshots: &Snapshots) -> f64 {
    let mut seen = HashSet::new();
    let mut bytes = 0usize;
    for snap in snapshots.retained() {
        for name in model.vars.keys() {
            if let Some(t) = snap.tensor(name).filter(|t| seen.insert(t.id())) {
                bytes += t.elem_count() * t.dtype().size_in_bytes();
            }
        }
    }
    bytes as f64 / MIB
}

/// One row of the breakdown: the RSS now, its change, and the peak since the last reset.
struct Phases {
    rows: Vec<Value>,
    last: f64,
}

impl Phases {
    fn mark(&mut self, phase: &str, extra: Value) {
        let (rss, peak) = (rss_mb(), peak_rss_mb());
        let mut row =
            json!({"phase": phase, "rss_mb": rss, "delta_mb": rss - self.last, "peak_mb": peak});
        if let (Some(row), Some(extra)) = (row.as_object_mut(), extra.as_object()) {
            row.extend(extra.clone());
        }
        eprintln!("{row}");
        self.rows.push(row);
        self.last = rss;
        reset_peak();
    }
}

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::var("LOCUS_MEMORY_STEPS").map_or(Ok(12), |s| s.parse())?;
    let keep: usize = std::env::var("LOCUS_KEEP_VERSIONS").map_or(Ok(4), |s| s.parse())?;
    // The allocator settings `serve` applies, before anything is allocated.
    let tuning = Tuning::from_env()?;
    tuning.apply()?;
    let mut phases = Phases {
        rows: Vec::new(),
        last: 0.0,
    };
    phases.mark("process start", json!({}));
    let model = Arc::new(load::load("default", &Device::Cpu)?);
    let params: usize = model.vars.values().map(|v| v.elem_count()).sum();
    phases.mark(
        "tokenizer + model loaded (f32 weights)",
        json!({"params": params, "weights_mb": params as f64 * 4.0 / MIB}),
    );
    let snapshots = Snapshots::new(Snapshot::load(Arc::clone(&model), 0)?, keep);
    phases.mark(
        "first snapshot (serving copy)",
        json!({"kept_mb": kept_mb(&model, &snapshots)}),
    );
    let dir = std::env::temp_dir().join(format!("locus-memory-{}", std::process::id()));
    let durability = Durability {
        dir: dir.clone(),
        checkpoint_every: 0,
        keep_checkpoints: 1,
    };
    let (mut store, _) = Store::open(durability, &model, "mix-review+tgl-fp")?;
    phases.mark("data directory opened", json!({}));
    let replay = REPLAY
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    let mut learner = Learner::new(Arc::clone(&model), serve_defaults()?, replay, 0)?;
    phases.mark("learner created (serve defaults)", json!({}));
    let docs = documents();
    for (i, batch) in docs.chunks(2).cycle().take(steps).enumerate() {
        let report = learner.step(batch)?;
        let (tracked, state) = learner.optimizer_footprint();
        let after_step = json!({
            "tokens": report.tokens, "traced": report.traced, "groups_updated": report.groups.len(),
            "adamw_params": tracked, "adamw_mb": state as f64 * 4.0 / MIB, "seconds": report.seconds,
        });
        phases.mark(&format!("step {}", i + 1), after_step);
        if report.applied {
            let changed: Vec<_> = report.groups.iter().map(|g| g.id()).collect();
            let next = snapshots.current().after_update(
                report.version,
                &changed,
                &learner.current_params()?,
            )?;
            snapshots.publish(next)?;
            store.updated(changed);
        }
        phases.mark(
            &format!("version {} kept", report.version),
            json!({"kept_versions": snapshots.retained().len(), "kept_mb": kept_mb(&model, &snapshots)}),
        );
        // What the server's learner does when no batch waits.
        if tuning.trim {
            let started = std::time::Instant::now();
            locus::malloc::trim();
            phases.mark(
                "trimmed",
                json!({"seconds": started.elapsed().as_secs_f64()}),
            );
        }
    }
    let selection = learner.selection().unwrap_or_default();
    let written = learner.with_state(|state| {
        store.checkpoint(&snapshots.current(), selection, Some(state), Vec::new())
    })??;
    phases.mark(
        "checkpoint written",
        json!({"checkpoint_mb": written.bytes as f64 / MIB, "groups": written.meta.groups.len()}),
    );
    std::fs::remove_dir_all(&dir)?;
    let arena = std::env::var("MALLOC_ARENA_MAX").unwrap_or_default();
    let vocab = model.arch.vocab_size();
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "model": "default", "vocab": vocab, "keep_versions": keep, "malloc_arena_max": arena,
            "malloc_mmap_threshold": tuning.mmap_threshold, "locus_malloc_arena_max": tuning.arena_max,
            "malloc_trim": tuning.trim,
            "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "phases": phases.rows,
        }))?
    );
    Ok(())
}
