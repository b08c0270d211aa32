//! Runs every strategy from the same starting weights with the same data order and seed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::data::DriftSet;
use super::metrics::{compare, score, Metrics};
use crate::error::Result;
use crate::learn::batch::{Kind, Row, RowRules};
use crate::learn::strategy::Localization;
use crate::learn::{Doc, LearnConfig, Strategy};
use crate::live::{self, Inline};
use crate::memory;
use crate::model::{GroupId, Model, Module};
use crate::spans::{find_all, Mentions, SpanRule};
use crate::trace::{trace, GroupStat, Prepared};

/// How `locus eval` trains each strategy.
#[derive(Debug, Clone, Serialize)]
pub struct EvalOptions {
    /// Strategy names, run in order.
    pub strategies: Vec<String>,
    /// Passes over the update documents.
    pub epochs: usize,
    /// Documents per batch.
    pub batch_size: usize,
    /// Shared learning settings; the strategy is replaced per run.
    pub learn: LearnConfig,
}

/// One strategy's row of the result.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyResult {
    /// Strategy name.
    pub name: String,
    /// Its metrics against the starting model.
    #[serde(flatten)]
    pub metrics: Metrics,
    /// Distinct layer groups any update touched.
    pub groups_trained: usize,
    /// Updates applied.
    pub updates: usize,
    /// Training tokens per second (replay included).
    pub tokens_per_s: f64,
    /// Peak resident memory while training and scoring this strategy.
    pub peak_rss_mb: f64,
    /// Seconds spent training.
    pub train_seconds: f64,
}

/// The whole evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// One row per strategy.
    pub strategies: Vec<StrategyResult>,
    /// Documents whose salient spans marked no target token, so the `entity` rule found their
    /// spans for the static trace (the learner falls back the same way).
    pub span_fallbacks: usize,
    /// The starting model's metrics.
    pub before: Metrics,
    /// The groups the static TGL-FP selection picked, if computed.
    pub static_tgl_fp: Option<Vec<GroupId>>,
    /// The settings used.
    pub options: EvalOptions,
}

fn docs_of(set: &DriftSet) -> Vec<Doc> {
    set.updates
        .iter()
        .flat_map(|u| {
            u.docs.iter().map(|d| {
                let spans: Vec<(usize, usize)> =
                    u.salient.iter().flat_map(|s| find_all(d, s)).collect();
                Doc {
                    text: d.clone(),
                    spans: (!spans.is_empty()).then_some(spans),
                }
            })
        })
        .collect()
}

/// The documents of the static trace, each with its span targets as the learner chooses them
/// (given spans, else the `entity` rule); a document no rule marks is left out. Also counts the
/// documents whose given spans fell back.
fn diagnostic_set(
    model: &Model,
    docs: &[Doc],
    max_tokens: usize,
) -> Result<(Vec<Prepared>, usize)> {
    let mut out = Vec::new();
    let mut fallbacks = 0;
    let rules = RowRules {
        max_tokens,
        auto: SpanRule::Entity,
        mentions: &Mentions::default(),
        minor_weight: 1.0,
    };
    for (i, d) in docs.iter().enumerate() {
        let row = Row::document(&model.tokenizer, d, &rules, Kind::Fresh, i)?;
        fallbacks += usize::from(row.fell_back);
        if let Some(targets) = row.targets {
            out.push(Prepared {
                ids: row.ids,
                targets,
            });
        }
    }
    Ok((out, fallbacks))
}

/// Trains and scores every strategy; `progress` hears one line per finished stage.
pub fn run(
    model: Arc<Model>,
    set: &DriftSet,
    opts: &EvalOptions,
    replay: &[String],
    mut progress: impl FnMut(&str),
) -> live::Result<EvalReport> {
    let max_tokens = opts.learn.max_tokens;
    let initial: BTreeMap<String, Tensor> = model
        .written_vars()
        .map(|(n, v)| Ok((n.clone(), v.as_detached_tensor().copy()?)))
        .collect::<Result<_>>()?;
    let start = score(&model, set, max_tokens)?;
    progress("scored the starting model");
    let docs = docs_of(set);
    let strategies: Vec<Strategy> = opts
        .strategies
        .iter()
        .map(|s| Strategy::parse(s))
        .collect::<Result<_>>()?;
    let (prepared, span_fallbacks) = diagnostic_set(&model, &docs, max_tokens)?;
    let static_trace = if strategies.iter().any(Strategy::needs_norms)
        && opts.learn.localization == Localization::Static
    {
        let t = trace(&model, &prepared)?;
        progress(&format!(
            "traced {} documents for the static selection",
            t.texts
        ));
        Some(t)
    } else {
        None
    };
    let mut rows = Vec::new();
    for strategy in strategies {
        restore(&model, &initial)?;
        memory::reset_peak();
        let static_norms = static_trace.as_ref().map(|t| t.groups.as_slice());
        let trained = train(&model, &strategy, opts, replay, &docs, static_norms)?;
        let metrics = compare(&start, &score(&model, set, max_tokens)?);
        let line = format!(
            "{}: {} updates in {:.0} s",
            strategy.name, trained.updates, trained.seconds
        );
        rows.push(trained.result(strategy.name, metrics));
        progress(&line);
    }
    restore(&model, &initial)?;
    let static_tgl_fp =
        static_trace.map(|t| crate::select::select(&t.groups, crate::select::Rule::TglFp));
    Ok(EvalReport {
        strategies: rows,
        span_fallbacks,
        before: compare(&start, &start),
        static_tgl_fp,
        options: opts.clone(),
    })
}

/// Puts the starting weights of the layer groups back (nothing else is ever written).
fn restore(model: &Model, initial: &BTreeMap<String, Tensor>) -> Result<()> {
    for (n, t) in initial {
        model.vars[n].set(t)?;
    }
    Ok(())
}

/// What training one strategy did.
struct Trained {
    tokens: usize,
    seconds: f64,
    updates: usize,
    /// Groups any update touched, as (layer, module).
    touched: BTreeSet<(usize, Module)>,
}

impl Trained {
    /// The strategy's row, with its metrics and the peak memory so far.
    fn result(self, name: String, metrics: Metrics) -> StrategyResult {
        StrategyResult {
            name,
            metrics,
            groups_trained: self.touched.len(),
            updates: self.updates,
            tokens_per_s: if self.seconds > 0.0 {
                self.tokens as f64 / self.seconds
            } else {
                0.0
            },
            peak_rss_mb: memory::peak_rss_mb(),
            train_seconds: self.seconds,
        }
    }
}

/// Trains `strategy` from the model's current weights over `opts.epochs` shuffled passes of
/// `docs` through the server's update path, leaving the trained weights (adapters merged) in
/// the model.
fn train(
    model: &Arc<Model>,
    strategy: &Strategy,
    opts: &EvalOptions,
    replay: &[String],
    docs: &[Doc],
    static_norms: Option<&[GroupStat]>,
) -> live::Result<Trained> {
    let cfg = LearnConfig {
        strategy: strategy.clone(),
        ..opts.learn.clone()
    };
    let mut engine = Inline::new(
        Arc::clone(model),
        cfg,
        replay.to_vec(),
        opts.batch_size,
        |learner| {
            if let (Some(norms), true) = (static_norms, strategy.needs_norms()) {
                learner.set_static_norms(norms);
            }
        },
    )?;
    let mut order = docs.to_vec();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.learn.seed);
    let mut trained = Trained {
        tokens: 0,
        seconds: 0.0,
        updates: 0,
        touched: BTreeSet::new(),
    };
    for _ in 0..opts.epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(opts.batch_size.max(1)) {
            for r in engine.learn(batch)? {
                trained.tokens += r.tokens;
                trained.seconds += r.seconds;
                trained.updates += usize::from(r.applied);
                trained
                    .touched
                    .extend(r.groups.iter().map(|g| (g.layer, g.module)));
            }
        }
    }
    engine.learner().merge_adapters()?;
    Ok(trained)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.3}"))
}

/// The result as one markdown table, the starting model first.
pub fn markdown(r: &EvalReport) -> String {
    let mut s = String::from(
        "| strategy | new pref acc | held-out new pref acc | new answer logprob | new answer ppl | entity span ppl | stable pref acc | stable logprob change | general ppl ratio | FUAR | groups trained | tokens/s | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let row = |name: &str, m: &Metrics, extra: String| {
        format!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {:.3} | {:+.3} | {:.3} | {} | {extra} |\n",
            m.new_pref_accuracy,
            m.new_pref_accuracy_heldout,
            m.new_answer_logprob,
            m.new_answer_ppl,
            m.entity_span_ppl,
            m.stable_pref_accuracy,
            m.stable_logprob_change,
            m.general_ppl_ratio,
            fmt_opt(m.fuar)
        )
    };
    s += &row("(before)", &r.before, "- | - | -".into());
    for x in &r.strategies {
        s += &row(
            &x.name,
            &x.metrics,
            format!(
                "{} | {:.0} | {:.0}",
                x.groups_trained, x.tokens_per_s, x.peak_rss_mb
            ),
        );
    }
    s
}
