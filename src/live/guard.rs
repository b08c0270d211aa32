//! The forgetting guard: an update that raises the perplexity of a canary set of texts by more
//! than a configured ratio is undone before any query or reader sees it.

pub(crate) use crate::learn::history::Check;

use crate::infer;
use crate::model::Model;
use crate::snapshot::Snapshot;

use super::{Error, Result};

/// Canary texts and the largest perplexity ratio an update may cause.
#[derive(Debug, Clone)]
pub struct Guard {
    /// The canary texts.
    pub canaries: Vec<String>,
    /// Largest allowed `perplexity after / perplexity before` of one update.
    pub max_ratio: f64,
}

impl Guard {
    /// The canaries tokenized for `model`, once, at start; a canary of fewer than two tokens has
    /// no perplexity and is refused.
    pub(crate) fn prepare(&self, model: &Model) -> Result<Canaries> {
        let mut seqs = Vec::with_capacity(self.canaries.len());
        for (i, text) in self.canaries.iter().enumerate() {
            let ids = model.tokenizer.encode(text)?.ids;
            if ids.len() < 2 {
                return Err(Error::invalid(
                    format!("canary[{i}]"),
                    "needs at least two tokens",
                ));
            }
            seqs.push(ids);
        }
        Ok(Canaries {
            seqs,
            max_ratio: self.max_ratio,
        })
    }
}

/// The guard's canaries as token ids, ready to score every update.
pub(crate) struct Canaries {
    seqs: Vec<Vec<u32>>,
    /// Largest allowed `perplexity after / perplexity before` of one update.
    pub max_ratio: f64,
}

impl Canaries {
    /// Perplexity of the canaries under `snapshot`'s weights.
    pub fn perplexity(&self, snapshot: &Snapshot) -> Result<f64> {
        let nll = infer::target_nll(snapshot, &self.seqs)?;
        let (sum, n) = nll
            .iter()
            .flatten()
            .fold((0.0f64, 0usize), |(s, n), &x| (s + f64::from(x), n + 1));
        Ok((sum / n.max(1) as f64).exp())
    }
}
