//! One learning step: tokenize, find spans, one forward, span and full backward where tracing is
//! needed, select groups, clip, AdamW on the trainable groups only, report.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::optimizer::{AdamW, Moments};
use super::strategy::{LearnConfig, Localization, Selection};
use crate::error::{Error, Result};
use crate::model::{ops, GroupId, Model, Module, ParamKind, Params};
use crate::select::{self, Rule};
use crate::spans::{entity_spans, span_targets, surprisal_targets, SpanRule};
use crate::trace::{span_and_full_loss, squared_norms, GroupStat};

/// A document to learn from, with salient spans as character ranges when the client gave them.
#[derive(Debug, Clone, PartialEq)]
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
    /// Tokens in the batch.
    pub tokens: usize,
    /// How each document's spans were found.
    pub span_rules: Vec<SpanRule>,
    /// Mean NLL over all targets before the update.
    pub loss_before: f64,
    /// Mean NLL over span targets before the update.
    pub span_loss: f64,
    /// Mean NLL over all targets after the update (same batch).
    pub loss_after: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Groups updated.
    pub groups: Vec<UpdatedGroup>,
    /// Whether this step measured norms (a trace step).
    pub traced: bool,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
}

/// A tokenized row of the batch.
struct Row {
    ids: Vec<u32>,
    /// Span targets, or `None` for the surprisal rule to fill from this step's losses.
    targets: Option<Vec<bool>>,
    rule: Option<SpanRule>,
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
        let opt = AdamW::new(cfg.betas, cfg.eps, cfg.weight_decay);
        Ok(Learner {
            model,
            cfg,
            opt,
            replay,
            rng,
            batches: 0,
            applied: 0,
            version,
            norms: None,
            selection: None,
            adapters,
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

    /// A copy of the state that learning resumes from (LoRA adapters are not part of it: their
    /// product is in the served weights, and new adapters start from there).
    pub fn export_state(&self) -> Result<LearnerState> {
        Ok(LearnerState {
            moments: self.opt.export()?,
            batches: self.batches,
            applied: self.applied,
            norms: self.norms.clone(),
            selection: self.selection.clone(),
        })
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
        self.opt.import(state.moments);
        self.batches = state.batches;
        self.applied = state.applied;
        self.norms = state.norms;
        self.selection = state.selection;
        // Replay sampling goes on from a stream that depends on the batches seen, not the
        // generator's lost position.
        self.rng = rand::rngs::StdRng::seed_from_u64(self.cfg.seed.wrapping_add(self.batches));
        Ok(())
    }

    /// Takes back the version number and count of the update just applied, whose weights the
    /// caller has put back (the optimizer's moments keep what its gradient taught them).
    pub fn undo_last_update(&mut self) {
        self.version = self.version.saturating_sub(1);
        self.applied = self.applied.saturating_sub(1);
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
        self.model
            .vars
            .iter()
            .filter_map(|(n, v)| match self.model.arch.kind_of(n) {
                Some(ParamKind::Group(g)) if trainable.contains_key(&g) => {
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

    fn needs_trace(&self) -> bool {
        self.cfg.strategy.needs_norms()
            && (self.norms.is_none()
                || matches!(self.cfg.localization, Localization::PerBatch { .. }))
    }

    fn rows(&mut self, docs: &[Doc]) -> Result<(Vec<Row>, usize)> {
        let tok = &self.model.tokenizer;
        let mut rows = Vec::with_capacity(docs.len());
        for (i, d) in docs.iter().enumerate() {
            let mut enc = tok.encode(&d.text)?;
            enc.ids.truncate(self.cfg.max_tokens);
            enc.offsets.truncate(self.cfg.max_tokens);
            if enc.ids.len() < 2 {
                return Err(Error::Input {
                    source_name: "batch".into(),
                    line: i + 1,
                    field: "text".into(),
                    reason: format!("{} token(s); at least 2 are needed", enc.ids.len()),
                });
            }
            let (targets, rule) = match &d.spans {
                Some(s) => (Some(span_targets(&enc, s)), SpanRule::Given),
                None => {
                    let t = span_targets(&enc, &entity_spans(&d.text));
                    if t.iter().any(|&b| b) {
                        (Some(t), SpanRule::Entity)
                    } else {
                        (None, SpanRule::Surprisal)
                    }
                }
            };
            rows.push(Row {
                ids: enc.ids,
                targets,
                rule: Some(rule),
            });
        }
        let mut replay = 0;
        if self.cfg.strategy.mix_review {
            let picks: Vec<String> = self
                .replay
                .choose_multiple(&mut self.rng, self.cfg.replay_per_batch)
                .cloned()
                .collect();
            for text in picks {
                let mut ids = tok.encode(&text)?.ids;
                ids.truncate(self.cfg.max_tokens);
                if ids.len() >= 2 {
                    let n = ids.len() - 1;
                    rows.push(Row {
                        ids,
                        targets: Some(vec![false; n]),
                        rule: None,
                    });
                    replay += 1;
                }
            }
        }
        Ok((rows, replay))
    }

    /// Learns from one batch of documents and reports what changed.
    pub fn step(&mut self, docs: &[Doc]) -> Result<UpdateReport> {
        let start = Instant::now();
        if docs.is_empty() {
            return Err(Error::Invalid("empty batch".into()));
        }
        let (mut rows, replay) = self.rows(docs)?;
        let dev = self.model.device().clone();
        let (b, t) = (
            rows.len(),
            rows.iter().map(|r| r.ids.len()).max().unwrap_or(0),
        );
        let mut ids = vec![0u32; b * t];
        let mut valid = vec![0f32; b * (t - 1)];
        for (i, r) in rows.iter().enumerate() {
            ids[i * t..i * t + r.ids.len()].copy_from_slice(&r.ids);
            valid[i * (t - 1)..i * (t - 1) + r.ids.len() - 1].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (b, t), &dev)?;
        let valid = Tensor::from_vec(valid, (b, t - 1), &dev)?;
        let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();

        let has_spans = rows
            .iter()
            .any(|r| r.targets.as_ref().is_none_or(|t| t.iter().any(|&b| b)));
        // A batch with no span target cannot be localized; it still trains the current selection.
        let traced = self.needs_trace() && has_spans;
        let trainable = self.trainable();
        let model = Arc::clone(&self.model);
        let params = self.params_for(traced, &trainable)?;

        let logits = model.arch.forward(&params, &ids)?;
        let nll = ops::next_token_nll(&logits, &ids)?;
        let nll_rows: Vec<Vec<f32>> = nll.to_vec2()?;
        let mut span = vec![0f32; b * (t - 1)];
        for (i, r) in rows.iter_mut().enumerate() {
            let n = r.ids.len() - 1;
            let targets = r.targets.get_or_insert_with(|| {
                surprisal_targets(&nll_rows[i][..n], self.cfg.surprisal_fraction)
            });
            for (j, &on) in targets.iter().enumerate() {
                span[i * (t - 1) + j] = f32::from(u8::from(on));
            }
        }
        let span = Tensor::from_vec(span, (b, t - 1), &dev)?;
        let masked = (&nll * &valid)?;
        let (span_loss, _) = span_and_full_loss(&masked, &span)?;
        let full = (masked.sum_all()? / valid.sum_all()?.to_scalar::<f32>()? as f64)?;
        let loss_before = f64::from(full.to_scalar::<f32>()?);
        let span_value = f64::from(span_loss.to_scalar::<f32>()?);

        let grads = if traced {
            // Norms are read off the variables: under LoRA `params` holds `W + BA`, whose gradient
            // candle does not keep.
            let variables = model.params(|_| true);
            let span_grads = span_loss.backward()?;
            let span_sq = squared_norms(&model, &variables, &span_grads)?;
            drop(span_grads);
            let full_grads = full.backward()?;
            let full_sq = squared_norms(&model, &variables, &full_grads)?;
            self.observe(&span_sq.groups, &full_sq.groups);
            Some(full_grads)
        } else if trainable.is_empty() {
            None
        } else {
            Some(full.backward()?)
        };
        self.finish(
            start,
            rows,
            replay,
            tokens,
            loss_before,
            span_value,
            &ids,
            &valid,
            grads,
            traced,
        )
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
        let (ema, every) = match self.cfg.localization {
            Localization::Static => (0.0, usize::MAX),
            Localization::PerBatch {
                ema,
                reselect_every,
            } => (ema, reselect_every.max(1)),
        };
        let merged = match self.norms.take() {
            Some(prev) if ema > 0.0 => current
                .into_iter()
                .map(|(g, (s, f))| {
                    let (ps, pf) = prev.get(&g).copied().unwrap_or((s, f));
                    (g, (ema * ps + (1.0 - ema) * s, ema * pf + (1.0 - ema) * f))
                })
                .collect(),
            _ => current,
        };
        self.norms = Some(merged);
        if self.selection.is_none() || self.batches.is_multiple_of(every as u64) {
            self.reselect();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        start: Instant,
        rows: Vec<Row>,
        replay: usize,
        tokens: usize,
        loss_before: f64,
        span_loss: f64,
        ids: &Tensor,
        valid: &Tensor,
        grads: Option<GradStore>,
        traced: bool,
    ) -> Result<UpdateReport> {
        let trainable = self.trainable();
        let model = Arc::clone(&self.model);
        let names = self.trainables(&trainable);
        let mut skipped = None;
        let mut grad_norm = 0.0;
        let mut applied = false;
        match grads {
            None => skipped = Some("no trainable groups".to_string()),
            Some(_) if names.is_empty() => skipped = Some("no trainable groups".to_string()),
            Some(grads) => {
                let mut sq = 0f64;
                for (_, var, _) in &names {
                    if let Some(g) = grads.get(var.as_tensor()) {
                        sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
                    }
                }
                grad_norm = sq.sqrt();
                if !loss_before.is_finite() || !grad_norm.is_finite() {
                    skipped = Some(format!("non-finite loss {loss_before} or gradient norm {grad_norm}; weights unchanged"));
                } else {
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
                    for (key, var, g) in &names {
                        if let Some(grad) = grads.get(var.as_tensor()) {
                            let grad = if clip < 1.0 {
                                (grad * clip)?
                            } else {
                                grad.clone()
                            };
                            self.opt
                                .update(key, var, &grad, self.cfg.lr * warm * trainable[g])?;
                        }
                    }
                    applied = true;
                    self.applied += 1;
                    self.version += 1;
                }
            }
        }
        let loss_after = if applied {
            let logits = model.arch.forward(&self.current_params()?, ids)?;
            let nll = (ops::next_token_nll(&logits, ids)? * valid)?;
            f64::from(
                (nll.sum_all()? / valid.sum_all()?.to_scalar::<f32>()? as f64)?
                    .to_scalar::<f32>()?,
            )
        } else {
            loss_before
        };
        let rel: BTreeMap<GroupId, f64> = self
            .stats()
            .into_iter()
            .map(|s| (s.id(), s.relative))
            .collect();
        let updated: BTreeSet<GroupId> = if applied {
            trainable.keys().copied().collect()
        } else {
            BTreeSet::new()
        };
        let report = UpdateReport {
            batch: self.batches,
            version: self.version,
            applied,
            skipped,
            documents: rows.len() - replay,
            replay,
            tokens,
            span_rules: rows.iter().filter_map(|r| r.rule).collect(),
            loss_before,
            span_loss,
            loss_after,
            grad_norm,
            groups: updated
                .into_iter()
                .map(|g| UpdatedGroup {
                    layer: g.layer,
                    module: g.module,
                    relative: rel.get(&g).copied(),
                    lr_scale: trainable[&g],
                })
                .collect(),
            traced,
            seconds: start.elapsed().as_secs_f64(),
        };
        self.batches += 1;
        Ok(report)
    }
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
