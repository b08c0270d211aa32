//! Published versions: what a writer leaves in a shared store for readers to follow.
//!
//! The store holds `deltas/<version>.delta`, one per applied update with only the groups it
//! changed (in the checkpoint file format, its parent version in the metadata), and
//! `checkpoints/<version>.ckpt`, copies of the writer's checkpoints (every group changed since
//! the base model). A reader applies the deltas whose parent is the version it serves; one that
//! starts late or finds a gap loads the newest checkpoint and goes on from there. Every file is
//! written whole (renamed into place in a directory, one put in object storage), so a reader
//! never sees half of one.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::checkpoint::{decode, encode, version_of, Checkpoint, Meta, EXT};
use super::location::Location;
use super::{Result, StoreError};

const DELTAS: &str = "deltas";
const DELTA_EXT: &str = "delta";
const CHECKPOINTS: &str = "checkpoints";

/// A store of published versions: a shared directory or an object-store prefix.
#[derive(Debug, Clone)]
pub struct Published {
    at: Location,
}

impl Published {
    /// The store `spec` names (see [`Location::parse`]).
    pub fn open(spec: &str) -> Result<Published> {
        Location::parse(spec).map(|at| Published { at })
    }

    /// The store as given, for logs and errors.
    pub fn url(&self) -> &str {
        self.at.url()
    }

    /// Publishes the update to `meta.version` (groups and tensors it changed); returns its size.
    pub fn delta(&self, meta: &Meta, tensors: &BTreeMap<String, Tensor>) -> Result<u64> {
        let bytes = encode(meta, tensors)?;
        let size = bytes.len() as u64;
        self.at.put(&delta_name(meta.version), bytes)?;
        Ok(size)
    }

    /// Publishes the checkpoint file at `source` as version `version`, keeps the newest `keep`
    /// published checkpoints, and removes the deltas that the oldest kept one already covers.
    pub fn checkpoint(&self, source: &Path, version: u64, keep: usize) -> Result<u64> {
        let size = self.at.put_file(&checkpoint_name(version), source)?;
        let kept = self.versions(CHECKPOINTS, EXT)?;
        for old in kept.iter().skip(keep.max(1)) {
            self.at.delete(&checkpoint_name(*old))?;
        }
        if let Some(&oldest) = kept.iter().take(keep.max(1)).next_back() {
            for v in self.versions(DELTAS, DELTA_EXT)? {
                if v <= oldest {
                    self.at.delete(&delta_name(v))?;
                }
            }
        }
        Ok(size)
    }

    /// Versions of the files `<version>.<ext>` in `dir`, newest first.
    fn versions(&self, dir: &str, ext: &str) -> Result<Vec<u64>> {
        let mut found: Vec<u64> = self
            .at
            .list(dir)?
            .iter()
            .filter_map(|name| version_of(name, ext))
            .collect();
        found.sort_by_key(|v| std::cmp::Reverse(*v));
        Ok(found)
    }

    /// What the store holds now (two listings).
    pub fn list(&self) -> Result<Listing> {
        Ok(Listing {
            deltas: self.versions(DELTAS, DELTA_EXT)?,
            checkpoints: self.versions(CHECKPOINTS, EXT)?,
        })
    }

    /// The newest checkpoint in `listing` after `version` that verifies, and the errors of newer
    /// ones that did not. Only those newer than `version` are read, so a reader that is up to
    /// date downloads nothing.
    pub fn newest_checkpoint_after(
        &self,
        listing: &Listing,
        version: u64,
        device: &Device,
    ) -> Result<(Option<Checkpoint>, Vec<StoreError>)> {
        let mut failed = Vec::new();
        for &v in listing.checkpoints.iter().take_while(|v| **v > version) {
            match self.read(&checkpoint_name(v), device) {
                Ok(c) => return Ok((Some(c), failed)),
                Err(e) => failed.push(e),
            }
        }
        Ok((None, failed))
    }

    /// The published delta to `version`, verified.
    pub fn delta_to(&self, version: u64, device: &Device) -> Result<Checkpoint> {
        self.read(&delta_name(version), device)
    }

    fn read(&self, name: &str, device: &Device) -> Result<Checkpoint> {
        decode(&self.at.describe(name), &self.at.get(name)?, device)
    }
}

/// The versions a store holds, newest first.
#[derive(Debug, Clone)]
pub struct Listing {
    /// Versions of the published deltas.
    pub deltas: Vec<u64>,
    /// Versions of the published checkpoints.
    pub checkpoints: Vec<u64>,
}

impl Listing {
    /// The newest published version (0 where nothing is published).
    pub fn newest(&self) -> u64 {
        let first = |found: &[u64]| found.first().copied().unwrap_or(0);
        first(&self.deltas).max(first(&self.checkpoints))
    }

    /// Whether a reader can reach `version` from these files: the newest checkpoint (or the base
    /// model) and a delta to each version after it, up to `version`.
    pub fn reaches(&self, version: u64) -> bool {
        let from = self.checkpoints.first().copied().unwrap_or(0);
        (from + 1..=version).all(|v| self.deltas.contains(&v))
    }

    /// The first delta after `version`, if any.
    pub fn delta_after(&self, version: u64) -> Option<u64> {
        self.deltas.iter().rev().copied().find(|v| *v > version)
    }
}

fn delta_name(version: u64) -> String {
    format!("{DELTAS}/{version:020}.{DELTA_EXT}")
}

fn checkpoint_name(version: u64) -> String {
    format!("{CHECKPOINTS}/{version:020}.{EXT}")
}
