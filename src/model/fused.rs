//! Fused CPU kernels with hand-written backward passes for the hot spots of a training step.
//!
//! Composed from primitives, candle's backward walks one node per primitive and allocates a zeroed
//! accumulator for each; at a 49152-wide vocabulary that dominates a step. Each op here is one node
//! whose backward does the same math as the composed version (checked against it in the tests).
//! They run on contiguous f32 CPU tensors; `ops` falls back to the composed form elsewhere.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use super::quant::QuantRows;
use super::tile::{dot, lane_products, matmul_new, View};
use super::weight_product::Packed;

/// The f32 data of a contiguous CPU tensor.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{what}: expected f32, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

/// The f32 data of a contiguous CPU tensor behind a storage guard.
pub(crate) fn cpu_data<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => slice(c, l, what),
        _ => bail!("{what}: the fused kernels run on the CPU only"),
    }
}

/// The f32 data of a contiguous CPU tensor, to update in place.
pub(crate) fn slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        other => bail!("{what}: expected f32, got {:?}", other.dtype()),
    }
}

/// The u32 data of a contiguous CPU tensor.
pub(crate) fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        bail!("{what}: expected u32 ids, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

/// One target per row, each inside a vocabulary of `v`.
pub(crate) fn check_targets(op: &str, targets: &[u32], n: usize, v: usize) -> Result<()> {
    if targets.len() != n {
        bail!("{op}: {} targets for {n} rows", targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("{op}: target {bad} outside a vocabulary of {v}");
    }
    Ok(())
}

/// Rows of at least this many elements are processed in parallel.
const PAR_ROW: usize = 4096;

fn rows_mut(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() >= PAR_ROW * 2 {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        out.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Sum of squares of `x` in f64: 16 f32 lanes over blocks short enough to keep each lane's
/// rounding small, the blocks in parallel, their sums added in f64 in order.
pub(crate) fn squared_sum(x: &[f32]) -> f64 {
    const BLOCK: usize = 4096;
    let block = |b: &[f32]| -> f64 {
        let (lanes, tail) = lane_products(b, b);
        lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(tail)
    };
    if x.len() < PAR_ROW * 4 {
        return x.chunks(BLOCK).map(block).sum();
    }
    // Block sums added in order: rayon's `sum` associates them as its work splits, which
    // changes the last bit between runs of the same trace.
    let sums: Vec<f64> = x.par_chunks(BLOCK).map(block).collect();
    sums.iter().sum()
}

/// `log(sum(exp(row)))`, computed stably.
pub(crate) fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + super::exp::sum_exp(row, max).ln()
}

/// Cross-entropy per row: `nll[i] = logsumexp(logits[i]) - logits[i, target[i]]`.
pub struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "locus-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let x = slice(s1, l1, "logits")?;
        let t = u32_slice(s2, l2, "targets")?;
        check_targets("cross-entropy", t, n, v)?;
        let out: Vec<f32> = (0..n)
            .into_par_iter()
            .map(|i| {
                let row = &x[i * v..(i + 1) * v];
                log_sum_exp(row) - row[t[i] as usize]
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        nll: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let nll_and_grad = Tensor::stack(&[nll, grad], 1)?;
        let g = logits.apply_op3_no_bwd(targets, &nll_and_grad, &CrossEntropyGrad)?;
        Ok((Some(g), None))
    }
}

/// `g[i] * (softmax(logits[i]) - onehot(target[i]))`, with the log-sum-exp recovered from the nll.
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "locus-cross-entropy-grad"
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
        let (n, v) = l1.shape().dims2()?;
        let x = slice(s1, l1, "logits")?;
        let t = u32_slice(s2, l2, "targets")?;
        let ng = slice(s3, l3, "nll and grad")?;
        let mut out = vec![0f32; n * v];
        rows_mut(&mut out, v, |i, o| {
            let row = &x[i * v..(i + 1) * v];
            let (nll, g) = (ng[2 * i], ng[2 * i + 1]);
            if g == 0.0 {
                return;
            }
            let target = t[i] as usize;
            let lse = nll + row[target];
            super::exp::exp_into(o, row, lse, g);
            o[target] -= g;
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x @ w^T` for `x (..., k)` and a weight `w (n, k)`, shaped `(..., n)`: one graph node however
/// many leading axes `x` has (a reshape on either side would be two more nodes, each with its
/// own zeroed gradient accumulator). The backward yields `dw` directly in `w`'s layout, so no
/// transposed accumulator is built for every weight.
pub struct Linear {
    /// The weight's quantized blocks, where it equals them: few-row products read those.
    blocks: Option<Arc<QuantRows>>,
    /// The input already packed for the weight-reading kernel, shared with other projections.
    input: Option<Arc<Packed>>,
}

impl Linear {
    /// The op, reading `blocks` in place of a weight they match for few-row products.
    pub fn new(blocks: Option<Arc<QuantRows>>) -> Self {
        Linear {
            blocks,
            input: None,
        }
    }

    /// The op on an input already packed (by [`Linear::pack_input`]) for its product.
    pub(crate) fn with_input(blocks: Option<Arc<QuantRows>>, input: Option<Arc<Packed>>) -> Self {
        Linear { blocks, input }
    }

    /// The contiguous CPU input `x` packed for products with weights `n` rows long, where the
    /// weight-reading kernel takes them: for projections that share an input.
    pub(crate) fn pack_input(x: &Tensor, n: usize) -> Result<Option<Arc<Packed>>> {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            return Ok(None);
        };
        let k = layout.dims().last().copied().unwrap_or(0);
        let m = layout.shape().elem_count() / k.max(1);
        let x = slice(s, layout, "linear input")?;
        Ok(Linear::pack(x, m, n, k).map(Arc::new))
    }

    /// The input `(m, k)` packed for products with weights `(n, k)`, except for few-row products
    /// (which read the weight row by row), where the CPU lacks AVX-512 and in the build that
    /// links MKL (whose products take the rest).
    pub(crate) fn pack(x: &[f32], m: usize, n: usize, k: usize) -> Option<Packed> {
        if cfg!(feature = "mkl") || few_rows(m, n, k) {
            return None;
        }
        Packed::of(x, m, k)
    }

    /// The input as a contiguous `(m, k)` matrix, the weight's `(n, k)` and the output shape.
    pub(crate) fn shapes(l1: &Layout, l2: &Layout) -> Result<(Layout, usize, usize, usize, Shape)> {
        let dims = l1.shape().dims();
        let (n, k) = l2.shape().dims2()?;
        let Some((&k1, lead)) = dims.split_last().filter(|_| dims.len() >= 2) else {
            bail!("linear: input of shape {dims:?} has no rows");
        };
        if k1 != k {
            bail!("linear: input width {k1} does not match weight width {k}");
        }
        if !l1.is_contiguous() {
            bail!("linear: expected a contiguous input");
        }
        let m = lead.iter().product();
        let out: Vec<usize> = lead.iter().copied().chain([n]).collect();
        let rows = Layout::contiguous_with_offset((m, k), l1.start_offset());
        Ok((rows, m, n, k, Shape::from(out)))
    }

    fn fwd<S: BackendStorage>(s1: &S, l1: &Layout, s2: &S, l2: &Layout) -> Result<(S, Shape)> {
        let (rows, m, n, k, out) = Linear::shapes(l1, l2)?;
        let y = s1.matmul(s2, (1, m, n, k), &rows, &l2.transpose(0, 1)?)?;
        Ok((y, out))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "locus-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.product(s1, l1, s2, l2, self.input.as_deref())
    }
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Linear::fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Linear::backward(x, w, grad)
    }
}

impl Linear {
    /// The forward on the CPU, reading the input from `packed` where that holds it.
    pub(crate) fn product(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        packed: Option<&Packed>,
    ) -> Result<(CpuStorage, Shape)> {
        super::turns::yield_to_foreground();
        let (rows, m, n, k, out) = Linear::shapes(l1, l2)?;
        if few_rows(m, n, k) {
            let x = slice(s1, &rows, "linear input")?;
            let y = match self.blocks.as_deref().filter(|b| b.dims() == (n, k)) {
                Some(blocks) => super::tile::few_rows_times_t(x, blocks, m, n, k),
                None => super::tile::few_rows_times_t(x, slice(s2, l2, "linear weight")?, m, n, k),
            };
            return Ok((CpuStorage::F32(y), out));
        }
        let (x, w) = (
            slice(s1, &rows, "linear input")?,
            slice(s2, l2, "linear weight")?,
        );
        let fresh;
        let packed = match packed.filter(|p| p.dims() == (m, k)) {
            Some(p) => Some(p),
            None => {
                fresh = Linear::pack(x, m, n, k);
                fresh.as_ref()
            }
        };
        let y = match packed {
            Some(p) => p.times_t(w, n),
            // The tile product copies a weight no wider than deep rather than let the kernel
            // gather it (`tile::gathered`).
            None => matmul_new(View::rows(x, m, k, k), View::rows(w, n, k, k).t()),
        };
        Ok((CpuStorage::F32(y), out))
    }

    /// The gradients of `x @ w^T` for `x` and `w` given the output's gradient `grad`, each only
    /// where its tensor records gradients; `w`'s goes through `grads::offer`.
    pub(crate) fn backward(
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        super::turns::yield_to_foreground();
        // A frozen weight (or an input that depends on no variable) gets no gradient: the
        // backward still visits this op for the other argument, and its product would be dropped.
        let rows = |t: &Tensor| t.detach().flatten_to(t.rank() - 2);
        let (grad, x2, w2) = (rows(&grad.contiguous()?)?, rows(x)?, w.detach());
        let (dx, dw) = if grad.device().is_cpu() {
            use super::linear_grad::{products, Weight};
            let weight = match w.track_op() {
                false => Weight::Frozen,
                true if super::grads::norm_only(w) => Weight::SquaredNorm { input: x.id() },
                true => Weight::Gradient,
            };
            let p = products(&grad, &x2, &w2, x.track_op(), weight)?;
            if let Some(sq) = p.dw_squared_norm {
                super::grads::offer_norm(w.id(), sq, None)?;
            }
            (p.dx, p.dw)
        } else {
            let dx = x.track_op().then(|| grad.matmul(&w2)).transpose()?;
            let dw = w.track_op().then(|| grad.t()?.matmul(&x2)).transpose()?;
            (dx, dw)
        };
        let dx = dx.map(|dx| dx.reshape(x.dims())).transpose()?;
        let dw = dw.map(|g| super::grads::offer(w, g)).transpose()?.flatten();
        Ok((dx, dw))
    }
}

/// Whether `x @ w^T` for `m` rows and a weight `(n, k)` is faster as dot products of whole rows
/// than as a general product, which packs the weight on every call and splits little work poorly.
/// The limits are where the two met on SmolLM2's shapes (docs/benchmarks.md, "Few-row products"):
/// with AVX-512, 12 rows for any weight (the 49152-wide head), 32 for one at most four times wider
/// than deep (the MLP's gate and up), 64 for one no wider than deep (attention, the MLP's down);
/// without it, where both products run on narrower vectors, 4 rows, and 8 for one no wider than
/// deep. The dot products run on AVX-512 where the weight kernel does.
pub(crate) fn few_rows(m: usize, n: usize, k: usize) -> bool {
    if super::weight_product::available() {
        m <= 12 || (m <= 32 && n <= 4 * k) || (m <= 64 && n <= k)
    } else {
        m <= 4 || (m <= 8 && n <= k)
    }
}

/// RMS norm over the last axis: `w * x / sqrt(mean(x^2) + eps)`.
pub struct RmsNorm {
    /// Added to the mean square.
    pub eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = dot(row, row) / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "locus-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "rms-norm input")?;
        let w = slice(s2, l2, "rms-norm weight")?;
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        rows_mut(&mut out, h, |r, o| {
            let row = &x[r * h..(r + 1) * h];
            let inv = inv_rms(row, self.eps);
            for ((o, &xv), &wv) in o.iter_mut().zip(row).zip(w) {
                *o = xv * inv * wv;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormGradX { eps: self.eps })?;
        let dw = w
            .track_op()
            .then(|| x.apply_op2_no_bwd(&grad, &RmsNormGradW { eps: self.eps }))
            .transpose()?;
        Ok((Some(dx), dw))
    }
}

/// `dx = r * (g*w - x * r^2 * mean(g*w*x))` with `r = 1/rms(x)`.
struct RmsNormGradX {
    eps: f32,
}

impl CustomOp3 for RmsNormGradX {
    fn name(&self) -> &'static str {
        "locus-rms-norm-grad-x"
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
        let x = slice(s1, l1, "x")?;
        let w = slice(s2, l2, "w")?;
        let g = slice(s3, l3, "grad")?;
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        rows_mut(&mut out, h, |r, o| {
            let (xr, gr) = (&x[r * h..(r + 1) * h], &g[r * h..(r + 1) * h]);
            let inv = inv_rms(xr, self.eps);
            // The row's output holds `g * w` until the last pass.
            for ((o, &gv), &wv) in o.iter_mut().zip(gr).zip(w) {
                *o = gv * wv;
            }
            let c = inv * inv * dot(xr, o) / h as f32;
            for (o, &xv) in o.iter_mut().zip(xr) {
                *o = inv * (*o - xv * c);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `dw = sum over rows of g * x / rms(x)`.
struct RmsNormGradW {
    eps: f32,
}

impl CustomOp2 for RmsNormGradW {
    fn name(&self) -> &'static str {
        "locus-rms-norm-grad-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "x")?;
        let g = slice(s2, l2, "grad")?;
        let h = l1.shape().dims()[l1.shape().rank() - 1];
        let mut dw = vec![0f32; h];
        for (xr, gr) in x.chunks(h).zip(g.chunks(h)) {
            let inv = inv_rms(xr, self.eps);
            for ((d, &xv), &gv) in dw.iter_mut().zip(xr).zip(gr) {
                *d += gv * xv * inv;
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from(h)))
    }
}

/// `(b, t, heads * d)` to contiguous heads `(b, heads, t, d)` in one graph node (a reshape, a
/// transpose and a copy are three, each with its own zeroed gradient accumulator).
pub struct SplitHeads {
    /// Number of heads the last axis holds.
    pub heads: usize,
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "locus-split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, hd) = l.shape().dims3()?;
        let h = self.heads;
        if h == 0 || !hd.is_multiple_of(h) {
            bail!("split heads: width {hd} does not split into {h} heads");
        }
        let d = hd / h;
        let x = slice(s, l, "split heads input")?;
        let mut out = Vec::with_capacity(x.len());
        for (batch, head) in (0..b).flat_map(|i| (0..h).map(move |j| (i, j))) {
            for pos in 0..t {
                let at = (batch * t + pos) * hd + head * d;
                out.extend_from_slice(&x[at..at + d]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, h, t, d) = grad.dims4()?;
        Ok(Some(grad.transpose(1, 2)?.contiguous()?.reshape((
            b,
            t,
            h * d,
        ))?))
    }
}

/// Rotary embedding, Hugging Face layout, on `(b, h, t, d)` with tables `(t, d/2)` or `(b, t, d/2)`:
/// `y1 = x1 cos - x2 sin`, `y2 = x2 cos + x1 sin` for the two halves of each head.
/// Its backward is the same rotation by the negated angle.
pub struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "locus-rope"
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
        let (b, h, t, d) = l1.shape().dims4()?;
        let x = slice(s1, l1, "rope input")?;
        let cos = slice(s2, l2, "cos")?;
        let sin = slice(s3, l3, "sin")?;
        let half = d / 2;
        // Tables `(b, t, half)` give every row its own positions (packed documents).
        let per_row = l2.shape().rank() == 3;
        let rows = if per_row { b * t } else { t };
        if cos.len() < rows * half || sin.len() < rows * half {
            bail!("rope: tables shorter than {rows} positions");
        }
        let mut out = vec![0f32; x.len()];
        rows_mut(&mut out, d, |r, o| {
            let pos = match per_row {
                true => r / (h * t) * t + r % t,
                false => r % t,
            };
            let xr = &x[r * d..(r + 1) * d];
            let (c, s) = (
                &cos[pos * half..(pos + 1) * half],
                &sin[pos * half..(pos + 1) * half],
            );
            for i in 0..half {
                let (x1, x2) = (xr[i], xr[i + half]);
                o[i] = x1 * c[i] - x2 * s[i];
                o[i + half] = x2 * c[i] + x1 * s[i];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, &sin.neg()?, &Rope)?;
        Ok((Some(dx), None, None))
    }
}
