//! AdamW with decoupled weight decay, holding state only for parameters trained lately: a
//! parameter not updated for [`STALE_AFTER`] steps (a group that left a per-batch selection) loses
//! its moments and starts afresh if it is trained again, so the state is bounded by the groups
//! trained in that window rather than growing towards every group a stream ever selected.
//!
//! On the CPU a step is two fused in-place passes (moments, then weight) instead of a dozen
//! allocating tensor ops over every trainable element.

use std::collections::BTreeMap;

use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::fused::{slice, slice_mut};

/// First and second moments `(2, n)` and the step count of one parameter.
pub struct Moments {
    /// Row 0 the first moment, row 1 the second, each flattened.
    pub state: Tensor,
    /// Updates taken (for the bias corrections).
    pub steps: i32,
    /// Optimizer steps ended since the last update.
    pub idle: u64,
}

/// What one update changed, kept so that it can be reverted: each parameter's weights and
/// moments from before it.
#[derive(Default)]
pub struct Undo {
    saved: Vec<Saved>,
}

/// One parameter as it was before an update.
struct Saved {
    name: String,
    var: Var,
    weights: Tensor,
    /// `None`: the update created the parameter's state.
    moments: Option<Moments>,
}

/// Optimizer steps a parameter's state outlives its last update.
pub const STALE_AFTER: u64 = 64;

/// AdamW state, created lazily per parameter on its first update.
pub struct AdamW {
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    state: BTreeMap<String, Moments>,
}

/// Elements per parallel piece of an optimizer pass: a weight of the default model (110k to 885k
/// entries) splits over the threads, a norm's few hundred stay in one piece.
const CHUNK: usize = 1 << 15;

/// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2` on the `(2, n)` state, in place.
struct MomentsStep {
    b1: f32,
    b2: f32,
    /// The state was just created: its pages fault in on this first pass, which is slower split
    /// over threads (measured: 0.33 s serial, 0.63-0.81 s on two threads for a third of the
    /// default model's groups) than in one.
    fresh: bool,
}

impl InplaceOp2 for MomentsStep {
    fn name(&self) -> &'static str {
        "locus-adamw-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let state = slice_mut(s1, l1, "adamw state")?;
        let g = slice(s2, l2, "adamw gradient")?;
        let (m, v) = state.split_at_mut(g.len());
        let step = |((m, v), g): ((&mut [f32], &mut [f32]), &[f32])| {
            // A learner that serves queries pauses here, within a chunk's time of a query.
            crate::model::turns::yield_to_foreground();
            for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                *m = self.b1 * *m + (1.0 - self.b1) * g;
                *v = self.b2 * *v + (1.0 - self.b2) * g * g;
            }
        };
        if self.fresh {
            let chunks = m.chunks_mut(CHUNK).zip(v.chunks_mut(CHUNK));
            chunks.zip(g.chunks(CHUNK)).for_each(step);
        } else {
            let chunks = m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK));
            chunks.zip(g.par_chunks(CHUNK)).for_each(step);
        }
        Ok(())
    }
}

/// `w = w (1 - lr wd) - lr (m / c1) / (sqrt(v / c2) + eps)`, in place.
struct WeightStep {
    lr: f32,
    decay: f32,
    c1: f32,
    c2: f32,
    eps: f32,
}

impl InplaceOp2 for WeightStep {
    fn name(&self) -> &'static str {
        "locus-adamw-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let w = slice_mut(s1, l1, "adamw weight")?;
        let state = slice(s2, l2, "adamw state")?;
        let (m, v) = state.split_at(w.len());
        let chunks = w.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK));
        chunks.zip(v.par_chunks(CHUNK)).for_each(|((w, m), v)| {
            // As in `MomentsStep`: a serving learner's pause point.
            crate::model::turns::yield_to_foreground();
            for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                *w = *w * self.decay - self.lr * (m / self.c1) / ((v / self.c2).sqrt() + self.eps);
            }
        });
        Ok(())
    }
}

impl AdamW {
    /// An optimizer with no state yet.
    pub fn new(betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        AdamW {
            betas,
            eps,
            weight_decay,
            state: BTreeMap::new(),
        }
    }

    /// Ends an optimizer step: the state of parameters not updated in the last [`STALE_AFTER`]
    /// steps is dropped. Answers how many parameters lost theirs.
    pub fn end_step(&mut self) -> usize {
        let before = self.state.len();
        self.state.retain(|_, m| {
            m.idle += 1;
            m.idle <= STALE_AFTER
        });
        before - self.state.len()
    }

    /// One update of `var` with gradient `grad` at learning rate `lr`, as torch.optim.AdamW.
    pub fn update(&mut self, name: &str, var: &Var, grad: &Tensor, lr: f64) -> Result<()> {
        let (b1, b2) = self.betas;
        let n = grad.elem_count();
        let st = match self.state.get_mut(name) {
            Some(s) => s,
            None => {
                let state = Tensor::zeros((2, n), grad.dtype(), grad.device())?;
                self.state.entry(name.to_string()).or_insert(Moments {
                    state,
                    steps: 0,
                    idle: 0,
                })
            }
        };
        st.steps += 1;
        st.idle = 0;
        let c1 = 1.0 - b1.powi(st.steps);
        let c2 = 1.0 - b2.powi(st.steps);
        let decay = 1.0 - lr * self.weight_decay;
        let g = grad.flatten_all()?.contiguous()?;
        if var.device().is_cpu() && var.as_tensor().is_contiguous() {
            st.state.inplace_op2(
                &g,
                &MomentsStep {
                    b1: b1 as f32,
                    b2: b2 as f32,
                    fresh: st.steps == 1,
                },
            )?;
            let w = var.as_detached_tensor().flatten_all()?;
            let step = WeightStep {
                lr: lr as f32,
                decay: decay as f32,
                c1: c1 as f32,
                c2: c2 as f32,
                eps: self.eps as f32,
            };
            w.inplace_op2(&st.state, &step)?;
            return Ok(());
        }
        let m = ((st.state.get(0)? * b1)? + (&g * (1.0 - b1))?)?;
        let v = ((st.state.get(1)? * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
        let w = (var.as_detached_tensor().flatten_all()? * decay)?;
        var.set(&(w - (step * lr)?)?.reshape(var.shape())?)?;
        st.state = Tensor::stack(&[m, v], 0)?;
        Ok(())
    }

    /// A copy of every parameter's state, by name: for a state that outlives the next step.
    pub fn export(&self) -> Result<BTreeMap<String, Moments>> {
        self.moments(|t| Ok(t.copy()?))
    }

    /// Every parameter's state, by name, sharing the tensors that the next step updates in place.
    pub fn shared(&self) -> Result<BTreeMap<String, Moments>> {
        self.moments(|t| Ok(t.clone()))
    }

    fn moments(
        &self,
        take: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<BTreeMap<String, Moments>> {
        self.state
            .iter()
            .map(|(name, m)| {
                Ok((
                    name.clone(),
                    Moments {
                        state: take(&m.state)?,
                        steps: m.steps,
                        idle: m.idle,
                    },
                ))
            })
            .collect()
    }

    /// Copies `var`'s weights and `name`'s moments into `undo`, before an update changes them;
    /// the update works in place, so only a copy survives it.
    pub fn save(&self, name: &str, var: &Var, undo: &mut Undo) -> Result<()> {
        let moments = match self.state.get(name) {
            Some(m) => Some(Moments {
                state: m.state.copy()?,
                steps: m.steps,
                idle: m.idle,
            }),
            None => None,
        };
        undo.saved.push(Saved {
            name: name.to_string(),
            var: var.clone(),
            weights: var.as_tensor().copy()?,
            moments,
        });
        Ok(())
    }

    /// Puts back the weights and moments `undo` saved.
    pub fn revert(&mut self, undo: Undo) -> Result<()> {
        for saved in undo.saved {
            saved.var.set(&saved.weights)?;
            match saved.moments {
                Some(m) => self.state.insert(saved.name, m),
                None => self.state.remove(&saved.name),
            };
        }
        Ok(())
    }

    /// Replaces the state with an exported one.
    pub fn import(&mut self, state: BTreeMap<String, Moments>) {
        self.state = state;
    }

    /// Number of parameters holding state.
    pub fn tracked(&self) -> usize {
        self.state.len()
    }

    /// Elements of optimizer state held.
    pub fn state_elements(&self) -> usize {
        self.state.values().map(|s| s.state.elem_count()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn state_of_a_parameter_left_untrained_is_dropped_after_the_window() {
        let mut opt = AdamW::new((0.9, 0.999), 1e-8, 0.0);
        let var = |v: f32| Var::from_tensor(&Tensor::full(v, 4, &Device::Cpu).unwrap()).unwrap();
        let (a, b) = (var(1.0), var(2.0));
        let grad = Tensor::full(0.5f32, 4, &Device::Cpu).unwrap();
        opt.update("a", &a, &grad, 1e-3).unwrap();
        opt.update("b", &b, &grad, 1e-3).unwrap();
        assert_eq!(opt.end_step(), 0);
        for _ in 1..STALE_AFTER {
            opt.update("a", &a, &grad, 1e-3).unwrap();
            assert_eq!(opt.end_step(), 0);
            assert_eq!(opt.tracked(), 2);
        }
        opt.update("a", &a, &grad, 1e-3).unwrap();
        assert_eq!(
            opt.end_step(),
            1,
            "b was not updated in the last {STALE_AFTER} steps"
        );
        assert_eq!(opt.tracked(), 1);
        // Trained again, it starts afresh: its first update is AdamW's first step (lr * sign).
        let before = b.as_tensor().to_vec1::<f32>().unwrap()[0];
        opt.update("b", &b, &grad, 1e-3).unwrap();
        let after = b.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((before - after - 1e-3).abs() < 1e-6, "{before} -> {after}");
    }
}
