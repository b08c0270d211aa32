//! The SwiGLU activation `silu(gate) * up` as one op with its backward: composed, it is three
//! nodes whose backward allocates a zeroed accumulator and a sum for each, at the MLP's width.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::sigmoid_into;
use super::fused::slice;

/// Elements per parallel task.
const TASK: usize = 1 << 14;

fn same_shape(l1: &Layout, l2: &Layout) -> Result<()> {
    if l1.shape() != l2.shape() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            l1.shape(),
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
        same_shape(l1, l2)?;
        let (g, u) = (slice(s1, l1, "gate")?, slice(s2, l2, "up")?);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(TASK)
            .zip(g.par_chunks(TASK).zip(u.par_chunks(TASK)))
            .for_each(|(o, (g, u))| {
                sigmoid_into(o, g);
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * *o * u;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
        same_shape(l1, l2)?;
        same_shape(l1, l3)?;
        let (g, u) = (slice(s1, l1, "gate")?, slice(s2, l2, "up")?);
        let d = slice(s3, l3, "grad")?;
        let mut out = vec![0f32; 2 * g.len()];
        let (dg, du) = out.split_at_mut(g.len());
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
        Ok((CpuStorage::F32(out), Shape::from(2 * g.len())))
    }
}
