//! Building blocks of the forward passes. On the CPU the hot ones run as fused kernels with exact
//! backward passes (`fused`); elsewhere they are composed from differentiable primitives.
//!
//! candle's own fused kernels (`rms_norm`, `softmax_last_dim`, `rope*`, `layer_norm`) return no
//! gradient for their inputs, silently; nothing here uses them.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, D};

use super::fused_attention::FusedAttention;
use super::packing::Packing;
use super::quant::QuantRows;
use super::{fused, fused_head, fused_mlp};

/// `x @ w^T + b` for a weight stored `(out, in)`, as torch's `nn.Linear`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_from(x, w, b, None)
}

/// [`linear`] for a weight that may also be held as the quantized blocks it equals, which
/// few-row products read instead of the f32 tensor.
pub fn linear_from(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    blocks: Option<&Arc<QuantRows>>,
) -> Result<Tensor> {
    let mut y = linears_from(x, &[(w, b, blocks)])?;
    Ok(y.remove(0))
}

/// A weight `(out, in)` of [`linears_from`], its bias and the quantized blocks it may equal.
pub type Projection<'a> = (&'a Tensor, Option<&'a Tensor>, Option<&'a Arc<QuantRows>>);

/// [`linear_from`] for each of several weights that read one input: on the CPU the input is
/// packed once for all of their products.
pub fn linears_from(x: &Tensor, weights: &[Projection]) -> Result<Vec<Tensor>> {
    if x.device().is_metal() {
        let mut shape = x.dims().to_vec();
        let rows = x.flatten_to(x.rank().saturating_sub(2))?;
        return weights
            .iter()
            .map(|&(w, b, _)| {
                if let Some(last) = shape.last_mut() {
                    *last = w.dim(0)?;
                }
                with_bias(rows.matmul(&w.t()?)?.reshape(shape.as_slice())?, b)
            })
            .collect();
    }
    let x = x.contiguous()?;
    let widths = weights
        .iter()
        .map(|(w, ..)| w.dim(0))
        .collect::<Result<Vec<_>>>()?;
    // Packed for the widest, the weight least likely to take the few-row product.
    let packed = match widths.iter().max() {
        Some(&n) => fused::Linear::pack_input(&x, n)?,
        None => None,
    };
    weights
        .iter()
        .map(|&(w, b, blocks)| {
            let op = fused::Linear::with_input(blocks.cloned(), packed.clone());
            with_bias(x.apply_op2(&w.contiguous()?, op)?, b)
        })
        .collect()
}

/// `y + b` broadcast over `y`'s rows, or `y` without a bias.
fn with_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Rows `ids` (any shape) of a table `(vocab, h)`, shaped `ids`'s dims then `h`.
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let flat = ids.flatten_all()?;
    let rows = if table.device().is_cpu() {
        flat.apply_op2(&table.contiguous()?, super::embedding::Embedding)?
    } else {
        table.index_select(&flat, 0)?
    };
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    rows.reshape(shape)
}

/// `x @ w + b` for a weight stored `(in, out)`, as GPT-2's `Conv1D`.
pub fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (rows, out) = (x.dims()[..x.rank() - 1].to_vec(), w.dim(1)?);
    let y = x.flatten_to(x.rank() - 2)?.matmul(w)?.broadcast_add(b)?;
    let mut shape = rows;
    shape.push(out);
    y.reshape(shape)
}

/// RMS norm over the last dimension, as in Llama: `w * x / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() {
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, fused::RmsNorm { eps: eps as f32 });
    }
    composed::rms_norm(x, w, eps)
}

/// Layer norm over the last dimension with weight and bias.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// Additive attention mask `(t, s)` for `t` new queries over `s >= t` keys (the last `t` keys
/// are the queries' own positions): 0 where a query may see a key, -inf elsewhere. `window`
/// limits how far back a query sees (GPT-Neo's local attention).
pub fn causal_mask(t: usize, s: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let mask = mask_rows((0..t).map(|i| (i + s - t, 0)), s, window);
    Tensor::from_vec(mask, (t, s), device)
}

/// Additive mask rows over `s` keys, one per query given as its own key and the first key of its
/// document: 0 where the query may see a key (from that first key up to its own, at most `window`
/// of them), -inf elsewhere.
pub(crate) fn mask_rows(
    queries: impl Iterator<Item = (usize, usize)>,
    s: usize,
    window: Option<usize>,
) -> Vec<f32> {
    queries
        .flat_map(|(own, first)| {
            (0..s).map(move |j| {
                let visible = first <= j && j <= own && window.is_none_or(|w| own - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect()
}

/// Causal scaled dot-product attention of `(b, h, t, d)` queries over `(b, kv, s, d)` keys and
/// values, `h` a multiple of `kv` (grouped-query attention: `h / kv` query heads share each
/// key/value head), `s >= t` (the last `t` keys are the queries' own positions), optionally limited
/// to a local `window` and, for documents packed into rows, to each query's own document; returns
/// `(b, t, h * d)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
    packing: Option<&Packing>,
) -> Result<Tensor> {
    if q.device().is_cpu() {
        return q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            FusedAttention::new(scale as f32, window, packing.cloned()),
        );
    }
    composed::attention(q, k, v, scale, window, packing)
}

/// The sum of `t`'s squared entries (a gradient's squared norm), accumulated in f64. On the CPU it
/// is one pass over the data; `t.sqr()?.sum_all()` would first write a squared copy as large as
/// `t`, for every parameter of every traced backward.
pub fn squared_sum(t: &Tensor) -> Result<f64> {
    if t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        return Ok(fused::squared_sum(fused::cpu_data(
            &storage,
            layout,
            "squared sum",
        )?));
    }
    Ok(f64::from(t.sqr()?.sum_all()?.to_scalar::<f32>()?))
}

/// Splits `(b, t, h * d)` into contiguous heads `(b, h, t, d)`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(fused::SplitHeads { heads });
    }
    let (b, t, hd) = x.dims3()?;
    x.reshape((b, t, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Rotary-embedding tables `(cos, sin)`, each `(t, d / 2)`, for positions `start..start + t`.
pub fn rope_tables(
    start: usize,
    t: usize,
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let pos = Tensor::arange(start as u32, (start + t) as u32, device)?;
    rope_tables_at(&pos, head_dim, theta)
}

/// Rotary-embedding tables `(cos, sin)` for the positions `pos` (any shape), each shaped `pos`'s
/// dims then `d / 2`: per token where documents are packed into rows.
pub fn rope_tables_at(pos: &Tensor, head_dim: usize, theta: f64) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let inv = Tensor::from_vec(inv, head_dim / 2, pos.device())?;
    let freqs = pos
        .to_dtype(DType::F32)?
        .unsqueeze(D::Minus1)?
        .broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Rotary embedding in the Hugging Face layout (the two halves of each head rotate together) of
/// `(b, h, t, d)` heads, with tables `(t, d / 2)` shared by every row or `(b, t, d / 2)` per row.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return x
            .contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, fused::Rope);
    }
    composed::rope(x, cos, sin)
}

/// GPT-2's tanh-approximated GELU (`gelu_new`); candle's `gelu` is that approximation.
pub fn gelu_new(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// Next-token negative log-likelihoods `(b, t - 1)`: position `j - 1` predicts token `j`.
pub fn next_token_nll(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if !logits.device().is_cpu() {
        return composed::next_token_nll(logits, ids);
    }
    let (b, t, v) = logits.dims3()?;
    // Every position is scored against the next id (the last against a dummy 0) so the logits
    // need no copy; the last column is dropped and so receives no gradient.
    let shifted = Tensor::cat(
        &[ids.narrow(1, 1, t - 1)?, ids.narrow(1, 0, 1)?.zeros_like()?],
        1,
    )?;
    let nll = logits
        .reshape((b * t, v))?
        .apply_op2(&shifted.flatten_all()?.contiguous()?, fused::CrossEntropy)?;
    nll.reshape((b, t))?.narrow(1, 0, t - 1)
}

/// The SwiGLU activation `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cpu() {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, fused_mlp::SwiGlu);
    }
    composed::swiglu(gate, up)
}

/// The SwiGLU MLP's input side, `swiglu(linear(x, w_gate, b_gate), linear(x, w_up, b_up))`, as
/// one graph node on the CPU where the projections have no biases; `blocks` are the weights'
/// quantized blocks, where they have them, for few-row products.
pub fn gated_up(
    x: &Tensor,
    (w_gate, b_gate): (&Tensor, Option<&Tensor>),
    (w_up, b_up): (&Tensor, Option<&Tensor>),
    blocks: (Option<&Arc<QuantRows>>, Option<&Arc<QuantRows>>),
) -> Result<Tensor> {
    if !x.device().is_cpu() || b_gate.is_some() || b_up.is_some() {
        return swiglu(
            &linear_from(x, w_gate, b_gate, blocks.0)?,
            &linear_from(x, w_up, b_up, blocks.1)?,
        );
    }
    let keep = x.track_op() || w_gate.track_op() || w_up.track_op();
    let op = fused_mlp::GatedUp::new(blocks.0.cloned(), blocks.1.cloned(), keep);
    x.contiguous()?
        .apply_op3(&w_gate.contiguous()?, &w_up.contiguous()?, op)
}

/// Next-token negative log-likelihoods `(b, t - 1)` from final hidden states `(b, t, h)` and an
/// output head `w (vocab, h)`, as `next_token_nll(linear(hidden, w))`; on the CPU without ever
/// holding the logits of every position.
pub fn head_nll(hidden: &Tensor, w: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if !hidden.device().is_cpu() {
        return next_token_nll(&linear(hidden, w, None)?, ids);
    }
    let (b, t, h) = hidden.dims3()?;
    if t == 0 {
        candle_core::bail!("head nll: hidden states with no positions");
    }
    // The last position predicts nothing: its row is dropped before the projection.
    let x = hidden
        .narrow(1, 0, t - 1)?
        .contiguous()?
        .reshape((b * (t - 1), h))?;
    let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?.to_vec1::<u32>()?;
    let keep = x.track_op() || w.track_op();
    let op = fused_head::HeadNll::new(targets, fused_head::chunk_rows(w.dim(0)?), keep);
    x.apply_op2(&w.contiguous()?, op)?.reshape((b, t - 1))
}

/// The same ops composed from differentiable candle primitives: the path on devices without fused
/// kernels, and the oracle the fused kernels are tested against.
pub mod composed {
    use super::*;

    /// RMS norm from `sqr`, `mean`, `sqrt` and broadcasts.
    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
    }

    /// Attention from matmuls, an additive mask, softmax and key/value heads repeated per query head.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        window: Option<usize>,
        packing: Option<&Packing>,
    ) -> Result<Tensor> {
        let (b, h, t, d) = q.dims4()?;
        let group = h / k.dim(1)?;
        let (k, v) = (repeat_kv(k, group)?, repeat_kv(v, group)?);
        let probs = masked_softmax(&q.matmul(&k.t()?)?, scale, window, packing)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * d))
    }

    /// Rotary embedding from products and a half rotation; tables `(t, d / 2)` or `(b, t, d / 2)`.
    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        // Both halves of a head turn by the same angles; per-row tables gain the head axis.
        let table = |t: &Tensor| -> Result<Tensor> {
            let t = Tensor::cat(&[t, t], D::Minus1)?;
            match t.rank() {
                3 => t.unsqueeze(1),
                _ => Ok(t),
            }
        };
        let (cos, sin) = (table(cos)?, table(sin)?);
        let (x1, x2) = (
            x.narrow(D::Minus1, 0, d / 2)?,
            x.narrow(D::Minus1, d / 2, d / 2)?,
        );
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }

    /// Repeats key/value heads: `(b, kv, s, d)` to `(b, kv * n, s, d)`.
    fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
        if n == 1 {
            return Ok(x.clone());
        }
        let (b, kv, s, d) = x.dims4()?;
        x.unsqueeze(2)?
            .broadcast_as((b, kv, n, s, d))?
            .reshape((b, kv * n, s, d))
    }

    /// Scaled scores `(b, h, t, s)` plus an additive causal mask (per document under a packing),
    /// then softmax.
    pub fn masked_softmax(
        scores: &Tensor,
        scale: f64,
        window: Option<usize>,
        packing: Option<&Packing>,
    ) -> Result<Tensor> {
        let (b, _, t, s) = scores.dims4()?;
        let mask = match packing {
            Some(p) => {
                p.check(b, t, s)?;
                p.mask(window, scores.device())?
            }
            None => causal_mask(t, s, window, scores.device())?,
        };
        candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&mask)?, D::Minus1)
    }

    /// `x @ w^T + b` with candle's matmul.
    pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let y = x.broadcast_matmul(&w.t()?)?;
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `silu(gate) * up` from candle's `silu` and a product.
    pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.silu()? * up
    }

    /// Log-softmax and gather.
    pub fn next_token_nll(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        let preds = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
        let targets = ids.narrow(1, 1, t - 1)?.reshape((b * (t - 1), 1))?;
        let logp = candle_nn::ops::log_softmax(&preds, D::Minus1)?;
        logp.gather(&targets, 1)?.neg()?.reshape((b, t - 1))
    }
}
