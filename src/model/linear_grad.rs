//! The two products of a linear layer's backward on the CPU, skipping runs of rows whose gradient
//! is zero.
//!
//! Under causal attention a position's gradient is zero when no counted target lies at or after
//! it in its sequence: padding, and in a span backward every position after a row's last span.
//! Those zeros survive every layer (attention, norms, SwiGLU and residuals map zero rows to zero
//! rows), so a product over them is work whose result is known.
//!
//! Where only the weight gradient's norm is wanted (`grads::backward_norms`) and the live rows are
//! fewer than the layer is wide, the norm comes from the rows' Gram matrices without the gradient.
//! A Gram matrix is symmetric, so only its blocks on and below the diagonal are computed, and the
//! input's is computed once for the layers that read the same input (the MLP's gate and up).

use std::ops::Range;
use std::rc::Rc;

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, TensorId};

use super::fused::{cpu_data, slice};
use super::tile::{matmul_new, matmul_rows_new, matmul_threaded, View};

/// Zero runs shorter than this stay in the product: splitting it there costs more in smaller,
/// less efficient pieces than the rows save.
const MIN_RUN: usize = 16;

/// The ranges of rows of a row-major `(m, n)` matrix that hold a nonzero, with interior zero runs
/// shorter than [`MIN_RUN`] kept inside the ranges around them.
fn live_rows(g: &[f32], m: usize, n: usize) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, row) in g.chunks_exact(n.max(1)).take(m).enumerate() {
        if !row.iter().any(|&v| v != 0.0) {
            continue;
        }
        match out.last_mut() {
            Some(last) if i - last.end < MIN_RUN => last.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// What a linear layer's backward computes for its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Weight {
    /// Nothing: the weight is frozen.
    Frozen,
    /// Its gradient.
    Gradient,
    /// Only its gradient's squared norm; the layer's input is the tensor `input`, whose Gram
    /// matrix other layers reading it may share.
    SquaredNorm {
        /// The layer's input, as the graph holds it.
        input: TensorId,
    },
}

/// A linear layer's backward products, each only where it was wanted.
pub(crate) struct Products {
    /// The input's gradient.
    pub dx: Option<Tensor>,
    /// The weight's gradient.
    pub dw: Option<Tensor>,
    /// The squared norm of the weight's gradient, in place of the gradient.
    pub dw_squared_norm: Option<f64>,
}

/// A linear layer's input and weight gradients, `grad @ w` and `grad^T @ x`, for `grad (m, n)`,
/// `x (m, k)` and `w (n, k)` on the CPU, as `want_x` and `weight` ask; the gradient's live rows
/// are found once for all.
pub(crate) fn products(
    grad: &Tensor,
    x: &Tensor,
    w: &Tensor,
    want_x: bool,
    weight: Weight,
) -> Result<Products> {
    let (m, n) = grad.dims2()?;
    let (storage, layout) = grad.storage_and_layout();
    let g = cpu_data(&storage, layout, "linear output gradient")?;
    let live = live_rows(g, m, n);
    let dx = want_x
        .then(|| grad.apply_op2_no_bwd(w, &GradX { live: &live }))
        .transpose()?;
    let dw = (weight == Weight::Gradient)
        .then(|| grad.apply_op2_no_bwd(x, &GradW { live: &live }))
        .transpose()?;
    let dw_squared_norm = match weight {
        Weight::SquaredNorm { input } => {
            let (rows, k) = x.dims2()?;
            if rows != m {
                bail!("linear backward: {m} gradient rows for {rows} input rows");
            }
            let (xs, xl) = x.storage_and_layout();
            let x = cpu_data(&xs, xl, "linear input")?;
            Some(squared_norm(g, x, input, (n, k), &live))
        }
        _ => None,
    };
    Ok(Products {
        dx,
        dw,
        dw_squared_norm,
    })
}

/// `dw = grad^T @ x (n, k)` over the live rows of `g (m, n)` and `x (m, k)`.
fn weight_product(g: &[f32], x: &[f32], n: usize, k: usize, live: &[Range<usize>]) -> Vec<f32> {
    let views = |r: &Range<usize>| {
        let rows = View::rows(&g[r.start * n..r.end * n], r.len(), n, n);
        (
            rows.t(),
            View::rows(&x[r.start * k..r.end * k], r.len(), k, k),
        )
    };
    let Some((first, rest)) = live.split_first() else {
        return vec![0f32; n * k];
    };
    let (a, b) = views(first);
    let mut dw = matmul_new(a, b);
    for r in rest {
        let (a, b) = views(r);
        matmul_threaded(&mut dw, a, b, true);
    }
    dw
}

/// `|grad^T @ x|^2` over the live rows of `g (m, n)` and `x (m, k)`, `x` being the graph's tensor
/// `input`. With `l` live rows it is `sum_ij (g g^T)_ij (x x^T)_ij`, two `l x l` Gram matrices
/// costing about `0.6 l^2 (n + k)` multiply-adds against the gradient's `l n k` (less where another
/// layer already took the input's Gram): the cheaper of the two, by [`Gram::cost`], is taken.
fn squared_norm(
    g: &[f32],
    x: &[f32],
    input: TensorId,
    (n, k): (usize, usize),
    live: &[Range<usize>],
) -> f64 {
    let l: usize = live.iter().map(|r| r.len()).sum();
    if l == 0 {
        return 0.0;
    }
    let shared = super::grads::input_gram(input, live);
    let input_width = if shared.is_some() { 0 } else { k };
    if Gram::cost(l, n + input_width) >= l * n * k {
        return super::fused::squared_sum(&weight_product(g, x, n, k, live));
    }
    let gather = |data: &[f32], width: usize| -> Vec<f32> {
        let mut rows = Vec::with_capacity(l * width);
        for r in live {
            rows.extend_from_slice(&data[r.start * width..r.end * width]);
        }
        rows
    };
    let xx = shared.unwrap_or_else(|| {
        let gram = Rc::new(Gram::of(&gather(x, k), k));
        super::grads::keep_input_gram(input, live, Rc::clone(&gram));
        gram
    });
    Gram::of(&gather(g, n), n).dot(&xx)
}

/// Rows per block of a [`Gram`] matrix.
const GRAM_BLOCK: usize = 128;

/// What one multiply-add of a Gram matrix costs in multiply-adds of a layer's full-width product.
/// MKL runs the Gram blocks (128 rows against a long inner dimension) about as fast as the product.
/// The portable kernel runs them at a third to a half of its product's rate (AMD EPYC, 2 cores:
/// a 300 x 1536 Gram matrix, 0.36 of a 300-row gate product's multiply-adds, took 3.3-4.5 ms
/// against the product's 3.1-3.4 ms), so there a Gram matrix must be far smaller to pay. The
/// tied head keeps its own rule (`fused_head`).
#[cfg(feature = "mkl")]
const GRAM_COST: usize = 1;
#[cfg(not(feature = "mkl"))]
const GRAM_COST: usize = 3;

/// The Gram matrix `a a^T` of a row-major `(l, width)` matrix `a`, held as its blocks of
/// [`GRAM_BLOCK`] rows up to and including the diagonal: the blocks above mirror those below, so
/// they are neither computed nor stored.
pub(crate) struct Gram {
    /// `l`.
    rows: usize,
    /// Row block `i` (rows `[s, e)`, `s = i * GRAM_BLOCK`) against columns `[0, e)`, the blocks
    /// one after another, each row-major.
    packed: Vec<f32>,
}

impl Gram {
    /// The row blocks `[s, e)` of an `l`-row matrix.
    fn blocks(l: usize) -> impl Iterator<Item = (usize, usize)> {
        (0..l)
            .step_by(GRAM_BLOCK)
            .map(move |s| (s, (s + GRAM_BLOCK).min(l)))
    }

    /// Entries computed for `l` rows, each a dot product of two rows.
    pub(crate) fn entries(l: usize) -> usize {
        Self::blocks(l).map(|(s, e)| (e - s) * e).sum()
    }

    /// The Gram matrices of `l` rows, of `widths` columns in all, in multiply-adds of the
    /// products they stand in for (see [`GRAM_COST`]).
    pub(crate) fn cost(l: usize, widths: usize) -> usize {
        GRAM_COST * Self::entries(l) * widths
    }

    /// The Gram matrix of the row-major `a (l, width)`.
    pub(crate) fn of(a: &[f32], width: usize) -> Gram {
        let l = a.len() / width.max(1);
        let mut packed = vec![0f32; Self::entries(l)];
        let mut at = 0;
        for (s, e) in Self::blocks(l) {
            let block = View::rows(&a[s * width..e * width], e - s, width, width);
            let upto = View::rows(&a[..e * width], e, width, width);
            matmul_threaded(&mut packed[at..at + (e - s) * e], block, upto.t(), false);
            at += (e - s) * e;
        }
        Gram { rows: l, packed }
    }

    /// `sum_ij A_ij B_ij` over the whole matrices `A` (this) and `B`, of as many rows.
    pub(crate) fn dot(&self, other: &Gram) -> f64 {
        assert_eq!(self.rows, other.rows, "Gram matrices of different sizes");
        let mut sum = 0f64;
        let mut at = 0;
        for (s, e) in Self::blocks(self.rows) {
            let block = (&self.packed[at..at + (e - s) * e], &other.packed[at..]);
            for (a, b) in block.0.chunks_exact(e).zip(block.1.chunks_exact(e)) {
                let dot = |from: usize, to: usize| -> f64 {
                    a[from..to]
                        .iter()
                        .zip(&b[from..to])
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum()
                };
                // Columns left of the diagonal block stand for their mirror images too.
                sum += 2.0 * dot(0, s) + dot(s, e);
            }
            at += (e - s) * e;
        }
        sum
    }
}

/// The `(m, n)` gradient of a linear layer's output, with its sizes, checked against its live
/// rows.
fn gradient<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    live: &[Range<usize>],
) -> Result<(&'a [f32], usize, usize)> {
    let (m, n) = l.shape().dims2()?;
    if live.last().is_some_and(|r| r.end > m) {
        bail!("linear backward: live rows beyond the gradient's {m}");
    }
    Ok((slice(s, l, "linear output gradient")?, m, n))
}

/// `grad @ w` over the live rows of `grad (m, n)`, for the weight `w (n, k)`; zero elsewhere.
struct GradX<'a> {
    live: &'a [Range<usize>],
}

impl CustomOp2 for GradX<'_> {
    fn name(&self) -> &'static str {
        "locus-linear-grad-x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, m, n) = gradient(s1, l1, self.live)?;
        let (n2, k) = l2.shape().dims2()?;
        if n != n2 {
            bail!("linear backward: gradient width {n} does not match weight rows {n2}");
        }
        let w = View::rows(slice(s2, l2, "linear weight")?, n, k, k);
        let dx = matmul_rows_new((m, k), self.live, |r| {
            (View::rows(&g[r.start * n..r.end * n], r.len(), n, n), w)
        });
        Ok((CpuStorage::F32(dx), Shape::from((m, k))))
    }
}

/// `grad^T @ x` over the live rows of `grad (m, n)` and the input `x (m, k)`, in the weight's
/// `(n, k)` layout.
struct GradW<'a> {
    live: &'a [Range<usize>],
}

impl CustomOp2 for GradW<'_> {
    fn name(&self) -> &'static str {
        "locus-linear-grad-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, m, n) = gradient(s1, l1, self.live)?;
        let (m2, k) = l2.shape().dims2()?;
        if m != m2 {
            bail!("linear backward: {m} gradient rows for {m2} input rows");
        }
        let dw = weight_product(g, slice(s2, l2, "linear input")?, n, k, self.live);
        Ok((CpuStorage::F32(dw), Shape::from((n, k))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_with(m: usize, n: usize, live: &[usize]) -> Vec<f32> {
        let mut g = vec![0f32; m * n];
        for &i in live {
            g[i * n + n - 1] = 1.0;
        }
        g
    }

    #[test]
    fn zero_runs_of_at_least_min_run_are_cut_out() {
        let g = rows_with(100, 3, &[2, 5, 40, 41, 60, 75]);
        assert_eq!(live_rows(&g, 100, 3), vec![2..6, 40..42, 60..76]);
    }

    /// `(rows, cols)` pseudo-random values in [-0.5, 0.5), the same for the same `seed`.
    fn values(rows: usize, cols: usize, seed: usize) -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 + seed * 104729) % 1009) as f32 / 1009.0 - 0.5)
            .collect();
        Tensor::from_vec(v, (rows, cols), &candle_core::Device::Cpu)
    }

    /// A `(m, n)` gradient of pseudo-random values on the rows `live`, zero on the others.
    fn gradient_on(m: usize, n: usize, live: &[usize]) -> Result<Tensor> {
        let keep: Vec<f32> = (0..m)
            .map(|i| f32::from(u8::from(live.contains(&i))))
            .collect();
        let keep = Tensor::from_vec(keep, (m, 1), &candle_core::Device::Cpu)?;
        values(m, n, 1)?.broadcast_mul(&keep)
    }

    #[test]
    fn products_that_skip_zero_runs_equal_the_dense_ones() -> Result<()> {
        let (m, n, k) = (100, 8, 5);
        let (w, x) = (values(n, k, 2)?, values(m, k, 3)?);
        // Rows 2, 5, 40, 41, 60 and 75 live, as in the test above, then an all-zero gradient.
        for live in [&[2, 5, 40, 41, 60, 75][..], &[]] {
            let g = gradient_on(m, n, live)?;
            let diff = |a: Tensor, b: Tensor| -> Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            let p = products(&g, &x, &w, true, Weight::Gradient)?;
            let (Some(dx), Some(dw)) = (p.dx, p.dw) else {
                panic!("both gradients were asked for");
            };
            assert!(diff(dx, g.matmul(&w)?)? < 1e-6);
            assert!(diff(dw, g.t()?.matmul(&x)?)? < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn squared_norms_without_the_gradient_equal_the_gradients_norms() -> Result<()> {
        let (m, n, k) = (100, 96, 72);
        let (w, x) = (values(n, k, 2)?, values(m, k, 3)?);
        // A few live rows take the Gram matrices in one run or two (gathered), 22 rows take them
        // on MKL and the product on the portable kernel (`GRAM_COST`), all rows the product;
        // none, a zero norm.
        let runs = |a: std::ops::Range<usize>, b: std::ops::Range<usize>| a.chain(b).collect();
        for live in [
            vec![3, 4],
            runs(1..4, 30..32),
            runs(0..8, 26..40),
            (0..m).collect(),
            vec![],
        ] {
            let g = gradient_on(m, n, &live)?;
            let input = Weight::SquaredNorm { input: x.id() };
            let p = products(&g, &x, &w, false, input)?;
            assert!(p.dx.is_none() && p.dw.is_none());
            let got = p.dw_squared_norm.expect("a norm was asked for");
            let dense: Vec<f32> = g.t()?.matmul(&x)?.flatten_all()?.to_vec1()?;
            let want: f64 = dense.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            assert!(
                (got - want).abs() <= 1e-5 * want.max(1e-30),
                "live rows {live:?}: {got} against {want}"
            );
            assert_eq!(want == 0.0, live.is_empty());
        }
        Ok(())
    }

    #[test]
    fn gram_matrices_held_below_the_diagonal_give_the_whole_matrices_sum() -> Result<()> {
        // One block, a block and a part, and three whole blocks.
        for (l, n, k) in [(5, 3, 4), (200, 7, 5), (3 * GRAM_BLOCK, 2, 6)] {
            let (a, b) = (values(l, n, 4)?, values(l, k, 5)?);
            let want: f64 = {
                let (aa, bb) = (a.matmul(&a.t()?)?, b.matmul(&b.t()?)?);
                let (aa, bb) = (aa.flatten_all()?.to_vec1::<f32>()?, bb.flatten_all()?);
                aa.iter()
                    .zip(bb.to_vec1::<f32>()?)
                    .map(|(&x, y)| f64::from(x) * f64::from(y))
                    .sum()
            };
            let rows = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            let got = Gram::of(&rows(&a)?, n).dot(&Gram::of(&rows(&b)?, k));
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "{l} rows: {got} against {want}"
            );
        }
        Ok(())
    }

    #[test]
    fn layers_reading_one_input_share_its_gram_matrix_only_over_the_same_rows() -> Result<()> {
        use candle_core::{Device, Var};
        // Three layers read `x`; the first two's gradients live on rows 0..60, the third's on
        // 20..50 only. Those rows, of width 512, take the Gram matrices on either kernel, the
        // first layer's input Gram serving the second but not the third.
        let (m, n, k) = (300, 512, 512);
        let x = Var::from_tensor(&values(m, k, 6)?)?;
        let ws = (0..3)
            .map(|i| Var::from_tensor(&values(n, k, 7 + i)?))
            .collect::<Result<Vec<_>>>()?;
        let mask = |live: Range<usize>| -> Result<Tensor> {
            let keep: Vec<f32> = (0..m)
                .map(|i| f32::from(u8::from(live.contains(&i))))
                .collect();
            Tensor::from_vec(keep, (m, 1), &Device::Cpu)
        };
        let (wide, narrow) = (mask(0..60)?, mask(20..50)?);
        let loss = || -> Result<Tensor> {
            let mut total = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?;
            for (w, keep) in ws.iter().zip([&wide, &wide, &narrow]) {
                let y = super::super::ops::linear_from(x.as_tensor(), w.as_tensor(), None, None)?;
                let weights = values(m, n, 9)?.broadcast_mul(keep)?;
                total = (total + (y * weights)?.sum_all()?)?;
            }
            Ok(total)
        };
        let norms = super::super::grads::backward_norms(&loss()?)?;
        let grads = super::super::grads::backward(&loss()?)?;
        use super::super::grads::GradNorms;
        for w in &ws {
            let (got, want) = (norms.squared_norm(w)?, grads.squared_norm(w)?);
            assert!((got - want).abs() <= 1e-5 * want, "{got} against {want}");
        }
        Ok(())
    }

    #[test]
    fn an_all_zero_gradient_has_no_live_rows() {
        assert!(live_rows(&[0.0; 12], 4, 3).is_empty());
        assert_eq!(live_rows(&[-0.0, 1e-30, 0.0, 0.0], 2, 2), vec![0..1]);
    }
}
