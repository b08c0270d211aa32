//! The paper's measurement: per-group gradient norms of the span loss and of the full loss.
//!
//! For one text, the span loss is the mean next-token NLL over targets whose token overlaps a salient
//! span, the full loss the mean over all targets; both gradients come from one shared forward pass.
//! Over texts, `span_norm` and `full_norm` are means of per-text norms and `relative` their ratio.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::grads::{self, GradNorms};
use crate::model::{GroupId, Model, Module, ParamKind, Params};
use crate::spans::{span_targets, SpanText};

/// A text ready for the model: token ids and which targets are span targets.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Token ids, no special tokens.
    pub ids: Vec<u32>,
    /// `targets[j - 1]` is true when target `j` is a span token.
    pub targets: Vec<bool>,
}

/// Tokenizes texts and marks span targets, rejecting texts the measurement cannot use.
pub fn prepare(model: &Model, source_name: &str, texts: &[SpanText]) -> Result<Vec<Prepared>> {
    texts
        .iter()
        .map(|t| {
            let err = |field: &str, reason: String| Error::Input {
                source_name: source_name.to_string(),
                line: t.line,
                field: field.into(),
                reason,
            };
            let enc = model.tokenizer.encode(&t.text)?;
            if enc.ids.len() < 2 {
                return Err(err("text", format!("{} token(s); at least 2 are needed", enc.ids.len())));
            }
            if let Some(max) = model.arch.max_positions() {
                if enc.ids.len() > max {
                    return Err(err("text", format!("{} tokens exceed the model's {max} positions", enc.ids.len())));
                }
            }
            let targets = span_targets(&enc, &t.spans);
            if !targets.iter().any(|&b| b) {
                return Err(err("spans", "no target token overlaps a salient span (a span on the first token alone has no target)".into()));
            }
            Ok(Prepared { ids: enc.ids, targets })
        })
        .collect()
}

/// Mean span and full losses `(span, full)` of one forward pass over a batch of equal-length rows.
/// `nll` is `(b, t - 1)`; `span_mask` holds 1.0 on span targets.
pub fn span_and_full_loss(
    nll: &Tensor,
    span_mask: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let full = nll.mean_all()?;
    let count = span_mask.sum_all()?.to_scalar::<f32>()?;
    let span = ((nll * span_mask)?.sum_all()? / f64::from(count))?;
    Ok((span, full))
}

/// Squared gradient norm of every parameter of the model (0 where the gradient is absent).
pub fn param_squared_norms(
    model: &Model,
    params: &Params,
    grads: &(impl GradNorms + ?Sized),
) -> Result<BTreeMap<String, f64>> {
    model
        .vars
        .keys()
        .map(|name| Ok((name.clone(), grads.squared_norm(params.get(name)?)?)))
        .collect()
}

/// Squared gradient norms per layer group and per other role, for every tracked parameter.
pub fn squared_norms(
    model: &Model,
    params: &Params,
    grads: &(impl GradNorms + ?Sized),
) -> Result<SquaredNorms> {
    let mut out = SquaredNorms::default();
    for (name, sq) in param_squared_norms(model, params, grads)? {
        match model.arch.kind_of(&name) {
            Some(ParamKind::Group(g)) => *out.groups.entry(g).or_default() += sq,
            Some(kind) => *out.other.entry(role_name(kind)).or_default() += sq,
            None => {}
        }
    }
    Ok(out)
}

fn role_name(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Embedding => "embedding",
        ParamKind::Norm => "norm",
        ParamKind::Head => "head",
        ParamKind::Group(_) => "group",
    }
}

/// Sums of squared gradient entries, keyed by layer group and by other role.
#[derive(Debug, Default, Clone)]
pub struct SquaredNorms {
    /// Per layer group.
    pub groups: BTreeMap<GroupId, f64>,
    /// Embeddings, norms and head, which never count as layer groups.
    pub other: BTreeMap<&'static str, f64>,
}

/// Span and full gradient norms of one unit (a layer group or another role).
#[derive(Debug, Clone, Serialize)]
pub struct GroupStat {
    /// Layer index.
    pub layer: usize,
    /// `attn` or `mlp`.
    pub module: Module,
    /// Mean over texts of the span-loss gradient norm.
    pub span_norm: f64,
    /// Mean over texts of the full-loss gradient norm.
    pub full_norm: f64,
    /// `span_norm / full_norm`.
    pub relative: f64,
}

impl GroupStat {
    /// The group this statistic belongs to.
    pub fn id(&self) -> GroupId {
        GroupId {
            layer: self.layer,
            module: self.module,
        }
    }
}

/// Norms of parameters outside the layer groups, reported beside them.
#[derive(Debug, Clone, Serialize)]
pub struct OtherStat {
    /// `embedding`, `norm` or `head`.
    pub name: &'static str,
    /// Mean span-loss gradient norm.
    pub span_norm: f64,
    /// Mean full-loss gradient norm.
    pub full_norm: f64,
    /// Their ratio.
    pub relative: f64,
}

/// Losses and token counts of one traced text.
#[derive(Debug, Clone, Serialize)]
pub struct TextStat {
    /// Number of tokens.
    pub tokens: usize,
    /// Number of span targets.
    pub span_targets: usize,
    /// Mean NLL over span targets.
    pub span_loss: f64,
    /// Mean NLL over all targets.
    pub full_loss: f64,
}

/// The result of tracing a set of texts.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// Number of texts.
    pub texts: usize,
    /// Per layer group, layer ascending, attention before MLP.
    pub groups: Vec<GroupStat>,
    /// Embeddings, norms and head.
    pub other: Vec<OtherStat>,
    /// Per text losses.
    pub per_text: Vec<TextStat>,
}

/// One text's measurement: losses and the squared norms of both gradients.
pub struct TextTrace {
    /// Losses and counts.
    pub stat: TextStat,
    /// Squared norms of the span-loss gradient.
    pub span: SquaredNorms,
    /// Squared norms of the full-loss gradient.
    pub full: SquaredNorms,
}

/// Traces one text: one forward, the span backward, the full backward, each backward keeping
/// only the norms of the linear layers', the head's and the embedding's weight gradients.
pub fn trace_text(model: &Model, params: &Params, text: &Prepared) -> Result<TextTrace> {
    let dev = model.device();
    let n = text.ids.len();
    let ids = Tensor::from_vec(text.ids.clone(), (1, n), dev)?;
    let nll = model.arch.next_token_nll(params, &ids)?;
    let mask: Vec<f32> = text
        .targets
        .iter()
        .map(|&b| f32::from(u8::from(b)))
        .collect();
    let mask = Tensor::from_vec(mask, (1, n - 1), dev)?;
    let (span, full) = span_and_full_loss(&nll, &mask)?;
    let span_grads = grads::backward_norms(&span)?;
    let span_sq = squared_norms(model, params, &span_grads)?;
    drop(span_grads);
    let full_grads = grads::backward_norms(&full)?;
    let full_sq = squared_norms(model, params, &full_grads)?;
    Ok(TextTrace {
        stat: TextStat {
            tokens: n,
            span_targets: text.targets.iter().filter(|&&b| b).count(),
            span_loss: f64::from(span.to_scalar::<f32>()?),
            full_loss: f64::from(full.to_scalar::<f32>()?),
        },
        span: span_sq,
        full: full_sq,
    })
}

/// Traces every text with all parameters tracked and aggregates the norms.
pub fn trace(model: &Model, texts: &[Prepared]) -> Result<Trace> {
    if texts.is_empty() {
        return Err(Error::Invalid("nothing to trace: no texts".into()));
    }
    let params = model.params(|_| true);
    let mut per_text = Vec::with_capacity(texts.len());
    let mut groups: BTreeMap<GroupId, (f64, f64)> = BTreeMap::new();
    let mut other: BTreeMap<&'static str, (f64, f64)> = BTreeMap::new();
    for text in texts {
        let tt = trace_text(model, &params, text)?;
        for g in model.groups() {
            let e = groups.entry(g).or_default();
            e.0 += tt.span.groups.get(&g).copied().unwrap_or(0.0).sqrt();
            e.1 += tt.full.groups.get(&g).copied().unwrap_or(0.0).sqrt();
        }
        for (name, sq) in &tt.full.other {
            let e = other.entry(name).or_default();
            e.0 += tt.span.other.get(name).copied().unwrap_or(0.0).sqrt();
            e.1 += sq.sqrt();
        }
        per_text.push(tt.stat);
    }
    let k = texts.len() as f64;
    let ratio = |s: f64, f: f64| if f > 0.0 { s / f } else { 0.0 };
    Ok(Trace {
        texts: texts.len(),
        groups: groups
            .into_iter()
            .map(|(g, (s, f))| GroupStat {
                layer: g.layer,
                module: g.module,
                span_norm: s / k,
                full_norm: f / k,
                relative: ratio(s, f),
            })
            .collect(),
        other: other
            .into_iter()
            .map(|(name, (s, f))| OtherStat {
                name,
                span_norm: s / k,
                full_norm: f / k,
                relative: ratio(s, f),
            })
            .collect(),
        per_text,
    })
}
