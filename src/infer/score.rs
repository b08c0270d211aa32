//! Scoring known text on one snapshot: next-token losses, continuations' log-probabilities, and
//! each token's log-probability with the likeliest alternatives.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::model::on_compute_threads;
use crate::snapshot::Snapshot;

/// Negative log-likelihood of each target `j >= 1` of each sequence (each at least 2 tokens).
pub fn target_nll(snapshot: &Snapshot, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    targets_from(snapshot, seqs, 0)
}

/// Negative log-likelihood of each target `j >= 1 + from` of each sequence.
fn targets_from(snapshot: &Snapshot, seqs: &[Vec<u32>], from: usize) -> Result<Vec<Vec<f32>>> {
    if let Some(s) = seqs.iter().find(|s| s.len() < from + 2) {
        return Err(Error::Invalid(format!(
            "a sequence of {} token(s) has no target",
            s.len()
        )));
    }
    crate::eval::metrics::target_nll_from(snapshot.model(), snapshot.params(), seqs, from)
}

/// Summed log-probability of each continuation given `prompt` (at least one prompt token; a
/// continuation may not be empty). Only the continuations' positions go through the vocabulary
/// projection. A prompt is not computed once for all continuations: at a handful of rows a forward
/// pass costs what reading the weights costs, so two passes (prompt, then continuations) take
/// longer than one over every row.
pub fn logprobs(
    snapshot: &Snapshot,
    prompt: &[u32],
    continuations: &[Vec<u32>],
) -> Result<Vec<f64>> {
    if prompt.is_empty() || continuations.iter().any(Vec::is_empty) {
        return Err(Error::Invalid(
            "a prompt and every continuation need at least one token".into(),
        ));
    }
    let p = prompt.len();
    let seqs: Vec<Vec<u32>> = continuations.iter().map(|c| [prompt, c].concat()).collect();
    let nll = targets_from(snapshot, &seqs, p - 1)?;
    Ok(nll
        .iter()
        .zip(continuations)
        .map(|(row, c)| -row[..c.len()].iter().map(|&v| f64::from(v)).sum::<f64>())
        .collect())
}

/// The log-probability of each token `j >= 1` of `seq` given the tokens before it, with the
/// `top` most likely tokens at that position and their log-probabilities, most likely first.
/// The token's own value and the alternatives come from one log-softmax, so a token that is
/// the most likely one compares equal to the first alternative.
pub fn token_logprobs(snapshot: &Snapshot, seq: &[u32], top: usize) -> Result<Vec<TokenLogprob>> {
    let Some(targets) = seq.len().checked_sub(1).filter(|&n| n > 0) else {
        return Ok(Vec::new());
    };
    let device = snapshot.model().device();
    let ids = Tensor::from_slice(seq, (1, seq.len()), device)?;
    let logits = on_compute_threads(|| snapshot.model().arch.forward(snapshot.params(), &ids))?;
    let logp = candle_nn::ops::log_softmax(&logits.squeeze(0)?.narrow(0, 0, targets)?, D::Minus1)?;
    let next = Tensor::from_slice(&seq[1..], (targets, 1), device)?;
    let chosen: Vec<f32> = logp.gather(&next, 1)?.squeeze(1)?.to_vec1()?;
    let rows: Vec<Vec<f32>> = if top == 0 {
        vec![Vec::new(); targets]
    } else {
        logp.to_vec2()?
    };
    Ok(chosen
        .into_iter()
        .zip(rows)
        .map(|(logprob, row)| TokenLogprob {
            logprob,
            top: most_likely(&row, top),
        })
        .collect())
}

/// One position's log-probabilities: [`token_logprobs`].
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Log-probability of the token that is there.
    pub logprob: f32,
    /// The most likely tokens there and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The `k` largest entries of `row` as `(index, value)`, largest first.
fn most_likely(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    let k = k.min(all.len());
    if k < all.len() {
        // A partial selection: the vocabulary is tens of thousands of entries and k a handful.
        all.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1));
        all.truncate(k);
    }
    all.sort_by(|a, b| b.1.total_cmp(&a.1));
    all
}
