//! Scoring a model on a drift set, and the metrics that compare a trained model with its start.

use candle_core::Tensor;
use serde::Serialize;

use super::data::{DriftSet, UpdateProbe};
use crate::error::Result;
use crate::model::{on_compute_threads, Model, Params};
use crate::spans::{find_all, span_targets};

/// Sequences scored per forward pass.
const CHUNK: usize = 16;

/// Negative log-likelihood of each target `j >= 1` of each sequence, from graph-free forwards.
pub fn target_nll(model: &Model, params: &Params, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    target_nll_from(model, params, seqs, 0)
}

/// [`target_nll`] for the targets `j >= 1 + from` only (each sequence longer than `from + 1`
/// tokens): the positions before them skip the vocabulary projection.
pub fn target_nll_from(
    model: &Model,
    params: &Params,
    seqs: &[Vec<u32>],
    from: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(CHUNK) {
        let t = chunk.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![0u32; chunk.len() * t];
        for (i, s) in chunk.iter().enumerate() {
            ids[i * t..i * t + s.len()].copy_from_slice(s);
        }
        let ids = Tensor::from_vec(ids, (chunk.len(), t), model.device())?;
        let nll: Vec<Vec<f32>> = on_compute_threads(|| {
            model
                .arch
                .next_token_nll_from(params, &ids, from)?
                .to_vec2()
        })?;
        out.extend(
            chunk
                .iter()
                .zip(nll)
                .map(|(s, row)| row[..s.len() - 1 - from].to_vec()),
        );
    }
    Ok(out)
}

/// Sum log-probability and token count of each `answer` given its `prompt`.
pub fn answer_logprobs(model: &Model, pairs: &[(&str, &str)]) -> Result<Vec<(f64, usize)>> {
    let mut seqs = Vec::with_capacity(pairs.len());
    let mut lens = Vec::with_capacity(pairs.len());
    for (prompt, answer) in pairs {
        let p = model.tokenizer.encode(prompt)?.ids;
        let a = model.tokenizer.encode(answer)?.ids;
        lens.push((p.len(), a.len()));
        seqs.push([p, a].concat());
    }
    // Every prompt's own targets are skipped up to the shortest prompt's.
    let from = lens
        .iter()
        .map(|&(p, _)| p)
        .min()
        .unwrap_or(0)
        .saturating_sub(1);
    let nll = target_nll_from(model, &model.params(|_| false), &seqs, from)?;
    Ok(nll
        .iter()
        .zip(lens)
        .map(|(row, (p, a))| {
            (
                -row[p - 1 - from..p - 1 - from + a]
                    .iter()
                    .map(|&v| f64::from(v))
                    .sum::<f64>(),
                a,
            )
        })
        .collect())
}

/// Per-probe scores of one model state.
#[derive(Debug, Clone)]
pub struct Scores {
    /// For each update probe: (new logprob, new tokens, old logprob, held out).
    pub updates: Vec<(f64, usize, f64, bool)>,
    /// For each stable probe: (gold logprob, foil logprob).
    pub stable: Vec<(f64, f64)>,
    /// Perplexity of the general text.
    pub general_ppl: f64,
    /// Perplexity of the salient-span tokens of the update documents (ECBD-style).
    pub entity_span_ppl: f64,
}

fn ppl(nll: impl Iterator<Item = f32>) -> f64 {
    let (sum, n) = nll.fold((0f64, 0usize), |(s, n), v| (s + f64::from(v), n + 1));
    (sum / n.max(1) as f64).exp()
}

/// Scores every probe and perplexity of `set` under the model's current weights.
pub fn score(model: &Model, set: &DriftSet, max_tokens: usize) -> Result<Scores> {
    let probes: Vec<(&UpdateProbe, bool)> = set
        .updates
        .iter()
        .flat_map(|u| u.probes.iter().map(move |p| (p, u.id.starts_with("test-"))))
        .collect();
    let new = logprobs(model, &probes, |(p, _)| (&p.prompt, &p.new))?;
    let old = logprobs(model, &probes, |(p, _)| (&p.prompt, &p.old))?;
    let gold = logprobs(model, &set.stable, |p| (&p.prompt, &p.gold))?;
    let foil = logprobs(model, &set.stable, |p| (&p.prompt, &p.foil))?;
    Ok(Scores {
        updates: new
            .iter()
            .zip(&old)
            .zip(&probes)
            .map(|(((n, k), (o, _)), (_, held))| (*n, *k, *o, *held))
            .collect(),
        stable: gold
            .iter()
            .zip(&foil)
            .map(|((g, _), (f, _))| (*g, *f))
            .collect(),
        general_ppl: general_ppl(model, &set.general, max_tokens)?,
        entity_span_ppl: entity_span_ppl(model, set, max_tokens)?,
    })
}

/// [`answer_logprobs`] of the (prompt, answer) pair `pair` picks from each item.
fn logprobs<T>(
    model: &Model,
    items: &[T],
    pair: impl Fn(&T) -> (&String, &String),
) -> Result<Vec<(f64, usize)>> {
    let pairs: Vec<(&str, &str)> = items
        .iter()
        .map(|item| {
            let (prompt, answer) = pair(item);
            (prompt.as_str(), answer.as_str())
        })
        .collect();
    answer_logprobs(model, &pairs)
}

/// Perplexity of the general texts, each cut to `max_tokens`; texts under two tokens predict
/// nothing and are left out.
fn general_ppl(model: &Model, general: &[String], max_tokens: usize) -> Result<f64> {
    let truncate = |mut v: Vec<u32>| {
        v.truncate(max_tokens);
        v
    };
    let general: Vec<Vec<u32>> = general
        .iter()
        .map(|t| model.tokenizer.encode(t).map(|e| truncate(e.ids)))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|s| s.len() >= 2)
        .collect();
    Ok(ppl(target_nll(model, &model.params(|_| false), &general)?
        .into_iter()
        .flatten()))
}

/// Perplexity of the salient-span tokens of the update documents, each cut to `max_tokens`.
fn entity_span_ppl(model: &Model, set: &DriftSet, max_tokens: usize) -> Result<f64> {
    let mut docs = Vec::new();
    let mut masks = Vec::new();
    for u in &set.updates {
        for d in &u.docs {
            let mut enc = model.tokenizer.encode(d)?;
            enc.ids.truncate(max_tokens);
            enc.offsets.truncate(max_tokens);
            let spans: Vec<(usize, usize)> =
                u.salient.iter().flat_map(|s| find_all(d, s)).collect();
            masks.push(span_targets(&enc, &spans));
            docs.push(enc.ids);
        }
    }
    let doc_nll = target_nll(model, &model.params(|_| false), &docs)?;
    Ok(ppl(doc_nll.iter().zip(&masks).flat_map(|(row, m)| {
        row.iter().zip(m).filter(|(_, &on)| on).map(|(&v, _)| v)
    })))
}

/// The metrics of one model state, some relative to the starting state.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    /// Share of update probes where the new answer outscores the outdated one.
    pub new_pref_accuracy: f64,
    /// The same on held-out (`test-`) facts only.
    pub new_pref_accuracy_heldout: f64,
    /// The same on development (`dev-`) facts only.
    pub new_pref_accuracy_dev: f64,
    /// 95% Wilson interval of the development share (probes counted as independent trials).
    pub new_pref_ci_dev: (f64, f64),
    /// 95% Wilson interval of the held-out share.
    pub new_pref_ci_heldout: (f64, f64),
    /// Mean log-probability of the new answers.
    pub new_answer_logprob: f64,
    /// Perplexity of the new answers' tokens.
    pub new_answer_ppl: f64,
    /// Perplexity of salient spans in the update documents (ECBD-style).
    pub entity_span_ppl: f64,
    /// Share of stable probes where gold outscores foil.
    pub stable_pref_accuracy: f64,
    /// Mean change of the gold answers' log-probability against the start.
    pub stable_logprob_change: f64,
    /// General-text perplexity.
    pub general_ppl: f64,
    /// General-text perplexity after / before.
    pub general_ppl_ratio: f64,
    /// Forgotten / (updated + acquired): stable probes right before and wrong after, over update
    /// probes wrong before and right after; null when nothing was learned.
    pub fuar: Option<f64>,
}

fn share(n: usize, d: usize) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

/// The 95% Wilson score interval of `k` successes in `n` trials (`(0, 1)` for none).
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n) = (1.959964, n as f64);
    let p = k as f64 / n;
    let centre = p + z * z / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    let d = 1.0 + z * z / n;
    ((centre - spread) / d, (centre + spread) / d)
}

/// Metrics of `now` against `start` (pass the same scores twice for the starting model).
pub fn compare(start: &Scores, now: &Scores) -> Metrics {
    let right = |(n, _, o, _): &(f64, usize, f64, bool)| n > o;
    let held: Vec<_> = now.updates.iter().filter(|u| u.3).collect();
    let dev: Vec<_> = now.updates.iter().filter(|u| !u.3).collect();
    let wins = |v: &[&(f64, usize, f64, bool)]| v.iter().filter(|u| right(u)).count();
    let learned = start
        .updates
        .iter()
        .zip(&now.updates)
        .filter(|(a, b)| !right(a) && right(b))
        .count();
    let forgotten = start
        .stable
        .iter()
        .zip(&now.stable)
        .filter(|(a, b)| a.0 > a.1 && b.0 <= b.1)
        .count();
    let new_tokens: usize = now.updates.iter().map(|u| u.1).sum();
    Metrics {
        new_pref_accuracy: share(
            now.updates.iter().filter(|u| right(u)).count(),
            now.updates.len(),
        ),
        new_pref_accuracy_heldout: share(wins(&held), held.len()),
        new_pref_accuracy_dev: share(wins(&dev), dev.len()),
        new_pref_ci_dev: wilson(wins(&dev), dev.len()),
        new_pref_ci_heldout: wilson(wins(&held), held.len()),
        new_answer_logprob: now.updates.iter().map(|u| u.0).sum::<f64>()
            / now.updates.len().max(1) as f64,
        new_answer_ppl: (-now.updates.iter().map(|u| u.0).sum::<f64>() / new_tokens.max(1) as f64)
            .exp(),
        entity_span_ppl: now.entity_span_ppl,
        stable_pref_accuracy: share(
            now.stable.iter().filter(|s| s.0 > s.1).count(),
            now.stable.len(),
        ),
        stable_logprob_change: start
            .stable
            .iter()
            .zip(&now.stable)
            .map(|(a, b)| b.0 - a.0)
            .sum::<f64>()
            / now.stable.len().max(1) as f64,
        general_ppl: now.general_ppl,
        general_ppl_ratio: now.general_ppl / start.general_ppl,
        fuar: (learned > 0).then(|| forgotten as f64 / learned as f64),
    }
}
