//! Published versions: what a writer leaves in a shared store for readers to follow.
//!
//! The store holds `deltas/<version>.delta`, one per applied update with only the groups it
//! changed (in the checkpoint file format, its parent version in the metadata), and
//! `checkpoints/<version>.ckpt`, copies of the writer's checkpoints (every group changed since
//! the base model). A reader applies the deltas whose parent is the version it serves; one that
//! starts late or finds a gap loads the newest checkpoint and goes on from there. Every file is
//! written under a temporary name and renamed, so a reader never sees half of one.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::checkpoint::{self, encode, list_versions, write_atomic, Found, Meta};
use super::{Result, StoreError};

const DELTA_EXT: &str = "delta";

/// A store directory of published versions.
#[derive(Debug, Clone)]
pub struct Published {
    dir: PathBuf,
}

impl Published {
    /// The store at `dir` (for a writer: created if missing).
    pub fn open(dir: PathBuf, create: bool) -> Result<Published> {
        if create {
            for sub in ["deltas", "checkpoints"] {
                let d = dir.join(sub);
                fs::create_dir_all(&d).map_err(|e| StoreError::io(&d, e))?;
            }
        }
        Ok(Published { dir })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn deltas(&self) -> PathBuf {
        self.dir.join("deltas")
    }

    fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    /// Publishes the update to `meta.version` (groups and tensors it changed); returns its size.
    pub fn delta(&self, meta: &Meta, tensors: &BTreeMap<String, Tensor>) -> Result<u64> {
        let bytes = encode(meta, tensors)?;
        let path = self
            .deltas()
            .join(format!("{:020}.{DELTA_EXT}", meta.version));
        write_atomic(&path, &bytes)?;
        Ok(bytes.len() as u64)
    }

    /// Publishes the checkpoint file at `source` as version `version`, keeps the newest `keep`
    /// published checkpoints, and removes the deltas that the oldest kept one already covers.
    pub fn checkpoint(&self, source: &Path, version: u64, keep: usize) -> Result<u64> {
        let bytes = fs::read(source).map_err(|e| StoreError::io(source, e))?;
        let path = self.checkpoints().join(source.file_name().map_or_else(
            || format!("{version:020}.ckpt").into(),
            |n| n.to_os_string(),
        ));
        write_atomic(&path, &bytes)?;
        let kept = checkpoint::list_in(&self.checkpoints())?;
        for (_, old) in kept.iter().skip(keep.max(1)) {
            remove(old)?;
        }
        if let Some(&(oldest, _)) = kept.iter().take(keep.max(1)).next_back() {
            for (v, delta) in list_versions(&self.deltas(), DELTA_EXT)? {
                if v <= oldest {
                    remove(&delta)?;
                }
            }
        }
        Ok(bytes.len() as u64)
    }

    /// The newest published version (0 where nothing is published).
    pub fn newest_version(&self) -> Result<u64> {
        let newest = |found: Vec<(u64, PathBuf)>| found.first().map_or(0, |c| c.0);
        Ok(newest(list_versions(&self.deltas(), DELTA_EXT)?)
            .max(newest(checkpoint::list_in(&self.checkpoints())?)))
    }

    /// The newest published checkpoint that verifies, and the errors of newer ones that did not.
    pub fn newest_checkpoint(&self, device: &Device) -> Result<Found> {
        checkpoint::newest_readable(&self.checkpoints(), device)
    }

    /// Published deltas after `version`, oldest first.
    pub fn deltas_after(&self, version: u64) -> Result<Vec<(u64, PathBuf)>> {
        let mut found: Vec<_> = list_versions(&self.deltas(), DELTA_EXT)?
            .into_iter()
            .filter(|(v, _)| *v > version)
            .collect();
        found.reverse();
        Ok(found)
    }
}

/// Removes a published file that may already be gone.
fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::io(path, e)),
        _ => Ok(()),
    }
}
