//! AdamW with decoupled weight decay, holding state only for parameters that have been trained.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::error::Result;

/// First and second moments and the step count of one parameter.
struct Moments {
    m: Tensor,
    v: Tensor,
    steps: i32,
}

/// AdamW state, created lazily per parameter on its first update.
pub struct AdamW {
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    state: BTreeMap<String, Moments>,
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

    /// One update of `var` with gradient `grad` at learning rate `lr`, as torch.optim.AdamW.
    pub fn update(&mut self, name: &str, var: &Var, grad: &Tensor, lr: f64) -> Result<()> {
        let (b1, b2) = self.betas;
        let st = match self.state.get_mut(name) {
            Some(s) => s,
            None => {
                let zeros = grad.zeros_like()?;
                self.state.entry(name.to_string()).or_insert(Moments {
                    m: zeros.clone(),
                    v: zeros,
                    steps: 0,
                })
            }
        };
        st.steps += 1;
        st.m = ((&st.m * b1)? + (grad * (1.0 - b1))?)?;
        st.v = ((&st.v * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
        let c1 = 1.0 - b1.powi(st.steps);
        let c2 = 1.0 - b2.powi(st.steps);
        let w = var.as_detached_tensor();
        let decayed = if self.weight_decay > 0.0 {
            (&w * (1.0 - lr * self.weight_decay))?
        } else {
            w
        };
        let step = ((&st.m / c1)? / ((&st.v / c2)?.sqrt()? + self.eps)?)?;
        var.set(&(decayed - (step * lr)?)?)?;
        Ok(())
    }

    /// Number of parameters holding state.
    pub fn tracked(&self) -> usize {
        self.state.len()
    }

    /// Elements of optimizer state held.
    pub fn state_elements(&self) -> usize {
        self.state.values().map(|s| 2 * s.m.elem_count()).sum()
    }
}
