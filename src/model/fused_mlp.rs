//! The SwiGLU activation `silu(gate) * up` as one op with its backward: composed, it is three
//! nodes whose backward allocates a zeroed accumulator and a sum for each, at the MLP's width.
//! [`GatedUp`] takes the gate and up projections into the same op, so that neither projection's
//! output is a graph node either.

use std::sync::{Arc, OnceLock};

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::sigmoid_into;
use super::fused::{cpu_data, slice, Linear};
use super::quant::QuantRows;

/// Elements per parallel task.
const TASK: usize = 1 << 14;

/// Fails unless `l1` and `l2`, the tensors `what` names in the op `op`, have one shape.
fn same_shape(op: &str, what: (&str, &str), l1: &Layout, l2: &Layout) -> Result<()> {
    if l1.shape() != l2.shape() {
        bail!(
            "{op}: {} {:?} and {} {:?} differ in shape",
            what.0,
            l1.shape(),
            what.1,
            l2.shape()
        );
    }
    Ok(())
}

/// `silu(gate) * up` elementwise, for two tensors of one shape.
pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "locus-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape("swiglu", ("gate", "up"), l1, l2)?;
        let (g, u) = (slice(s1, l1, "gate")?, slice(s2, l2, "up")?);
        Ok((CpuStorage::F32(swiglu(g, u)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluGrad)?;
        let n = gate.elem_count();
        let part = |i: usize| both.narrow(0, i * n, n)?.reshape(gate.shape());
        Ok((Some(part(0)?), Some(part(1)?)))
    }
}

/// `d gate = g * up * silu'(gate)` then `d up = g * silu(gate)`, flat and back to back, with
/// `silu'(x) = s(x) * (1 + x * (1 - s(x)))` for the sigmoid `s`.
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "locus-swiglu-grad"
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
        same_shape("swiglu", ("gate", "up"), l1, l2)?;
        same_shape("swiglu", ("gate", "grad"), l1, l3)?;
        let (g, u) = (slice(s1, l1, "gate")?, slice(s2, l2, "up")?);
        let mut out = vec![0f32; 2 * g.len()];
        let (dg, du) = out.split_at_mut(g.len());
        swiglu_grad(dg, du, g, u, slice(s3, l3, "grad")?);
        Ok((CpuStorage::F32(out), Shape::from(2 * g.len())))
    }
}

/// `silu(g) * u` elementwise.
fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(TASK)
        .zip(g.par_chunks(TASK).zip(u.par_chunks(TASK)))
        .for_each(|(o, (g, u))| {
            sigmoid_into(o, g);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g * *o * u;
            }
        });
    out
}

/// The gradients `dg` and `du` of [`swiglu`] for `g` and `u`, given the output's gradient `d`.
fn swiglu_grad(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], d: &[f32]) {
    dg.par_chunks_mut(TASK)
        .zip(du.par_chunks_mut(TASK))
        .zip(
            g.par_chunks(TASK)
                .zip(u.par_chunks(TASK))
                .zip(d.par_chunks(TASK)),
        )
        .for_each(|((dg, du), ((g, u), d))| {
            // `du` holds the sigmoid until each element's own gradient replaces it.
            sigmoid_into(du, g);
            for i in 0..dg.len() {
                let s = du[i];
                dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                du[i] = d[i] * g[i] * s;
            }
        });
}

/// `silu(x @ w_gate^T) * (x @ w_up^T)` for `x (..., k)` and weights `(n, k)`, shaped `(..., n)`.
/// Its backward hands back `x`'s gradient already summed over both projections, so the graph
/// holds one node where the composed form holds three, each with a zeroed accumulator and a sum
/// in every backward: 6 MB a layer for SmolLM2 at 4 x 128 tokens.
pub struct GatedUp {
    gate: Linear,
    up: Linear,
    /// Whether a backward will follow, so the forward keeps the projections for it.
    keep: bool,
    /// The gate and up projections, kept by a forward that a backward follows.
    kept: OnceLock<(Vec<f32>, Vec<f32>)>,
}

impl GatedUp {
    /// The op over the two weights, reading their quantized blocks, where they have them, for
    /// few-row products; with `keep` (a backward will follow) the forward keeps the projections.
    pub fn new(gate: Option<Arc<QuantRows>>, up: Option<Arc<QuantRows>>, keep: bool) -> Self {
        GatedUp {
            gate: Linear::new(gate),
            up: Linear::new(up),
            keep,
            kept: OnceLock::new(),
        }
    }
}

impl CustomOp3 for GatedUp {
    fn name(&self) -> &'static str {
        "locus-gated-up"
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
        same_shape("gated up", ("gate weight", "up weight"), l2, l3)?;
        let (rows, m, n, k, shape) = Linear::shapes(l1, l2)?;
        // Both projections read one input: packed once for both.
        let packed = Linear::pack(slice(s1, &rows, "gated up input")?, m, n, k);
        if let (Some(packed), false) = (&packed, self.keep) {
            // No backward follows: the product's tiles apply the activation themselves (and are
            // a serving learner's pause points).
            let (gate, up) = (slice(s2, l2, "gate weight")?, slice(s3, l3, "up weight")?);
            let out = packed.gated_times_t(gate, up, n);
            return Ok((CpuStorage::F32(out), shape));
        }
        let (gate, _) = self.gate.product(s1, l1, s2, l2, packed.as_ref())?;
        let (up, _) = self.up.product(s1, l1, s3, l3, packed.as_ref())?;
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (gate, up) else {
            bail!("gated up: projections are not f32");
        };
        let out = swiglu(&gate, &up);
        if self.keep && self.kept.set((gate, up)).is_err() {
            bail!("gated up: one op instance applied twice");
        }
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w_gate: &Tensor,
        w_up: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((gate, up)) = self.kept.get() else {
            bail!("gated up: a backward through a forward that kept nothing for it");
        };
        let grad = grad.contiguous()?;
        let (mut dg, mut du) = (vec![0f32; gate.len()], vec![0f32; gate.len()]);
        {
            let (storage, layout) = grad.storage_and_layout();
            let d = cpu_data(&storage, layout, "gated up gradient")?;
            swiglu_grad(&mut dg, &mut du, gate, up, d);
        }
        let part = |d: Vec<f32>| Tensor::from_vec(d, res.shape(), res.device());
        let (dx_gate, dw_gate) = Linear::backward(x, w_gate, &part(dg)?)?;
        let (dx_up, dw_up) = Linear::backward(x, w_up, &part(du)?)?;
        let dx = match (dx_gate, dx_up) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        };
        Ok((dx, dw_gate, dw_up))
    }
}
