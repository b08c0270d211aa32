//! Rollback: a retained version, from memory or rebuilt from the data directory, served again as
//! a new version.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError};

use candle_core::Tensor;

use super::learner::Worker;
use super::{Error, Result};
use crate::model::{GroupId, ParamKind, Params};
use crate::snapshot::Snapshot;

impl Worker {
    pub(super) fn rollback(&mut self, version: u64) -> Result<(u64, u64)> {
        let snapshots = &self.setup.snapshots;
        let current = snapshots.current();
        let target = match snapshots.get(version) {
            Some(kept) => kept,
            None => Arc::new(self.rebuild(version, &current)?),
        };
        let next = current.version() + 1;
        let restored = target.restore(&current, next)?;
        // The optimizer moments and norms belonged to the abandoned weights; start afresh.
        self.learner = self.setup.learner(next)?;
        let published = snapshots.publish(restored)?;
        if let Some(store) = self.setup.store.as_mut() {
            // The journal cannot replay a rollback, so it is made durable by a checkpoint now.
            store.updated(published.changed().iter().copied());
            self.checkpoint().map_err(|e| Error::NotDurable {
                version,
                next,
                cause: Box::new(e),
            })?;
        }
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .selection
            .clear();
        Ok((next, version))
    }

    /// Version `version`, no longer in memory, rebuilt from the data directory: its checkpoint's
    /// groups, and the base model's weights for the other groups changed since (version 0 is the
    /// base model). Built on `current`, from the thread that owns the weights.
    fn rebuild(&self, version: u64, current: &Snapshot) -> Result<Snapshot> {
        let Some(store) = &self.setup.store else {
            return Err(self.unknown_version(version));
        };
        let device = self.setup.model.device();
        let (groups, mut tensors) = if version == 0 {
            (Vec::new(), BTreeMap::new())
        } else {
            match store.checkpoint_of(version, device)? {
                Some(c) => (c.meta.group_ids(), c.tensors),
                None => return Err(self.unknown_version(version)),
            }
        };
        let from_base: Vec<GroupId> = store
            .changed_since_base()
            .iter()
            .filter(|g| !groups.contains(g))
            .copied()
            .collect();
        if !from_base.is_empty() {
            tensors.extend(self.base_weights(&from_base, store.base_hash())?);
        }
        tracing::info!(
            version,
            from_checkpoint = groups.len(),
            from_base = from_base.len(),
            "rebuilding a version from the data directory"
        );
        let all: Vec<GroupId> = groups.into_iter().chain(from_base).collect();
        Ok(current.after_update(version, &all, &Params::from_map(tensors))?)
    }

    /// The base model's weights of `groups`, read again from where the model was loaded and
    /// checked against the hash the data directory was made with.
    fn base_weights(&self, groups: &[GroupId], hash: &str) -> Result<BTreeMap<String, Tensor>> {
        let source = &self.setup.model.source.path;
        let base = crate::model::load::load(source, self.setup.model.device())?;
        let found = crate::store::model_hash(&base)?;
        if found != hash {
            return Err(Error::BaseChanged {
                path: source.clone(),
                found,
                hash: hash.to_string(),
            });
        }
        let wanted: BTreeSet<GroupId> = groups.iter().copied().collect();
        Ok(base
            .vars
            .iter()
            .filter(|(name, _)| {
                matches!(base.arch.kind_of(name), Some(ParamKind::Group(g)) if wanted.contains(&g))
            })
            .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
            .collect())
    }

    /// The error for a version that can be restored neither from memory nor from disk.
    fn unknown_version(&self, version: u64) -> Error {
        let in_memory = self
            .setup
            .snapshots
            .retained()
            .iter()
            .map(|s| s.version().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut retained = format!("{in_memory} in memory");
        if let Some(store) = &self.setup.store {
            let on_disk = store.checkpoint_versions().unwrap_or_default();
            let on_disk: Vec<_> = on_disk.iter().rev().map(u64::to_string).collect();
            if !on_disk.is_empty() {
                retained += &format!("; {} as checkpoints", on_disk.join(", "));
            }
            retained += "; 0, the base model";
        }
        Error::UnknownVersion { version, retained }
    }
}
