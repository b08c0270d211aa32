//! A learning step's batch: tokenized rows with their span targets, padded into one tensor.

use candle_core::{Device, Tensor};

use super::engine::Doc;
use crate::error::{Error, Result};
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

/// Rows padded to one length: ids `(b, t)` and the weights of real targets `(b, t - 1)`.
pub struct Batch {
    /// The rows, fresh documents first.
    pub rows: Vec<Row>,
    /// Padded token ids.
    pub ids: Tensor,
    /// A real target's weight in the full loss (see [`Row::weights`]); 0 on padding.
    pub valid: Tensor,
    /// Tokens over all rows.
    pub tokens: usize,
    /// The sum of `valid`: what the full loss's mean divides by.
    targets: f64,
}

impl Batch {
    /// Pads `rows` into tensors on `device`.
    pub fn new(rows: Vec<Row>, device: &Device) -> Result<Batch> {
        let (b, t) = (
            rows.len(),
            rows.iter().map(|r| r.ids.len()).max().unwrap_or(0),
        );
        let mut ids = vec![0u32; b * t];
        for (i, r) in rows.iter().enumerate() {
            ids[i * t..i * t + r.ids.len()].copy_from_slice(&r.ids);
        }
        let (valid, targets) = Self::weights(&rows, t, device)?;
        Ok(Batch {
            tokens: rows.iter().map(|r| r.ids.len()).sum(),
            targets,
            ids: Tensor::from_vec(ids, (b, t), device)?,
            valid,
            rows,
        })
    }

    /// The rows' target weights padded to `t - 1` a row, and their sum.
    fn weights(rows: &[Row], t: usize, device: &Device) -> Result<(Tensor, f64)> {
        let mut valid = vec![0f32; rows.len() * (t - 1)];
        for (i, r) in rows.iter().enumerate() {
            valid[i * (t - 1)..i * (t - 1) + r.ids.len() - 1].copy_from_slice(&r.weights);
        }
        let sum = valid.iter().map(|&w| f64::from(w)).sum::<f64>();
        let valid = Tensor::from_vec(valid, (rows.len(), t - 1), device)?;
        Ok((valid, sum.max(f64::MIN_POSITIVE)))
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

    /// The span mask `(b, t - 1)`, filling `surprisal` and `novel` rows from this step's
    /// per-target losses.
    pub fn span_mask(&mut self, nll_rows: &[Vec<f32>], fraction: f64) -> Result<Tensor> {
        let (b, t1) = self.valid.dims2()?;
        let mut span = vec![0f32; b * t1];
        for (i, r) in self.rows.iter_mut().enumerate() {
            let nll = &nll_rows[i][..r.ids.len() - 1];
            if r.targets.is_none() {
                r.targets = Some(match r.names.is_empty() {
                    true => surprisal_targets(nll, fraction),
                    false => novel_targets(nll, &r.names),
                });
            }
            for (j, &on) in r.targets.iter().flatten().enumerate() {
                span[i * t1 + j] = f32::from(u8::from(on));
            }
        }
        Ok(Tensor::from_vec(span, (b, t1), self.valid.device())?)
    }
}
