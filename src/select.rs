//! Which layer groups to update: TGL-FP, top-k, random-k, all; and TGL-ALR learning-rate scales.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::GroupId;
use crate::trace::GroupStat;

/// A selection rule over relative gradient norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Groups whose relative norm is above the mean over groups.
    TglFp,
    /// The `k` groups with the highest relative norm.
    TopK(usize),
    /// `k` groups drawn uniformly with a seed: the control.
    RandomK {
        /// How many groups.
        k: usize,
        /// The seed of the draw.
        seed: u64,
    },
    /// Every group.
    All,
}

impl Rule {
    /// Builds a rule from its name (`tgl-fp`, `topk`, `random-k`, `all`) and its settings.
    pub fn parse(name: &str, k: Option<usize>, seed: u64) -> Result<Self> {
        let need_k = || k.ok_or_else(|| Error::Invalid(format!("rule `{name}` needs --k")));
        Ok(match name {
            "tgl-fp" => Rule::TglFp,
            "topk" | "top-k" => Rule::TopK(need_k()?),
            "random-k" => Rule::RandomK { k: need_k()?, seed },
            "all" => Rule::All,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown selection rule `{other}` (tgl-fp, topk, random-k, all)"
                )))
            }
        })
    }
}

/// Mean relative norm over groups.
pub fn mean_relative(groups: &[GroupStat]) -> f64 {
    if groups.is_empty() {
        return 0.0;
    }
    groups.iter().map(|g| g.relative).sum::<f64>() / groups.len() as f64
}

/// The groups a rule picks, in layer order.
pub fn select(groups: &[GroupStat], rule: Rule) -> Vec<GroupId> {
    let mut picked: Vec<GroupId> = match rule {
        Rule::TglFp => {
            let mean = mean_relative(groups);
            groups
                .iter()
                .filter(|g| g.relative > mean)
                .map(GroupStat::id)
                .collect()
        }
        Rule::TopK(k) => {
            let mut sorted: Vec<&GroupStat> = groups.iter().collect();
            sorted.sort_by(|a, b| b.relative.total_cmp(&a.relative).then(a.id().cmp(&b.id())));
            sorted.into_iter().take(k).map(GroupStat::id).collect()
        }
        Rule::RandomK { k, seed } => {
            let mut ids: Vec<GroupId> = groups.iter().map(GroupStat::id).collect();
            ids.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            ids.truncate(k);
            ids
        }
        Rule::All => groups.iter().map(GroupStat::id).collect(),
    };
    picked.sort();
    picked
}

/// One group's TGL-ALR learning-rate scale.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scale {
    /// The group.
    #[serde(flatten)]
    pub group: GroupId,
    /// `relative / mean(relative)`.
    pub scale: f64,
}

/// TGL-ALR: each group's learning rate is scaled by its relative norm over the mean relative norm.
pub fn alr_scales(groups: &[GroupStat]) -> Vec<Scale> {
    let mean = mean_relative(groups);
    groups
        .iter()
        .map(|g| Scale {
            group: g.id(),
            scale: if mean > 0.0 { g.relative / mean } else { 1.0 },
        })
        .collect()
}

/// What `locus trace` reports about selection.
#[derive(Debug, Clone, Serialize)]
pub struct SelectionReport {
    /// Mean relative norm over groups (the TGL-FP threshold).
    pub mean_relative: f64,
    /// Groups TGL-FP trains.
    pub tgl_fp: Vec<GroupId>,
    /// TGL-ALR scales, every group.
    pub alr_scales: Vec<Scale>,
}

/// The selection summary for a trace.
pub fn report(groups: &[GroupStat]) -> SelectionReport {
    SelectionReport {
        mean_relative: mean_relative(groups),
        tgl_fp: select(groups, Rule::TglFp),
        alr_scales: alr_scales(groups),
    }
}
