//! Strategies by name and the settings of a learning run.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::select::Rule;
use crate::spans::SpanRule;

/// Which layer groups an update touches and how.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Strategy {
    /// The name it was parsed from, for reports.
    pub name: String,
    /// Which groups are trainable.
    pub selection: Selection,
    /// Scale each group's learning rate by relative / mean relative (TGL-ALR).
    pub alr: bool,
    /// Mix each batch with replay text (Mix-Review).
    pub mix_review: bool,
    /// Train low-rank adapters on the selected groups instead of their weights.
    pub lora: bool,
    /// Within the trainable groups, change only the units (attention heads, MLP neurons) whose
    /// relative norm is above their group's mean.
    pub units: bool,
}

/// How the trainable groups are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// Every layer group.
    All,
    /// Nothing changes: the floor.
    Frozen,
    /// A rule over relative gradient norms.
    Rule(#[serde(skip)] RuleKind),
}

/// Rules that need relative norms (`random-k` needs only the TGL-FP count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// Above the mean relative norm.
    TglFp,
    /// The k highest.
    TopK(usize),
    /// As many random groups as TGL-FP picks, drawn with the run's seed.
    RandomK,
}

impl Strategy {
    /// Parses `full`, `tgl-fp`, `tgl-alr`, `topk[:K]`, `random-k`, `frozen`, `mix-review`, `lora`,
    /// `units`, and combinations joined with `+` such as `mix-review+tgl-fp` or `tgl-fp+units`.
    pub fn parse(name: &str) -> Result<Self> {
        let mut s = Strategy {
            name: name.to_string(),
            selection: Selection::All,
            alr: false,
            mix_review: false,
            lora: false,
            units: false,
        };
        let mut chosen = false;
        for part in name.split('+') {
            let selection = match part {
                "full" => Some(Selection::All),
                "frozen" => Some(Selection::Frozen),
                "tgl-fp" => Some(Selection::Rule(RuleKind::TglFp)),
                "random-k" => Some(Selection::Rule(RuleKind::RandomK)),
                "tgl-alr" => {
                    s.alr = true;
                    Some(Selection::All)
                }
                "mix-review" => {
                    s.mix_review = true;
                    None
                }
                "lora" => {
                    s.lora = true;
                    None
                }
                "units" => {
                    s.units = true;
                    None
                }
                p if p.starts_with("topk") => {
                    let k = p.strip_prefix("topk:").unwrap_or("8");
                    let k = k.parse().map_err(|_| Error::Invalid(format!("strategy `{name}`: topk:K needs a number, got `{k}`")))?;
                    Some(Selection::Rule(RuleKind::TopK(k)))
                }
                other => {
                    return Err(Error::Invalid(format!(
                        "unknown strategy `{other}` (full, tgl-fp, tgl-alr, topk[:K], random-k, frozen, mix-review, lora, units; combine with +)"
                    )))
                }
            };
            if let Some(sel) = selection {
                if chosen && !(s.alr && sel == Selection::All) {
                    return Err(Error::Invalid(format!(
                        "strategy `{name}` names two selections"
                    )));
                }
                chosen = true;
                s.selection = sel;
            }
        }
        if s.lora && s.units {
            return Err(Error::Invalid(format!(
                "strategy `{name}`: adapters span every unit of a matrix, so lora and units do not combine"
            )));
        }
        Ok(s)
    }

    /// Whether this strategy needs relative norms.
    pub fn needs_norms(&self) -> bool {
        self.alr || self.units || matches!(self.selection, Selection::Rule(_))
    }

    /// The selection rule for a given TGL-FP group count (random-k draws that many).
    pub fn rule(&self, tgl_fp_count: usize, seed: u64) -> Option<Rule> {
        match self.selection {
            Selection::Rule(RuleKind::TglFp) => Some(Rule::TglFp),
            Selection::Rule(RuleKind::TopK(k)) => Some(Rule::TopK(k)),
            Selection::Rule(RuleKind::RandomK) => Some(Rule::RandomK {
                k: tgl_fp_count,
                seed,
            }),
            _ => None,
        }
    }
}

/// When relative norms are measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Localization {
    /// Trace once on a diagnostic set and keep the selection (as in the paper).
    Static,
    /// Trace every batch; norms are smoothed by an exponential moving average and the selection is
    /// recomputed every `reselect_every` batches.
    PerBatch {
        /// Weight of the past in the moving average.
        ema: f64,
        /// Batches between re-selections.
        reselect_every: usize,
    },
}

/// Settings of a learning run.
#[derive(Debug, Clone, Serialize)]
pub struct LearnConfig {
    /// The strategy.
    pub strategy: Strategy,
    /// When norms are measured.
    pub localization: Localization,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    pub clip: f64,
    /// Adam betas.
    pub betas: (f64, f64),
    /// Adam epsilon.
    pub eps: f64,
    /// Seed for random-k and replay sampling.
    pub seed: u64,
    /// Longest document in tokens; longer ones are truncated.
    pub max_tokens: usize,
    /// Replay paragraphs mixed into each batch by Mix-Review.
    pub replay_per_batch: usize,
    /// Share of tokens the surprisal rule marks.
    pub surprisal_fraction: f64,
    /// How spans are found in documents that bring none: `Entity` (names, falling back to
    /// surprisal) or `Surprisal`.
    pub auto_spans: SpanRule,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    pub lora_alpha: f64,
    /// Times each document is learned again at spaced later steps (0: once only).
    pub rehearse: usize,
    /// Recent documents kept for rehearsal at most; the oldest go first.
    pub rehearsal_window: usize,
    /// Weight of the mean span loss added to the mean full loss in the update objective.
    pub span_weight: f64,
    /// Weight in the full loss of the names `trending` passes over (1: as any other token).
    pub minor_name_weight: f64,
    /// Documents learned before the step whose words `trending` counts with the step's own, so a
    /// fact whose documents fall into two steps is counted as one burst (0: the step's only).
    pub trending_window: usize,
    /// Measure the batch's loss again after the update (one more forward pass).
    pub measure_after: bool,
}

impl Default for LearnConfig {
    fn default() -> Self {
        LearnConfig {
            strategy: Strategy::parse("tgl-fp").expect("built-in strategy"),
            localization: Localization::Static,
            lr: 5e-5,
            warmup: 0,
            weight_decay: 0.0,
            clip: 1.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            seed: 0,
            max_tokens: 256,
            replay_per_batch: 2,
            surprisal_fraction: 0.15,
            auto_spans: SpanRule::Entity,
            lora_rank: 8,
            lora_alpha: 16.0,
            rehearse: 0,
            rehearsal_window: 1024,
            span_weight: 0.0,
            minor_name_weight: 1.0,
            trending_window: 0,
            measure_after: true,
        }
    }
}
