//! The vocabulary projection and next-token cross-entropy as one op, worked in chunks of rows.
//!
//! Composed, a training step holds the `(rows x vocab)` logits for the backward and builds their
//! gradient, a zeroed accumulator and a sum of the same size. Here the forward keeps the logits
//! once, where they are few enough ([`KEEP_LOGITS`]), and otherwise nothing but the per-row loss,
//! the backward then recomputing each chunk's logits (one more matrix product). Each chunk of
//! logits becomes the logit gradient in a buffer of its own and multiplies straight into the
//! gradients of the hidden states and of the head weight. Rows whose loss carries no gradient
//! (outside a span) are skipped in the backward.

use std::sync::OnceLock;

use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, TensorId,
};
use rayon::prelude::*;

use super::fused::{check_targets, few_rows, log_sum_exp, slice};
use super::linear_grad::Gram;
use super::tile::{few_rows_times_t, matmul_new, matmul_threaded as matmul, View};

/// Logits per chunk (32 MiB of f32): large enough for full-speed matrix products, small enough
/// to stay a fraction of a step's memory.
const CHUNK_LOGITS: usize = 1 << 23;

/// The most logits a forward keeps for its backward (256 MiB of f32): a step of 4 x 128 tokens
/// over a 49152-token vocabulary keeps its 100 MB and saves the backward a product as large as the
/// forward's; a larger batch recomputes them chunk by chunk.
pub const KEEP_LOGITS: usize = 1 << 26;

/// Rows per chunk for a vocabulary of `vocab`.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_LOGITS / vocab.max(1)).max(1)
}

/// Rows per chunk when `n` rows are cut into as few chunks of at most `chunk` rows as possible,
/// all of about the same size: every chunk's product packs the whole head weight, so a chunk of a
/// few left-over rows would cost nearly as much as a full one.
fn balanced(n: usize, chunk: usize) -> usize {
    let chunks = n.div_ceil(chunk.max(1)).max(1);
    n.div_ceil(chunks).max(1)
}

/// `nll[i] = logsumexp(x[i] @ w^T) - (x[i] @ w^T)[targets[i]]` for hidden states `x (n, h)` and a
/// head weight `w (vocab, h)`; differentiable in both.
pub struct HeadNll {
    /// The target id of every row.
    targets: Vec<u32>,
    /// Rows whose logits are computed at once (at least 1).
    chunk: usize,
    /// Whether a backward will follow, so the forward may keep the logits for it.
    keep: bool,
    /// The logits `(n, vocab)`, kept by a forward that may.
    kept: OnceLock<Vec<f32>>,
}

impl HeadNll {
    /// The op for rows predicting `targets`, worked `chunk` rows at a time; with `keep` (a
    /// backward will follow) the forward keeps logits up to [`KEEP_LOGITS`] for it.
    pub fn new(targets: Vec<u32>, chunk: usize, keep: bool) -> Self {
        HeadNll {
            targets,
            chunk,
            keep,
            kept: OnceLock::new(),
        }
    }

    fn check(&self, x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
        let (n, h) = x.shape().dims2()?;
        let (v, h2) = w.shape().dims2()?;
        if h != h2 {
            bail!("head nll: hidden width {h} does not match head width {h2}");
        }
        check_targets("head nll", &self.targets, n, v)?;
        Ok((n, h, v))
    }
}

impl CustomOp2 for HeadNll {
    fn name(&self) -> &'static str {
        "locus-head-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, v) = self.check(l1, l2)?;
        let x = slice(s1, l1, "hidden states")?;
        let weight = slice(s2, l2, "head weight")?;
        let w = View::rows(weight, v, h, h);
        let keep = self.keep && n * v <= KEEP_LOGITS;
        // Kept logits are all in memory anyway: one product computes them, packing the head once.
        let rows = if keep {
            n.max(1)
        } else {
            balanced(n, self.chunk)
        };
        // The general product's buffer (all logits when kept), allocated only if a chunk takes
        // that path.
        let mut logits = Vec::new();
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(rows) {
            super::turns::yield_to_foreground();
            let c = rows.min(n - start);
            let xs = &x[start * h..(start + c) * h];
            // Scoring a continuation projects a handful of rows: see `fused::few_rows`.
            let few;
            let buf = if keep {
                // The one chunk holds every row; its buffer is filled, not zeroed first.
                logits = matmul_new(View::rows(xs, c, h, h), w.t());
                &logits[..]
            } else if few_rows(c, v, h) {
                few = few_rows_times_t(xs, weight, c, v, h);
                &few[..]
            } else {
                logits.resize(logits.len().max(c * v), 0f32);
                let buf = &mut logits[..c * v];
                matmul(buf, View::rows(xs, c, h, h), w.t(), false);
                &buf[..]
            };
            let targets = &self.targets[start..start + c];
            out.par_extend(
                buf.par_chunks(v)
                    .zip(targets)
                    .map(|(row, &t)| log_sum_exp(row) - row[t as usize]),
            );
        }
        if keep && self.kept.set(logits).is_err() {
            bail!("head nll: one op instance applied twice");
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        nll: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let nll_and_grad = Tensor::stack(&[nll, grad], 1)?;
        // A frozen head (the tied embedding under layer-group strategies) gets no gradient: its
        // product is the size of a forward through the head, and its buffer the size of the head.
        let weight = w.track_op();
        let both = x.apply_op3_no_bwd(
            w,
            &nll_and_grad,
            &HeadNllGrad {
                targets: &self.targets,
                chunk: self.chunk,
                weight,
                norm_of: (weight && super::grads::norm_only(w)).then(|| w.id()),
                kept: self.kept.get().map(|k| &k[..]),
            },
        )?;
        let n = x.dim(0)?;
        // A norms-only backward may have taken the weight's norm in place of its gradient.
        let built = both.dim(0)? > n;
        let dw = built.then(|| both.narrow(0, n, w.dim(0)?)).transpose()?;
        let dw = dw.map(|g| super::grads::offer(w, g)).transpose()?.flatten();
        Ok((Some(both.narrow(0, 0, n)?), dw))
    }
}

/// The gradients of [`HeadNll`] for both inputs, stacked as `(n + vocab, h)`: `dx` rows first
/// (`(n, h)`, `dx` alone, without `weight`). With `p = softmax(x @ w^T)` and the logit gradient
/// `d = g * (p - onehot(target))`, `dx = d @ w` and `dw = d^T @ x`; the log-sum-exp comes back
/// from the loss.
struct HeadNllGrad<'a> {
    targets: &'a [u32],
    chunk: usize,
    /// Whether the head weight's gradient is wanted.
    weight: bool,
    /// In a norms-only backward, the weight whose gradient's squared norm may be handed over
    /// instead of the gradient, where that is cheaper (`grads::offer_norm`).
    norm_of: Option<TensorId>,
    /// The forward's logits `(n, vocab)`, if it kept them.
    kept: Option<&'a [f32]>,
}

impl CustomOp3 for HeadNllGrad<'_> {
    fn name(&self) -> &'static str {
        "locus-head-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h) = l1.shape().dims2()?;
        let v = l2.shape().dims()[0];
        let x = slice(s1, l1, "hidden states")?;
        let w = View::rows(slice(s2, l2, "head weight")?, v, h, h);
        let ng = slice(s3, l3, "nll and grad")?;
        let live: Vec<usize> = (0..n).filter(|&i| ng[2 * i + 1] != 0.0).collect();
        // The norm from the live rows' Gram matrices, where they cost at most half the product
        // (on either kernel: with 49152 columns the portable kernel's Gram matrix of one block,
        // 124 rows, took 30 ms against the product's 78); their logit gradients and hidden states
        // are kept for the embedding lookup's rows.
        let gram = Gram::entries(live.len());
        let norm_of = self
            .norm_of
            .filter(|_| 2 * gram * (v + h) < live.len() * v * h);
        let mut factors = norm_of.map(|_| {
            (
                Vec::with_capacity(live.len() * v),
                Vec::with_capacity(live.len() * h),
            )
        });
        let build = self.weight && norm_of.is_none();
        let wanted = if build { v } else { 0 };
        let mut out = vec![0f32; (n + wanted) * h];
        let (dx, dw) = out.split_at_mut(n * h);
        let rows = balanced(live.len(), self.chunk);
        let (mut logits, mut x_rows, mut dxs) = (
            vec![0f32; rows * v],
            vec![0f32; rows * h],
            vec![0f32; rows * h],
        );
        for (k, chunk) in live.chunks(rows).enumerate() {
            super::turns::yield_to_foreground();
            let c = chunk.len();
            for (dst, &i) in x_rows.chunks_mut(h).zip(chunk) {
                dst.copy_from_slice(&x[i * h..(i + 1) * h]);
            }
            let (xs, d) = (View::rows(&x_rows[..c * h], c, h, h), &mut logits[..c * v]);
            match self.kept {
                // A second backward (the trace's full loss after its span loss) reads them too.
                Some(kept) => {
                    for (dst, &i) in d.chunks_mut(v).zip(chunk) {
                        dst.copy_from_slice(&kept[i * v..(i + 1) * v]);
                    }
                }
                None => matmul(d, xs, w.t(), false),
            }
            d.par_chunks_mut(v).zip(chunk).for_each(|(row, &i)| {
                let (nll, g, t) = (ng[2 * i], ng[2 * i + 1], self.targets[i] as usize);
                let lse = nll + row[t];
                super::exp::exp_in_place(row, lse, g);
                row[t] -= g;
            });
            if let Some((ds, x_kept)) = factors.as_mut() {
                ds.extend_from_slice(d);
                x_kept.extend_from_slice(&x_rows[..c * h]);
            }
            let d = View::rows(d, c, v, v);
            matmul(&mut dxs[..c * h], d, w, false);
            for (src, &i) in dxs.chunks(h).zip(chunk) {
                dx[i * h..(i + 1) * h].copy_from_slice(src);
            }
            if build {
                matmul(dw, d.t(), xs, k > 0);
            }
        }
        if let (Some(id), Some((d, x))) = (norm_of, factors) {
            let squared = Gram::of(&d, v).dot(&Gram::of(&x, h));
            super::grads::offer_norm(id, squared, Some(super::grads::HeadRows { d, x, vocab: v }))?;
        }
        Ok((CpuStorage::F32(out), Shape::from((n + wanted, h))))
    }
}
