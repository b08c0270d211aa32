//! A learning step's batch: tokenized documents with their span targets, packed into one tensor.

use candle_core::{Device, Tensor};

use super::engine::Doc;
use crate::error::{Error, Result};
use crate::model::packing::{Packing, Placement};
use crate::model::{Architecture, Params};
use crate::spans::{choose_targets, novel_targets, surprisal_targets, Mentions, Name, SpanRule};
use crate::tokenize::TextTokenizer;

/// What a row of the batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A document of the client's batch.
    Fresh,
    /// A recent document learned again.
    Rehearsed,
    /// General text mixed in against forgetting; it has no span targets.
    Replay,
}

/// A tokenized row.
pub struct Row {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Span targets, or `None` for the `surprisal` or `novel` rule to fill from this step's
    /// losses.
    pub targets: Option<Vec<bool>>,
    /// How the spans were found.
    pub rule: SpanRule,
    /// Whether given spans had no target token and an automatic rule stood in.
    pub fell_back: bool,
    /// Under `novel`, the names to choose from at the forward pass.
    pub names: Vec<Name>,
    /// Each target's weight in the full loss: 1, or [`RowRules::minor_weight`] on the names
    /// `trending` passed over.
    pub weights: Vec<f32>,
    /// Fresh, rehearsed or replay.
    pub kind: Kind,
}

/// How a step makes rows of documents.
pub struct RowRules<'a> {
    /// Tokens kept of each document.
    pub max_tokens: usize,
    /// The rule for documents sent without spans.
    pub auto: SpanRule,
    /// The step's word counts, for the `trending` rule.
    pub mentions: &'a Mentions,
    /// Weight in the full loss of the targets of the names `trending` passed over.
    pub minor_weight: f32,
}

impl Row {
    /// A document's row with its span targets chosen by [`choose_targets`] under `rules`;
    /// `index` numbers the document in errors.
    pub fn document(
        tok: &TextTokenizer,
        doc: &Doc,
        rules: &RowRules,
        kind: Kind,
        index: usize,
    ) -> Result<Row> {
        let mut enc = tok.encode(&doc.text)?;
        enc.ids.truncate(rules.max_tokens);
        enc.offsets.truncate(rules.max_tokens);
        if enc.ids.len() < 2 {
            return Err(Error::Input {
                source_name: "batch".into(),
                line: index + 1,
                field: "text".into(),
                reason: format!("{} token(s); at least 2 are needed", enc.ids.len()),
            });
        }
        let auto = (rules.auto, rules.mentions);
        let c = choose_targets(&enc, &doc.text, doc.spans.as_deref(), auto);
        let mut weights = vec![1.0; enc.ids.len() - 1];
        for (w, &minor) in weights.iter_mut().zip(&c.minor) {
            if minor {
                *w = rules.minor_weight;
            }
        }
        Ok(Row {
            ids: enc.ids,
            targets: c.targets,
            rule: c.rule,
            fell_back: c.fell_back,
            names: c.names,
            weights,
            kind,
        })
    }

    /// The text of each run of span targets, each distinct run once, in order (empty before the
    /// forward pass has chosen automatic targets).
    pub fn span_texts(&self, tok: &TextTokenizer) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        // Target `j` is token `j + 1`.
        let mut at = 1;
        for run in self
            .targets
            .as_deref()
            .unwrap_or_default()
            .chunk_by(|a, b| a == b)
        {
            if run[0] {
                let text = tok
                    .decode(&self.ids[at..at + run.len()])?
                    .trim()
                    .to_string();
                if !text.is_empty() && !out.contains(&text) {
                    out.push(text);
                }
            }
            at += run.len();
        }
        Ok(out)
    }

    /// A replay paragraph's row, or `None` when it is shorter than two tokens.
    pub fn replay(tok: &TextTokenizer, text: &str, max_tokens: usize) -> Result<Option<Row>> {
        let mut ids = tok.encode(text)?.ids;
        ids.truncate(max_tokens);
        Ok((ids.len() >= 2).then(|| Row {
            targets: Some(vec![false; ids.len() - 1]),
            weights: vec![1.0; ids.len() - 1],
            ids,
            rule: SpanRule::Given,
            fell_back: false,
            names: Vec::new(),
            kind: Kind::Replay,
        }))
    }
}

/// Tokens a packed row may hold. Attention stops at each document's beginning, so a longer row
/// costs nothing a padded one would not, and more room finds tighter layouts. A constant, not a
/// setting: `eval` and `serve` pack alike whatever their truncation length.
pub const ROW_TOKENS: usize = 512;

/// Documents packed into rows (see [`Packing`]): ids `(rows, len)` and the weights of real targets
/// `(rows, len - 1)`.
pub struct Batch {
    /// The documents' rows, fresh documents first.
    pub rows: Vec<Row>,
    /// Packed token ids.
    pub ids: Tensor,
    /// A real target's weight in the full loss (see [`Row::weights`]); 0 on padding and on the
    /// first token of a document packed after another.
    pub valid: Tensor,
    /// Tokens over all rows.
    pub tokens: usize,
    /// The sum of `valid`: what the full loss's mean divides by.
    targets: f64,
    /// Where each document's tokens sit, position by position.
    packing: Packing,
    /// Where each of `rows` begins.
    placements: Vec<Placement>,
}

impl Batch {
    /// Packs `rows` into tensors on `device`, in rows of at most [`ROW_TOKENS`] tokens (or the
    /// longest document's), fewer for a model with fewer learned `positions`.
    pub fn new(rows: Vec<Row>, positions: Option<usize>, device: &Device) -> Result<Batch> {
        let lengths: Vec<usize> = rows.iter().map(|r| r.ids.len()).collect();
        let capacity = ROW_TOKENS.min(positions.unwrap_or(usize::MAX));
        let (packing, placements) = Packing::pack(&lengths, capacity);
        let (b, t) = (packing.rows(), packing.len());
        let mut ids = vec![0u32; b * t];
        let mut valid = vec![0f32; b * t.saturating_sub(1)];
        for (r, p) in rows.iter().zip(&placements) {
            ids[p.row * t + p.offset..][..r.ids.len()].copy_from_slice(&r.ids);
            // Target `j` is token `j + 1`; a document's last token predicts nothing of its own.
            valid[p.row * (t - 1) + p.offset..][..r.weights.len()].copy_from_slice(&r.weights);
        }
        let targets = valid.iter().map(|&w| f64::from(w)).sum::<f64>();
        Ok(Batch {
            tokens: lengths.iter().sum(),
            targets: targets.max(f64::MIN_POSITIVE),
            ids: Tensor::from_vec(ids, (b, t), device)?,
            valid: Tensor::from_vec(valid, (b, t.saturating_sub(1)), device)?,
            rows,
            packing,
            placements,
        })
    }

    /// Per-target negative log-likelihoods `(rows, len - 1)` of the packed documents under
    /// `params`, each document's as it has them alone.
    pub fn nll(&self, arch: &dyn Architecture, params: &Params) -> Result<Tensor> {
        Ok(arch.next_token_nll_packed(params, &self.ids, &self.packing)?)
    }

    /// The weighted mean over the real targets of per-target losses `(b, t - 1)` already
    /// multiplied by `valid`.
    pub fn mean(&self, masked: &Tensor) -> Result<Tensor> {
        Ok((masked.sum_all()? / self.targets)?)
    }

    /// Rows of one kind.
    pub fn count(&self, kind: Kind) -> usize {
        self.rows.iter().filter(|r| r.kind == kind).count()
    }

    /// Whether any row may have a span target (a surprisal row always gets some).
    pub fn has_spans(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.targets.as_ref().is_none_or(|t| t.iter().any(|&b| b)))
    }

    /// The span mask `(rows, len - 1)`, filling `surprisal` and `novel` rows from this step's
    /// per-target losses `nll_rows` (as [`Batch::nll`] gives them).
    pub fn span_mask(&mut self, nll_rows: &[Vec<f32>], fraction: f64) -> Result<Tensor> {
        let (b, t1) = self.valid.dims2()?;
        let mut span = vec![0f32; b * t1];
        for (r, p) in self.rows.iter_mut().zip(&self.placements) {
            let nll = &nll_rows[p.row][p.offset..][..r.ids.len() - 1];
            if r.targets.is_none() {
                r.targets = Some(match r.names.is_empty() {
                    true => surprisal_targets(nll, fraction),
                    false => novel_targets(nll, &r.names),
                });
            }
            for (j, &on) in r.targets.iter().flatten().enumerate() {
                span[p.row * t1 + p.offset + j] = f32::from(u8::from(on));
            }
        }
        Ok(Tensor::from_vec(span, (b, t1), self.valid.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ids: Vec<u32>, targets: Option<Vec<bool>>) -> Row {
        let n = ids.len() - 1;
        Row {
            weights: (0..n).map(|j| 1.0 + j as f32).collect(),
            ids,
            targets,
            rule: SpanRule::Given,
            fell_back: false,
            names: Vec::new(),
            kind: Kind::Fresh,
        }
    }

    #[test]
    fn documents_share_rows_and_keep_their_own_targets_weights_and_losses() {
        let rows = vec![
            row(
                vec![1, 2, 3, 4, 5, 6],
                Some(vec![false, true, true, false, false]),
            ),
            row(vec![7, 8, 9], Some(vec![true, false])),
            // Surprisal: its targets come from its own losses, wherever it was packed.
            row(vec![10, 11, 12], None),
        ];
        let mut batch = Batch::new(rows, Some(6), &Device::Cpu).unwrap();
        assert_eq!(batch.ids.dims2().unwrap(), (2, 6));
        let ids: Vec<Vec<u32>> = batch.ids.to_vec2().unwrap();
        assert_eq!(ids, vec![vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9, 10, 11, 12]]);
        let valid: Vec<Vec<f32>> = batch.valid.to_vec2().unwrap();
        // Token 10 opens the second document of row 1: nothing predicts it.
        assert_eq!(valid[1], vec![1.0, 2.0, 0.0, 1.0, 2.0]);
        assert_eq!(
            batch
                .mean(&batch.valid)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            1.0
        );
        let nll = vec![vec![0.0; 5], vec![0.0, 0.0, 9.0, 0.1, 5.0]];
        let span: Vec<Vec<f32>> = batch.span_mask(&nll, 0.5).unwrap().to_vec2().unwrap();
        assert_eq!(span[0], vec![0.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(span[1], vec![1.0, 0.0, 0.0, 0.0, 1.0]);
        assert_eq!(batch.rows[2].targets, Some(vec![false, true]));
    }
}
