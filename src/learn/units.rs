//! Sub-layer localization: within each trainable layer group only the units (attention query
//! heads, MLP neurons) whose relative span-gradient norm is above their group's mean change.
//!
//! A unit's relative norm is the span-loss gradient norm of the slices it owns divided by the
//! full-loss gradient norm of the same slices. Under grouped-query attention a key/value head is
//! shared by several query heads, so its rows count towards no unit's norm and change when any
//! query head sharing it is selected.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::engine::blend;
use crate::error::{Error, Result};
use crate::model::{GroupId, Model, ParamKind, UnitSlices};

/// Where the units of every layer group lie in the model's parameters.
pub struct UnitLayout {
    /// Parameters that units own, with their group and slicing.
    params: BTreeMap<String, (GroupId, UnitSlices)>,
    /// Units per group.
    counts: BTreeMap<GroupId, usize>,
}

impl UnitLayout {
    /// The layout of `model`'s units; refused for an architecture that does not split into units.
    pub fn of(model: &Model) -> Result<Self> {
        let mut params = BTreeMap::new();
        let mut counts = BTreeMap::new();
        for (name, var) in &model.vars {
            let (Some(ParamKind::Group(g)), Some(s)) =
                (model.arch.kind_of(name), model.arch.unit_slices(name))
            else {
                continue;
            };
            let units = var.dims()[s.axis] / s.width * s.share;
            if *counts.entry(g).or_insert(units) != units {
                return Err(Error::Invalid(format!(
                    "`{name}` splits into {units} units, unlike the rest of group {g}"
                )));
            }
            params.insert(name.clone(), (g, s));
        }
        if params.is_empty() {
            return Err(Error::Invalid(format!(
                "strategy modifier `+units` splits Llama-family layers into attention heads and MLP \
                 neurons; architecture `{}` is not supported",
                model.arch.name()
            )));
        }
        Ok(UnitLayout { params, counts })
    }

    /// Squared gradient norm of the slices each unit owns alone, per group in unit order.
    pub fn squared_norms(
        &self,
        model: &Model,
        grads: &GradStore,
    ) -> Result<BTreeMap<GroupId, Vec<f64>>> {
        let mut out: BTreeMap<GroupId, Vec<f64>> = self
            .counts
            .iter()
            .map(|(&g, &n)| (g, vec![0.0; n]))
            .collect();
        for (name, &(g, s)) in &self.params {
            let grad = match grads.get(model.vars[name].as_tensor()) {
                Some(grad) if s.share == 1 => grad,
                _ => continue,
            };
            let sq = grad.sqr()?;
            let per_index = match grad.rank() {
                1 => sq,
                _ => sq.sum(1 - s.axis)?,
            };
            let runs = per_index.reshape(((), s.width))?.sum(1)?;
            let units = out.entry(g).or_default();
            for (unit, v) in units.iter_mut().zip(runs.to_vec1::<f32>()?) {
                *unit += f64::from(v);
            }
        }
        Ok(out)
    }

    /// For each owned parameter, 1 on the elements of the selected units, broadcast to its shape.
    fn masks(
        &self,
        model: &Model,
        selected: &BTreeMap<GroupId, Vec<bool>>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, &(g, s)) in &self.params {
            let var = &model.vars[name];
            let chosen = &selected[&g];
            let along: Vec<u8> = (0..var.dims()[s.axis])
                .map(|i| {
                    let run = i / s.width;
                    u8::from(chosen[run * s.share..(run + 1) * s.share].contains(&true))
                })
                .collect();
            let mut shape = vec![1; var.rank()];
            shape[s.axis] = along.len();
            let mask = Tensor::from_vec(along, shape, var.device())?.broadcast_as(var.shape())?;
            out.insert(name.clone(), mask);
        }
        Ok(out)
    }
}

/// The units' norms and the masks of the units selected from them.
pub struct Units {
    layout: UnitLayout,
    /// `(span, full)` norm of each unit per group: from the last trace or a moving average.
    norms: Option<BTreeMap<GroupId, Vec<(f64, f64)>>>,
    /// Which units are selected, per group.
    selected: BTreeMap<GroupId, Vec<bool>>,
    /// Per owned parameter, where its selected units lie.
    masks: BTreeMap<String, Tensor>,
}

impl Units {
    /// No units measured yet for `model`; refused for an architecture without units.
    pub fn new(model: &Model) -> Result<Self> {
        Ok(Units {
            layout: UnitLayout::of(model)?,
            norms: None,
            selected: BTreeMap::new(),
            masks: BTreeMap::new(),
        })
    }

    /// Whether units have been measured, so masks exist.
    pub fn measured(&self) -> bool {
        self.norms.is_some()
    }

    /// The `(span, full)` norms the selection follows, per group in unit order.
    pub fn norms(&self) -> Option<&BTreeMap<GroupId, Vec<(f64, f64)>>> {
        self.norms.as_ref()
    }

    /// Folds one trace's gradients into the norms (weight `ema` on the past) and reselects.
    pub fn observe(
        &mut self,
        model: &Model,
        span: &GradStore,
        full: &GradStore,
        ema: f64,
    ) -> Result<()> {
        let span = self.layout.squared_norms(model, span)?;
        let full = self.layout.squared_norms(model, full)?;
        let norms = span
            .iter()
            .map(|(g, s)| {
                let now = s.iter().zip(&full[g]).map(|(s, f)| (s.sqrt(), f.sqrt()));
                let units = match self.norms.as_ref().and_then(|p| p.get(g)) {
                    Some(past) if ema > 0.0 => {
                        now.zip(past).map(|(n, &p)| blend(ema, p, n)).collect()
                    }
                    _ => now.collect(),
                };
                (*g, units)
            })
            .collect();
        self.restore(model, norms)
    }

    /// Takes over norms measured earlier (a checkpoint's) and reselects; refused when they do not
    /// fit the model's units.
    pub fn restore(
        &mut self,
        model: &Model,
        norms: BTreeMap<GroupId, Vec<(f64, f64)>>,
    ) -> Result<()> {
        let fits = norms.len() == self.layout.counts.len()
            && norms
                .iter()
                .all(|(g, n)| self.layout.counts.get(g) == Some(&n.len()));
        if !fits {
            return Err(Error::Invalid("unit norms do not fit this model".into()));
        }
        self.selected = norms.iter().map(|(&g, n)| (g, above_mean(n))).collect();
        self.masks = self.layout.masks(model, &self.selected)?;
        self.norms = Some(norms);
        Ok(())
    }

    /// Where the selected units of parameter `name` lie; `None` when no unit owns it or units
    /// have not been measured yet, either way a parameter that must not change.
    pub fn mask(&self, name: &str) -> Option<&Tensor> {
        self.masks.get(name)
    }

    /// Units selected and units in all, over `groups`.
    pub fn count<'a>(&self, groups: impl IntoIterator<Item = &'a GroupId>) -> (usize, usize) {
        groups.into_iter().fold((0, 0), |(sel, all), g| {
            let chosen = self
                .selected
                .get(g)
                .map_or(0, |c| c.iter().filter(|&&b| b).count());
            (
                sel + chosen,
                all + self.layout.counts.get(g).copied().unwrap_or(0),
            )
        })
    }
}

/// Units whose relative norm (span / full) is above the mean relative norm of `norms`.
fn above_mean(norms: &[(f64, f64)]) -> Vec<bool> {
    let relative: Vec<f64> = norms
        .iter()
        .map(|&(s, f)| if f > 0.0 { s / f } else { 0.0 })
        .collect();
    let mean = relative.iter().sum::<f64>() / relative.len().max(1) as f64;
    relative.iter().map(|&r| r > mean).collect()
}

/// The gradient with everything outside `mask` zeroed.
pub fn mask_gradient(mask: Option<&Tensor>, grad: Tensor) -> Result<Tensor> {
    Ok(match mask {
        Some(m) => m.where_cond(&grad, &grad.zeros_like()?)?,
        None => grad,
    })
}

/// Runs an optimizer `update` of `var`, then puts back every element outside `mask`: momentum
/// from earlier steps (and weight decay) would otherwise move unselected units.
pub fn confine(
    var: &Var,
    mask: Option<&Tensor>,
    update: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let Some(mask) = mask else {
        return update();
    };
    let old = var.as_detached_tensor().copy()?;
    update()?;
    let new = var.as_detached_tensor();
    // A select rather than `old + mask * (new - old)`, which turns a stored -0.0 into 0.0.
    var.set(&mask.where_cond(&new, &old)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_above_the_mean_relative_norm_are_selected() {
        let norms = [(1.0, 1.0), (1.0, 4.0), (0.0, 0.0), (3.0, 2.0)];
        assert_eq!(above_mean(&norms), [true, false, false, true]);
        assert_eq!(above_mean(&[(1.0, 1.0), (2.0, 2.0)]), [false, false]);
    }
}
