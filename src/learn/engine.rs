//! One learning step: tokenize, find spans, one forward, span and full backward where tracing is
//! needed, select groups, clip, AdamW on the trainable groups only, report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::batch::{Batch, Kind, Row, RowRules};
use super::optimizer::{AdamW, Moments, Undo};
use super::rehearsal::{reorder, Entry, Rehearsal};
use super::strategy::{LearnConfig, Localization, Selection};
use super::units::{self, Units};
use crate::error::{Error, Result};
use crate::model::grads::{self, GradNorms};
use crate::model::{GroupId, Model, Module, ParamKind, Params};
use crate::select::{self, Rule};
use crate::spans::{Mentions, SpanRule};
use crate::trace::{span_and_full_loss, squared_norms, GroupStat};

/// A document to learn from, with salient spans as character ranges when the client gave them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Doc {
    /// The text.
    pub text: String,
    /// Salient character ranges; `None` lets the automatic rules find them.
    pub spans: Option<Vec<(usize, usize)>>,
}

/// A group touched by an update.
#[derive(Debug, Clone, Serialize)]
pub struct UpdatedGroup {
    /// Layer index.
    pub layer: usize,
    /// `attn` or `mlp`.
    pub module: Module,
    /// The relative norm that selected it, when norms were measured.
    pub relative: Option<f64>,
    /// Its learning-rate scale (1 unless TGL-ALR).
    pub lr_scale: f64,
}

impl UpdatedGroup {
    /// The group this entry names.
    pub fn id(&self) -> GroupId {
        GroupId {
            layer: self.layer,
            module: self.module,
        }
    }
}

/// What one call of [`Learner::step`] did.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateReport {
    /// 0-based batch counter of this learner.
    pub batch: u64,
    /// Model version after the step (it increases only when an update is applied).
    pub version: u64,
    /// Whether weights changed.
    pub applied: bool,
    /// Why no update was applied, if so.
    pub skipped: Option<String>,
    /// Documents learned from (replay excluded).
    pub documents: usize,
    /// Replay paragraphs mixed in.
    pub replay: usize,
    /// Recent documents rehearsed in this step.
    pub rehearsed: usize,
    /// Tokens in the batch.
    pub tokens: usize,
    /// How each document's spans were found.
    pub span_rules: Vec<SpanRule>,
    /// Documents whose given spans marked no target token, so an automatic rule found them.
    pub span_fallbacks: usize,
    /// For each document, the text its span loss leaned on (see [`Row::span_texts`]).
    pub spans: Vec<Vec<String>>,
    /// Mean NLL over all targets before the update.
    pub loss_before: f64,
    /// Mean NLL over span targets before the update.
    pub span_loss: f64,
    /// Mean NLL over all targets after the update (same batch), when measured.
    pub loss_after: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Groups updated.
    pub groups: Vec<UpdatedGroup>,
    /// Units (attention heads, MLP neurons) selected and in all over the updated groups, when the
    /// strategy selects units.
    pub units: Option<(usize, usize)>,
    /// Whether this step measured norms (a trace step).
    pub traced: bool,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
}

/// Drives continual pretraining of one model.
pub struct Learner {
    model: Arc<Model>,
    cfg: LearnConfig,
    opt: AdamW,
    replay: Vec<String>,
    rng: rand::rngs::StdRng,
    batches: u64,
    applied: u64,
    version: u64,
    /// (span, full) norms per group: static, or the moving average.
    norms: Option<BTreeMap<GroupId, (f64, f64)>>,
    selection: Option<Vec<GroupId>>,
    /// Low-rank adapters by weight name, when the strategy is LoRA.
    adapters: BTreeMap<String, Adapter>,
    /// Recent documents waiting to be learned again.
    rehearsal: Rehearsal,
    /// The last [`LearnConfig::trending_window`] documents learned, oldest first.
    recent: std::collections::VecDeque<String>,
    /// Unit norms and masks, when the strategy selects units.
    units: Option<Units>,
    /// Whether each update keeps what it overwrote, for [`Learner::revert`].
    revertible: bool,
    /// What the last step's update overwrote, while it can still be reverted.
    undo: Option<Undo>,
}

/// What learning needs to resume after a restart as if it had never stopped, besides the
/// weights: optimizer moments, counters and localization statistics.
pub struct LearnerState {
    /// AdamW moments by parameter name.
    pub moments: BTreeMap<String, Moments>,
    /// Batches seen.
    pub batches: u64,
    /// Updates applied.
    pub applied: u64,
    /// (span, full) norms per group.
    pub norms: Option<BTreeMap<GroupId, (f64, f64)>>,
    /// The groups selected.
    pub selection: Option<Vec<GroupId>>,
    /// `(span, full)` norms of each unit per group, when the strategy selects units.
    pub unit_norms: Option<BTreeMap<GroupId, Vec<(f64, f64)>>>,
    /// Recent documents waiting for rehearsal.
    pub rehearsal: Vec<Entry>,
    /// The last documents learned, oldest first, for `trending`'s counts.
    pub recent: Vec<String>,
}

/// A LoRA adapter `W + scale * B @ A` on one weight matrix; `B` starts at zero.
struct Adapter {
    a: Var,
    b: Var,
    scale: f64,
    group: GroupId,
}

impl Adapter {
    fn delta(&self, tracked: bool) -> candle_core::Result<Tensor> {
        let (a, b) = if tracked {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_detached_tensor(), self.b.as_detached_tensor())
        };
        b.matmul(&a)? * self.scale
    }
}

impl Learner {
    /// A learner starting at `version`; `replay` feeds Mix-Review.
    pub fn new(
        model: Arc<Model>,
        cfg: LearnConfig,
        replay: Vec<String>,
        version: u64,
    ) -> Result<Self> {
        if cfg.strategy.mix_review && replay.is_empty() {
            return Err(Error::Invalid(
                "mix-review needs a non-empty replay corpus".into(),
            ));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let adapters = if cfg.strategy.lora {
            adapters_for(&model, &cfg, &mut rng)?
        } else {
            BTreeMap::new()
        };
        let units = match cfg.strategy.units {
            true => Some(Units::new(&model)?),
            false => None,
        };
        let opt = AdamW::new(cfg.betas, cfg.eps, cfg.weight_decay);
        Ok(Learner {
            model,
            opt,
            replay,
            rng,
            batches: 0,
            applied: 0,
            version,
            norms: None,
            selection: None,
            adapters,
            rehearsal: Rehearsal::new(cfg.rehearse, cfg.rehearsal_window),
            recent: Default::default(),
            units,
            cfg,
            revertible: false,
            undo: None,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Current model version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The groups selected now, if the strategy selects.
    pub fn selection(&self) -> Option<&[GroupId]> {
        self.selection.as_deref()
    }

    /// Unit norms and masks, when the strategy selects units.
    pub fn units(&self) -> Option<&Units> {
        self.units.as_ref()
    }

    /// A copy of the state that learning resumes from (LoRA adapters are not part of it: their
    /// product is in the served weights, and new adapters start from there).
    pub fn export_state(&self) -> Result<LearnerState> {
        Ok(self.state(self.opt.export()?))
    }

    /// Runs `f` on the state learning resumes from without copying the optimizer's moments (for
    /// a checkpoint, written before the next step): no step can run while `f` borrows the
    /// learner, and `f` must not keep the moments, which the next step changes in place.
    pub fn with_state<T>(&self, f: impl FnOnce(&LearnerState) -> T) -> Result<T> {
        Ok(f(&self.state(self.opt.shared()?)))
    }

    fn state(&self, moments: BTreeMap<String, Moments>) -> LearnerState {
        LearnerState {
            moments,
            batches: self.batches,
            applied: self.applied,
            norms: self.norms.clone(),
            selection: self.selection.clone(),
            unit_norms: self.units.as_ref().and_then(|u| u.norms().cloned()),
            rehearsal: self.rehearsal.export(),
            recent: self.recent.iter().cloned().collect(),
        }
    }

    /// Resumes from an exported state. Moments of parameters this model lacks, or of another
    /// size, are refused by name.
    pub fn import_state(&mut self, state: LearnerState) -> Result<()> {
        for (name, m) in &state.moments {
            let size = self.model.vars.get(name).map(|v| 2 * v.elem_count());
            if size != Some(m.state.elem_count()) {
                return Err(Error::Invalid(format!(
                    "optimizer state of `{name}` does not fit this model"
                )));
            }
        }
        if let (Some(units), Some(norms)) = (self.units.as_mut(), state.unit_norms) {
            units.restore(&self.model, norms)?;
        }
        self.opt.import(state.moments);
        self.batches = state.batches;
        self.applied = state.applied;
        self.norms = state.norms;
        self.selection = state.selection;
        self.rehearsal.import(state.rehearsal);
        self.recent = state.recent.into();
        self.keep_recent();
        Ok(())
    }

    /// Makes every update keep a copy of the weights and optimizer moments it overwrites, so
    /// that [`Learner::revert`] can put them back; the copies cost memory and time, so a learner
    /// keeps none unless asked.
    pub fn set_revertible(&mut self, revertible: bool) {
        self.revertible = revertible;
        self.undo = None;
    }

    /// Reverts the last step's update: the weights and optimizer moments as they were before it,
    /// and its version number and count taken back. Only a revertible learner's last step, when
    /// it applied an update, can be reverted.
    pub fn revert(&mut self) -> Result<()> {
        let undo = self
            .undo
            .take()
            .ok_or_else(|| Error::Invalid("no update to revert".into()))?;
        self.opt.revert(undo)?;
        self.version -= 1;
        self.applied -= 1;
        Ok(())
    }

    /// Parameters with optimizer state, and the elements that state holds.
    pub fn optimizer_footprint(&self) -> (usize, usize) {
        (self.opt.tracked(), self.opt.state_elements())
    }

    /// Fixes static norms from a trace over a diagnostic set (the paper's setting).
    pub fn set_static_norms(&mut self, groups: &[GroupStat]) {
        self.norms = Some(
            groups
                .iter()
                .map(|g| (g.id(), (g.span_norm, g.full_norm)))
                .collect(),
        );
        self.reselect();
    }

    fn stats(&self) -> Vec<GroupStat> {
        self.norms
            .iter()
            .flatten()
            .map(|(g, &(s, f))| GroupStat {
                layer: g.layer,
                module: g.module,
                span_norm: s,
                full_norm: f,
                relative: if f > 0.0 { s / f } else { 0.0 },
            })
            .collect()
    }

    fn reselect(&mut self) {
        let stats = self.stats();
        let tgl = select::select(&stats, Rule::TglFp).len();
        self.selection = self
            .cfg
            .strategy
            .rule(tgl, self.cfg.seed)
            .map(|r| select::select(&stats, r));
    }

    /// Groups an update may change now, with learning-rate scales.
    fn trainable(&self) -> BTreeMap<GroupId, f64> {
        let all = self.model.groups();
        let groups: Vec<GroupId> = match self.cfg.strategy.selection {
            Selection::Frozen => Vec::new(),
            Selection::All => all,
            Selection::Rule(_) => self.selection.clone().unwrap_or_default(),
        };
        let scales: BTreeMap<GroupId, f64> = if self.cfg.strategy.alr {
            select::alr_scales(&self.stats())
                .into_iter()
                .map(|s| (s.group, s.scale))
                .collect()
        } else {
            BTreeMap::new()
        };
        groups
            .into_iter()
            .map(|g| (g, scales.get(&g).copied().unwrap_or(1.0)))
            .collect()
    }

    /// Forward weights: every group records gradients on a trace step, the trainable groups
    /// otherwise. Under LoRA a group's matrices are `W + scale * B @ A` with the adapters tracked,
    /// and `W` itself tracked only on trace steps, where its gradient gives the group's norm.
    fn params_for(&self, traced: bool, trainable: &BTreeMap<GroupId, f64>) -> Result<Params> {
        let model = &self.model;
        let group = |name: &str| match model.arch.kind_of(name) {
            Some(ParamKind::Group(g)) => Some(g),
            _ => None,
        };
        if self.adapters.is_empty() {
            return Ok(model
                .params(|name| group(name).is_some_and(|g| traced || trainable.contains_key(&g))));
        }
        let mut map = BTreeMap::new();
        for (name, var) in &model.vars {
            let w = if traced && group(name).is_some() {
                var.as_tensor().clone()
            } else {
                var.as_detached_tensor()
            };
            let t = match self.adapters.get(name) {
                Some(ad) if traced || trainable.contains_key(&ad.group) => (w + ad.delta(true)?)?,
                _ => w,
            };
            map.insert(name.clone(), t);
        }
        Ok(Params::from_map(map))
    }

    /// The weights as they now serve, adapters included, recording no gradient.
    pub fn current_params(&self) -> Result<Params> {
        if self.adapters.is_empty() {
            return Ok(self.model.params(|_| false));
        }
        let mut map = BTreeMap::new();
        for (name, var) in &self.model.vars {
            let w = var.as_detached_tensor();
            let t = match self.adapters.get(name) {
                Some(ad) => (w + ad.delta(false)?)?,
                None => w,
            };
            map.insert(name.clone(), t);
        }
        Ok(Params::from_map(map))
    }

    /// What an update trains: `(optimizer key, variable, group)`, the weights themselves or,
    /// under LoRA, the adapters of the trainable groups.
    fn trainables(&self, trainable: &BTreeMap<GroupId, f64>) -> Vec<(String, Var, GroupId)> {
        if !self.adapters.is_empty() {
            return self
                .adapters
                .iter()
                .filter(|(_, ad)| trainable.contains_key(&ad.group))
                .flat_map(|(n, ad)| {
                    [
                        (format!("{n}.lora_a"), ad.a.clone(), ad.group),
                        (format!("{n}.lora_b"), ad.b.clone(), ad.group),
                    ]
                })
                .collect();
        }
        // Under units a parameter without a mask is one no unit owns, or units are not measured.
        let masked = |n: &str| self.units.as_ref().is_none_or(|u| u.mask(n).is_some());
        self.model
            .vars
            .iter()
            .filter_map(|(n, v)| match self.model.arch.kind_of(n) {
                Some(ParamKind::Group(g)) if trainable.contains_key(&g) && masked(n) => {
                    Some((n.clone(), v.clone(), g))
                }
                _ => None,
            })
            .collect()
    }

    /// Folds the LoRA adapters into the weights (`W += scale * B @ A`) and restarts them at zero,
    /// so the model's variables hold what was learned.
    pub fn merge_adapters(&mut self) -> Result<()> {
        for (name, ad) in &self.adapters {
            let var = &self.model.vars[name];
            var.set(&(var.as_detached_tensor() + ad.delta(false)?)?)?;
            ad.b.set(&ad.b.as_detached_tensor().zeros_like()?)?;
        }
        Ok(())
    }

    /// Drops the oldest remembered documents beyond [`LearnConfig::trending_window`] (also when
    /// a restart brings a smaller window).
    fn keep_recent(&mut self) {
        let excess = self.recent.len().saturating_sub(self.cfg.trending_window);
        self.recent.drain(..excess);
    }

    /// Whether this step measures norms: when group norms are due, and until units are measured.
    fn needs_trace(&self) -> bool {
        self.norms_due() || self.units.as_ref().is_some_and(|u| !u.measured())
    }

    /// Whether group norms are due: until they exist, and under per-batch localization on the
    /// steps where the selection is due to be recomputed (the others reuse it).
    fn norms_due(&self) -> bool {
        if !self.cfg.strategy.needs_norms() {
            return false;
        }
        match self.cfg.localization {
            _ if self.norms.is_none() => true,
            Localization::Static => false,
            Localization::PerBatch { reselect_every, .. } => {
                self.batches.is_multiple_of(reselect_every.max(1) as u64)
            }
        }
    }

    /// The step's rows: the client's documents, the recent ones due for rehearsal (sentences
    /// reordered), and Mix-Review's replay paragraphs.
    fn batch(&mut self, docs: &[Doc]) -> Result<Batch> {
        let tok = &self.model.tokenizer;
        let limit = docs.len() * self.cfg.rehearse;
        let due: Vec<Doc> = self
            .rehearsal
            .take_due(self.batches, limit)
            .into_iter()
            .map(|d| reorder(&d, &mut self.rng))
            .collect();
        let mentions = match self.cfg.auto_spans {
            SpanRule::Trending => Mentions::of(
                self.recent
                    .iter()
                    .map(String::as_str)
                    .chain(docs.iter().chain(&due).map(|d| d.text.as_str())),
            ),
            _ => Mentions::default(),
        };
        let rules = RowRules {
            max_tokens: self.cfg.max_tokens,
            auto: self.cfg.auto_spans,
            mentions: &mentions,
            minor_weight: self.cfg.minor_name_weight as f32,
        };
        let mut rows = Vec::with_capacity(docs.len() + due.len());
        for (i, d) in docs.iter().enumerate() {
            rows.push(Row::document(tok, d, &rules, Kind::Fresh, i)?);
        }
        for d in &due {
            // A document that was learnable when it arrived stays so; a reorder cannot shorten it.
            rows.push(Row::document(tok, d, &rules, Kind::Rehearsed, rows.len())?);
        }
        if self.cfg.strategy.mix_review {
            let picks: Vec<&String> = self
                .replay
                .choose_multiple(&mut self.rng, self.cfg.replay_per_batch)
                .collect();
            for text in picks {
                rows.extend(Row::replay(tok, text, rules.max_tokens)?);
            }
        }
        Batch::new(rows, self.model.arch.max_positions(), self.model.device())
    }

    /// Learns from one batch of documents and reports what changed.
    pub fn step(&mut self, docs: &[Doc]) -> Result<UpdateReport> {
        let start = Instant::now();
        self.undo = None;
        if docs.is_empty() {
            return Err(Error::Invalid("empty batch".into()));
        }
        // Each step draws from its own stream (seed, batch), so learning resumed from a checkpoint
        // samples exactly what learning that never stopped would have.
        self.rng = rand::rngs::StdRng::seed_from_u64(
            self.cfg.seed ^ self.batches.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut batch = self.batch(docs)?;
        // A batch with no span target cannot be localized; it still trains the current selection.
        let traced = self.needs_trace() && batch.has_spans();
        let trainable = self.trainable();
        let params = self.params_for(traced, &trainable)?;
        let losses = self.losses(&params, &mut batch)?;
        let (loss_before, span_value) = (losses.before, losses.span_value);
        let grads = if traced {
            Some(self.traced_gradients(&losses)?)
        } else if trainable.is_empty() {
            None
        } else {
            Some(losses.whole_gradients()?)
        };
        let outcome = self.apply(grads, loss_before)?;
        let loss_after = match outcome.applied && self.cfg.measure_after {
            true => Some(self.loss_of(&batch)?),
            false => None,
        };
        self.rehearsal.add(docs, self.batches);
        // Only the documents the window can hold are copied (none when it is off).
        let kept = docs.len().saturating_sub(self.cfg.trending_window);
        self.recent
            .extend(docs[kept..].iter().map(|d| d.text.clone()));
        self.keep_recent();
        let fresh = || batch.rows.iter().filter(|r| r.kind == Kind::Fresh);
        let report = UpdateReport {
            batch: self.batches,
            version: self.version,
            applied: outcome.applied,
            skipped: outcome.skipped,
            documents: batch.count(Kind::Fresh),
            replay: batch.count(Kind::Replay),
            rehearsed: batch.count(Kind::Rehearsed),
            tokens: batch.tokens,
            span_rules: fresh().map(|r| r.rule).collect(),
            span_fallbacks: batch.rows.iter().filter(|r| r.fell_back).count(),
            spans: fresh()
                .map(|r| r.span_texts(&self.model.tokenizer))
                .collect::<Result<_>>()?,
            loss_before,
            span_loss: span_value,
            loss_after,
            grad_norm: outcome.grad_norm,
            groups: outcome.groups,
            units: outcome.units,
            traced,
            seconds: start.elapsed().as_secs_f64(),
        };
        self.batches += 1;
        Ok(report)
    }

    /// One forward pass over the batch: the span and full losses, and the span loss's weight.
    fn losses(&self, params: &Params, batch: &mut Batch) -> Result<Losses> {
        let nll = batch.nll(self.model.arch.as_ref(), params)?;
        let span_mask = batch.span_mask(&nll.to_vec2()?, self.cfg.surprisal_fraction)?;
        let masked = (&nll * &batch.valid)?;
        let (span, _) = span_and_full_loss(&masked, &span_mask)?;
        let full = batch.mean(&masked)?;
        let before = f64::from(full.to_scalar::<f32>()?);
        let span_value = f64::from(span.to_scalar::<f32>()?);
        // The update objective: the full loss, plus the span loss weighted (new knowledge sits in
        // the spans; the rest of the text mostly restates what the model knows). A batch without
        // span targets has no span loss (0 / 0).
        let weight = if span_value.is_finite() {
            self.cfg.span_weight
        } else {
            0.0
        };
        Ok(Losses {
            span,
            full,
            before,
            span_value,
            weight,
        })
    }

    /// A traced step's gradients: the span and full backwards through every group, whose norms
    /// feed the selection (when due) and the units before the update uses them.
    fn traced_gradients(&mut self, losses: &Losses) -> Result<Gradients> {
        // Static group norms (a diagnostic set's) stay when a trace is only for the units.
        let refresh = self.norms_due();
        let model = Arc::clone(&self.model);
        let weight = losses.weight;
        // Norms are read off the variables: under LoRA `params` holds `W + BA`, whose gradient
        // candle does not keep.
        let variables = model.params(|_| true);
        // The span gradients are held through the full backward only when the units or the
        // update still need them; otherwise the linear layers keep only their norms.
        let norms = |g: &dyn GradNorms| {
            refresh
                .then(|| squared_norms(&model, &variables, g))
                .transpose()
        };
        let (span_sq, span_grads) = if weight > 0.0 || self.units.is_some() {
            let g = grads::backward(&losses.span)?;
            (norms(&g)?, Some(g))
        } else {
            (norms(&grads::backward_norms(&losses.span)?)?, None)
        };
        let full_grads = grads::backward(&losses.full)?;
        let ema = self.ema();
        if let (Some(units), Some(span_grads)) = (self.units.as_mut(), &span_grads) {
            units.observe(&model, span_grads, &full_grads, ema)?;
        }
        if let Some(span_sq) = span_sq {
            let full_sq = squared_norms(&model, &variables, &full_grads)?;
            self.observe(&span_sq.groups, &full_sq.groups);
        }
        Ok(Gradients::Parts {
            full: full_grads,
            span: span_grads.filter(|_| weight > 0.0),
            weight,
        })
    }

    /// Folds one batch's norms into the static or moving-average norms and re-selects when due.
    fn observe(&mut self, span: &BTreeMap<GroupId, f64>, full: &BTreeMap<GroupId, f64>) {
        let current: BTreeMap<GroupId, (f64, f64)> = self
            .model
            .groups()
            .into_iter()
            .map(|g| {
                (
                    g,
                    (
                        span.get(&g).copied().unwrap_or(0.0).sqrt(),
                        full.get(&g).copied().unwrap_or(0.0).sqrt(),
                    ),
                )
            })
            .collect();
        let ema = self.ema();
        let merged = match self.norms.take() {
            Some(prev) if ema > 0.0 => current
                .into_iter()
                .map(|(g, now)| (g, blend(ema, prev.get(&g).copied().unwrap_or(now), now)))
                .collect(),
            _ => current,
        };
        self.norms = Some(merged);
        self.reselect();
    }

    /// Weight of the past in the moving average of norms (0: each trace replaces them).
    fn ema(&self) -> f64 {
        match self.cfg.localization {
            Localization::Static => 0.0,
            Localization::PerBatch { ema, .. } => ema,
        }
    }

    /// Clips the gradient and takes an AdamW step on the trainable groups, unless there are none
    /// or the loss or gradient is not finite.
    fn apply(&mut self, grads: Option<Gradients>, loss_before: f64) -> Result<Outcome> {
        let trainable = self.trainable();
        let names = self.trainables(&trainable);
        let grads = match grads {
            Some(g) if !names.is_empty() => g,
            _ => return Ok(Outcome::skipped("no trainable groups".into(), 0.0)),
        };
        let mut update = Vec::with_capacity(names.len());
        let mut sq = 0f64;
        let mask = |key: &str| self.units.as_ref().and_then(|u| u.mask(key));
        for (key, var, g) in &names {
            if let Some(grad) = grads.of(var)? {
                let grad = units::mask_gradient(mask(key), grad)?;
                sq += crate::model::ops::squared_sum(&grad)?;
                update.push((key, var, g, grad));
            }
        }
        let grad_norm = sq.sqrt();
        if !loss_before.is_finite() || !grad_norm.is_finite() {
            return Ok(Outcome::skipped(
                format!(
                    "non-finite loss {loss_before} or gradient norm {grad_norm}; weights unchanged"
                ),
                grad_norm,
            ));
        }
        let clip = if self.cfg.clip > 0.0 && grad_norm > self.cfg.clip {
            self.cfg.clip / grad_norm
        } else {
            1.0
        };
        let warm = if self.cfg.warmup > 0 {
            ((self.applied + 1) as f64 / self.cfg.warmup as f64).min(1.0)
        } else {
            1.0
        };
        let mut undo = Undo::default();
        for (key, var, g, grad) in update {
            if self.revertible {
                self.opt.save(key, var, &mut undo)?;
            }
            let grad = if clip < 1.0 { (grad * clip)? } else { grad };
            let lr = self.cfg.lr * warm * trainable[g];
            units::confine(var, mask(key), || self.opt.update(key, var, &grad, lr))?;
        }
        self.applied += 1;
        self.version += 1;
        self.opt.end_step();
        self.undo = self.revertible.then_some(undo);
        let rel: BTreeMap<GroupId, f64> = self
            .stats()
            .into_iter()
            .map(|s| (s.id(), s.relative))
            .collect();
        Ok(Outcome {
            applied: true,
            skipped: None,
            grad_norm,
            units: self.units.as_ref().map(|u| u.count(trainable.keys())),
            groups: trainable
                .iter()
                .map(|(&g, &lr_scale)| UpdatedGroup {
                    layer: g.layer,
                    module: g.module,
                    relative: rel.get(&g).copied(),
                    lr_scale,
                })
                .collect(),
        })
    }

    /// Mean NLL of the batch under the weights as they now serve.
    fn loss_of(&self, batch: &Batch) -> Result<f64> {
        let nll = batch.nll(self.model.arch.as_ref(), &self.current_params()?)?;
        let nll = (nll * &batch.valid)?;
        Ok(f64::from(batch.mean(&nll)?.to_scalar::<f32>()?))
    }
}

/// One forward pass's losses, with their graphs for the backward passes.
struct Losses {
    span: Tensor,
    full: Tensor,
    /// The full loss's value.
    before: f64,
    /// The span loss's value; not finite for a batch without span targets.
    span_value: f64,
    /// The span loss's weight in the update objective.
    weight: f64,
}

impl Losses {
    /// An untraced step's gradients: one backward of the update objective. Taking the losses
    /// frees the forward graph before the update runs.
    fn whole_gradients(self) -> Result<Gradients> {
        let objective = if self.weight > 0.0 {
            (self.full + (self.span * self.weight)?)?
        } else {
            self.full
        };
        Ok(Gradients::Whole(grads::backward(&objective)?))
    }
}

/// The gradient an update follows.
enum Gradients {
    /// Of the update objective itself.
    Whole(GradStore),
    /// From a trace step's two backward passes: `full + weight * span`.
    Parts {
        full: GradStore,
        span: Option<GradStore>,
        weight: f64,
    },
}

impl Gradients {
    /// The gradient of one variable, if it received one.
    fn of(&self, var: &Var) -> Result<Option<Tensor>> {
        let t = var.as_tensor();
        Ok(match self {
            Gradients::Whole(g) => g.get(t).cloned(),
            Gradients::Parts { full, span, weight } => {
                match (full.get(t), span.as_ref().and_then(|s| s.get(t))) {
                    (Some(f), Some(s)) => Some((f + (s * *weight)?)?),
                    (f, _) => f.cloned(),
                }
            }
        })
    }
}

/// What [`Learner::apply`] did.
struct Outcome {
    applied: bool,
    skipped: Option<String>,
    grad_norm: f64,
    groups: Vec<UpdatedGroup>,
    units: Option<(usize, usize)>,
}

impl Outcome {
    fn skipped(why: String, grad_norm: f64) -> Self {
        Outcome {
            applied: false,
            skipped: Some(why),
            grad_norm,
            groups: Vec::new(),
            units: None,
        }
    }
}

/// `past` and `now` `(span, full)` norms blended with weight `ema` on the past.
pub(super) fn blend(ema: f64, past: (f64, f64), now: (f64, f64)) -> (f64, f64) {
    (
        ema * past.0 + (1.0 - ema) * now.0,
        ema * past.1 + (1.0 - ema) * now.1,
    )
}

/// Adapters for every weight matrix of every layer group: `A` uniform in +-1/sqrt(in) (as PEFT's
/// Kaiming init), `B` zero, so training starts from the unchanged model.
fn adapters_for(
    model: &Model,
    cfg: &LearnConfig,
    rng: &mut rand::rngs::StdRng,
) -> Result<BTreeMap<String, Adapter>> {
    let r = cfg.lora_rank.max(1);
    let mut out = BTreeMap::new();
    for (name, var) in &model.vars {
        let (Some(ParamKind::Group(group)), &[rows, cols]) = (model.arch.kind_of(name), var.dims())
        else {
            continue;
        };
        let bound = 1.0 / (cols as f32).sqrt();
        let a: Vec<f32> = (0..r * cols)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, cols), var.device())?)?;
        let b = Var::zeros((rows, r), candle_core::DType::F32, var.device())?;
        out.insert(
            name.clone(),
            Adapter {
                a,
                b,
                scale: cfg.lora_alpha / r as f64,
                group,
            },
        );
    }
    Ok(out)
}
