//! Immutable snapshots of the weights that queries compute on, and the versions a server retains.
//!
//! The learner updates the model's variables in place, and a variable's detached tensor shares its
//! storage, so a snapshot holds *copies* of what learning writes: the first snapshot copies every
//! layer group's weights and shares the rest (embeddings, norms, an untied head), which nothing
//! writes after loading; each later one copies only the groups an update changed and shares every
//! other tensor with its predecessor.
//! A query takes the current snapshot once and computes entirely on it, so its answer belongs to
//! exactly one version, whatever the learner does meanwhile.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use candle_core::Tensor;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::fused::cpu_data;
use crate::model::quant::QuantRows;
use crate::model::{GroupId, Model, ParamKind, Params};

/// How a snapshot came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The weights as loaded.
    Loaded,
    /// A learning step.
    Update,
    /// A rollback to the weights of the given version.
    Rollback(u64),
}

/// One immutable model version.
pub struct Snapshot {
    version: u64,
    /// Architecture and tokenizer; the weights are `tensors`, never the model's live variables.
    model: Arc<Model>,
    tensors: BTreeMap<String, Tensor>,
    /// The quantized blocks of the tensors that equal the blocks they were loaded from.
    blocks: BTreeMap<String, Arc<QuantRows>>,
    params: Params,
    created: SystemTime,
    changed: Vec<GroupId>,
    origin: Origin,
}

impl Snapshot {
    fn build(
        version: u64,
        model: Arc<Model>,
        (tensors, blocks): (BTreeMap<String, Tensor>, BTreeMap<String, Arc<QuantRows>>),
        changed: Vec<GroupId>,
        origin: Origin,
    ) -> Self {
        Snapshot {
            version,
            model,
            params: Params::with_blocks(tensors.clone(), blocks.clone()),
            tensors,
            blocks,
            created: SystemTime::now(),
            changed,
            origin,
        }
    }

    /// The weights of `model` as version `version`: layer groups copied, the rest shared; each
    /// weight that still equals the quantized blocks it was loaded from keeps them.
    pub fn load(model: Arc<Model>, version: u64) -> Result<Self> {
        let tensors: BTreeMap<String, Tensor> = model
            .vars
            .iter()
            .map(|(name, var)| {
                let t = var.as_detached_tensor();
                let t = if model.never_written(name) {
                    t
                } else {
                    t.copy()?
                };
                Ok((name.clone(), t))
            })
            .collect::<Result<_>>()?;
        // A restored checkpoint or any other write since loading leaves the blocks behind.
        let equal = |name: &str, b: &QuantRows| {
            let (storage, layout) = tensors[name].storage_and_layout();
            cpu_data(&storage, layout, name).is_ok_and(|v| b.matches(v))
        };
        let blocks = model
            .blocks
            .par_iter()
            .filter(|(name, b)| tensors.contains_key(*name) && equal(name, b))
            .map(|(name, b)| (name.clone(), Arc::clone(b)))
            .collect();
        Ok(Self::build(
            version,
            model,
            (tensors, blocks),
            Vec::new(),
            Origin::Loaded,
        ))
    }

    /// The snapshot after an update that changed `changed`: those groups are copied from
    /// `weights` (the learner's weights as they now serve, adapters included), every other tensor
    /// is shared with `self`. Call it from the thread that updates the weights, between updates.
    pub fn after_update(
        &self,
        version: u64,
        changed: &[GroupId],
        weights: &Params,
    ) -> Result<Self> {
        let set: BTreeSet<GroupId> = changed.iter().copied().collect();
        let copied = |name: &str| matches!(self.model.arch.kind_of(name), Some(ParamKind::Group(g)) if set.contains(&g));
        let tensors = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let t = match copied(name) {
                    true => weights.get(name)?.detach().copy()?,
                    false => t.clone(),
                };
                Ok((name.clone(), t))
            })
            .collect::<Result<_>>()?;
        // An update changes every weight of a group it trains: their blocks no longer apply.
        let blocks = self
            .blocks
            .iter()
            .filter(|(name, _)| !copied(name))
            .map(|(name, b)| (name.clone(), Arc::clone(b)))
            .collect();
        Ok(Self::build(
            version,
            Arc::clone(&self.model),
            (tensors, blocks),
            set.into_iter().collect(),
            Origin::Update,
        ))
    }

    /// Writes this snapshot's weights back into the model's variables and returns the snapshot
    /// that serves them as `version`, sharing this one's tensors. `current` is the snapshot being
    /// replaced, to name the groups that differ. Call it from the thread that updates the variables.
    pub fn restore(&self, current: &Snapshot, version: u64) -> Result<Self> {
        // A tensor never written is the variable's own storage in every version.
        for (name, var) in self.model.written_vars() {
            var.set(&self.tensors[name])?;
        }
        // Shared tensors are identical; a tensor that is not shared belongs to a changed group.
        let changed: BTreeSet<GroupId> = self
            .tensors
            .iter()
            .filter(|(name, t)| current.tensors.get(*name).map(Tensor::id) != Some(t.id()))
            .filter_map(|(name, _)| match self.model.arch.kind_of(name) {
                Some(ParamKind::Group(g)) => Some(g),
                _ => None,
            })
            .collect();
        Ok(Self::build(
            version,
            Arc::clone(&self.model),
            (self.tensors.clone(), self.blocks.clone()),
            changed.into_iter().collect(),
            Origin::Rollback(self.version),
        ))
    }

    /// The tensors of `groups`, by parameter name.
    pub fn tensors_of(&self, groups: &[GroupId]) -> BTreeMap<String, Tensor> {
        self.tensors
            .iter()
            .filter(|(name, _)| {
                matches!(self.model.arch.kind_of(name),
                    Some(ParamKind::Group(g)) if groups.contains(&g))
            })
            .map(|(name, t)| (name.clone(), t.clone()))
            .collect()
    }

    /// Bytes of all its weights: what a full copy of the model would take.
    pub fn bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// The version number.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the snapshot was made.
    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// Groups whose weights differ from the previous version.
    pub fn changed(&self) -> &[GroupId] {
        &self.changed
    }

    /// How the snapshot came to be.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The model the snapshot belongs to (architecture and tokenizer).
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The snapshot's tensor called `name` (tests compare versions through it).
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The weights as the model's parameters, to compute on (see [`crate::infer`]).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// How many weights few-row products read from the quantized blocks they were loaded from.
    pub fn quantized_weights(&self) -> usize {
        self.blocks.len()
    }
}

/// The snapshot being served and the recent versions kept for rollback.
pub struct Snapshots {
    current: RwLock<Arc<Snapshot>>,
    history: Mutex<VecDeque<Arc<Snapshot>>>,
    keep: usize,
}

impl Snapshots {
    /// Serves `initial` and retains up to `keep` versions (at least the current one).
    pub fn new(initial: Snapshot, keep: usize) -> Self {
        let initial = Arc::new(initial);
        Snapshots {
            current: RwLock::new(Arc::clone(&initial)),
            history: Mutex::new(VecDeque::from([initial])),
            keep: keep.max(1),
        }
    }

    /// The snapshot to compute a query on; hold the `Arc` for the whole query.
    pub fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes `next` the served snapshot; versions only increase.
    pub fn publish(&self, next: Snapshot) -> Result<Arc<Snapshot>> {
        let next = Arc::new(next);
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
            if next.version <= current.version {
                return Err(Error::Invalid(format!(
                    "snapshot version {} does not follow the served version {}",
                    next.version, current.version
                )));
            }
            *current = Arc::clone(&next);
        }
        history.push_back(Arc::clone(&next));
        while history.len() > self.keep {
            history.pop_front();
        }
        Ok(next)
    }

    /// The retained versions, oldest first (the current one last).
    pub fn retained(&self) -> Vec<Arc<Snapshot>> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The retained snapshot of `version`, if any.
    pub fn get(&self, version: u64) -> Option<Arc<Snapshot>> {
        self.retained().into_iter().find(|s| s.version == version)
    }
}
