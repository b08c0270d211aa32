//! Durability for the live service: a journal of accepted batches and checkpoints of what changed.
//!
//! A batch is journaled (and fsync'ed) before the learner applies it, and the client hears about
//! it only after both, so after a crash the newest good checkpoint plus the journal records after
//! it give back every acknowledged batch. Checkpoints hold only the layer groups that changed since
//! the base model, because localized updates touch few of them.

pub mod checkpoint;
pub mod journal;
pub mod location;
pub mod publish;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::learn::engine::LearnerState;
use crate::learn::history::Step;
use crate::model::{GroupId, Model};
use crate::snapshot::Snapshot;
use checkpoint::{Checkpoint, Checkpoints, Meta};
use journal::{Journal, Record};

/// A failure of the journal or the checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read, written or synced.
    #[error("{path}: {cause}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying failure.
        cause: io::Error,
    },
    /// A file failed its checksum or does not parse; it is not safe to use.
    #[error("{path}: corrupt: {reason}")]
    Corrupt {
        /// The file involved.
        path: PathBuf,
        /// What is wrong, with the byte offset where known.
        reason: String,
    },
    /// The data directory does not fit this model or has lost records.
    #[error("{0}")]
    Mismatch(String),
    /// A store location (`--store`) cannot be used as given.
    #[error("{location}: {reason}")]
    Location {
        /// The location as given.
        location: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// An object-store request failed (after the client's retries).
    #[error("{file}: {cause}")]
    Remote {
        /// The file involved, as a URL.
        file: String,
        /// The client's error.
        cause: Box<object_store::Error>,
    },
    /// Reading or writing tensors failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl StoreError {
    /// Whether a write failed for lack of space (or quota) rather than for a fault.
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            StoreError::Io { cause, .. }
                if matches!(cause.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
        )
    }

    /// What a client is told: the message, less the server's paths.
    pub fn client_message(&self) -> String {
        match self {
            StoreError::Io { .. } if self.is_full() => "data directory is full".into(),
            StoreError::Io { cause, .. } => format!("data directory: {cause}"),
            StoreError::Corrupt { path, reason } => format!(
                "data directory: {} is corrupt: {reason}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
            // Those with a path are refusals to start, which no client sees.
            StoreError::Mismatch(_) | StoreError::Location { .. } => self.to_string(),
            StoreError::Remote { cause, .. } => {
                format!("published store: {}", remote_reason(cause))
            }
            StoreError::Tensor(t) => format!("data directory: tensor: {t}"),
        }
    }

    fn io(path: &Path, cause: io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            cause,
        }
    }

    fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// What went wrong with an object-store request, in words a client may see: the client's own
/// messages can hold a directory store's paths or a request's URL, which go to the log only.
fn remote_reason(cause: &object_store::Error) -> String {
    use object_store::Error as E;
    match cause {
        E::NotFound { .. } => "a file is missing".into(),
        E::PermissionDenied { .. } => "permission denied".into(),
        E::Unauthenticated { .. } => "not authenticated (check the store's credentials)".into(),
        E::Generic { store, .. } => format!("a request to {store} failed (the log has details)"),
        _ => "a request failed (the log has details)".into(),
    }
}

/// Result with the store's error.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Fsyncs a directory so that a file created or renamed in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// The checkpoint folder of the data directory `dir`.
pub fn checkpoints_in(dir: &Path) -> PathBuf {
    dir.join("checkpoints")
}

/// Takes the data directory's lock, which the OS releases when the process ends, however it ends.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let file = File::create(&path).map_err(|e| StoreError::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Mismatch(format!(
            "{}: another locus serve is using this data directory",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::io(&path, e)),
    }
}

/// SHA-256 over every weight of `model` (name, shape, f32 values), as hex: what a data directory's
/// checkpoints are deltas against, whatever file format the model was loaded from.
pub fn model_hash(model: &Model) -> Result<String> {
    let mut h = Sha256::new();
    for (name, var) in &model.vars {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        for &d in var.dims() {
            h.update((d as u64).to_le_bytes());
        }
        let values: Vec<f32> = var
            .as_detached_tensor()
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        for v in values {
            h.update(v.to_le_bytes());
        }
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a server keeps its journal and checkpoints, and how often it checkpoints.
#[derive(Debug, Clone)]
pub struct Durability {
    /// The data directory.
    pub dir: PathBuf,
    /// Applied updates between checkpoints (0: only on shutdown, rollback and request).
    pub checkpoint_every: u64,
    /// Checkpoints retained, newest first (at least 1).
    pub keep_checkpoints: usize,
}

/// What a server restored from its data directory before serving.
pub struct Restored {
    /// The version the checkpoint restored (0 without one).
    pub version: u64,
    /// The checkpoint's metadata, if one was restored.
    pub checkpoint: Option<Meta>,
    /// The learner's state the checkpoint holds, to resume learning from.
    pub learner: Option<LearnerState>,
    /// Journal records after the checkpoint, to replay in order.
    pub replay: Vec<Record>,
    /// Checkpoints that failed verification and were set aside.
    pub rejected: Vec<PathBuf>,
    /// Bytes of a torn journal tail that were cut off.
    pub torn_bytes: u64,
}

/// A checkpoint just written.
#[derive(Debug, Clone)]
pub struct Written {
    /// Its metadata.
    pub meta: Meta,
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// The open data directory of a running server; owned by the learner thread.
pub struct Store {
    config: Durability,
    /// Held locked while the store is open: two servers appending to one journal would damage it.
    _lock: File,
    journal: Journal,
    checkpoints: Checkpoints,
    base_hash: String,
    strategy: String,
    /// Groups changed since the base model: what every checkpoint must hold.
    dirty: BTreeSet<GroupId>,
    /// The newest checkpoint's version, the parent of the next one.
    parent: Option<u64>,
    /// Journal sequence number the newest checkpoint covers.
    covered: u64,
    /// The last journal record whose batch has been learned.
    learned: u64,
    /// Applied updates since the newest checkpoint.
    since: u64,
}

impl Store {
    /// Opens (or creates) the data directory for `model`, writes the newest good checkpoint's
    /// weights into the model's variables, and returns the journal records still to replay.
    /// Call it before the first snapshot is taken.
    pub fn open(config: Durability, model: &Model, strategy: &str) -> Result<(Store, Restored)> {
        std::fs::create_dir_all(&config.dir).map_err(|e| StoreError::io(&config.dir, e))?;
        let lock = lock(&config.dir)?;
        let base_hash = model_hash(model)?;
        let checkpoints = Checkpoints::open(checkpoints_in(&config.dir))?;
        let (found, rejected) = checkpoints.newest_good(model.device())?;
        let (mut journal, records, torn_bytes) = Journal::open(config.dir.join("journal.log"))?;
        let mut dirty = BTreeSet::new();
        let mut restored_learner = None;
        let (version, covered, meta) = match found {
            Some(Checkpoint {
                meta,
                tensors,
                learner,
            }) => {
                restored_learner = learner;
                if meta.base_hash != base_hash {
                    return Err(StoreError::Mismatch(format!(
                        "{}: checkpoint {} was made on a model with hash {}, but this model's is {base_hash}; use another --data-dir",
                        config.dir.display(),
                        meta.version,
                        meta.base_hash
                    )));
                }
                for (name, t) in &tensors {
                    let var = model.vars.get(name).ok_or_else(|| {
                        StoreError::Mismatch(format!(
                            "checkpoint {} holds `{name}`, which the model lacks",
                            meta.version
                        ))
                    })?;
                    var.set(t)?;
                }
                dirty.extend(meta.group_ids());
                (meta.version, meta.journal_seq, Some(meta))
            }
            None => (0, 0, None),
        };
        let replay: Vec<Record> = records.into_iter().filter(|r| r.seq > covered).collect();
        if let Some(first) = replay.first() {
            if first.seq != covered + 1 {
                return Err(StoreError::Mismatch(format!(
                    "{}: the restored state covers journal records up to {covered}, but the journal resumes at {}; records in between are lost",
                    config.dir.display(),
                    first.seq
                )));
            }
        }
        // A journal shorter than the checkpoint (deleted by hand) must not reuse covered numbers.
        journal.skip_to(covered + 1);
        let store = Store {
            _lock: lock,
            checkpoints,
            journal,
            base_hash,
            strategy: strategy.to_string(),
            dirty,
            parent: meta.as_ref().map(|m| m.version),
            covered,
            learned: covered,
            since: 0,
            config,
        };
        Ok((
            store,
            Restored {
                version,
                checkpoint: meta,
                learner: restored_learner,
                replay,
                rejected,
                torn_bytes,
            },
        ))
    }

    /// Appends a batch to the journal and syncs it; returns its sequence number.
    pub fn journal(&mut self, batch_id: &str, docs: &[crate::learn::Doc]) -> Result<u64> {
        self.journal.append(batch_id, docs)
    }

    /// Notes an applied update (or rollback) that changed `changed`.
    pub fn updated(&mut self, changed: impl IntoIterator<Item = GroupId>) {
        self.dirty.extend(changed);
        self.since += 1;
    }

    /// Notes that journal record `seq` has been learned (whether or not its steps applied).
    pub fn applied(&mut self, seq: u64) {
        self.learned = self.learned.max(seq);
    }

    /// Whether a periodic checkpoint is due.
    pub fn due(&self) -> bool {
        self.config.checkpoint_every > 0 && self.since >= self.config.checkpoint_every
    }

    /// Whether anything happened since the newest checkpoint.
    pub fn pending(&self) -> bool {
        self.since > 0 || self.learned > self.covered
    }

    /// The metadata of a file holding `groups` of `version`, made on this store's base model.
    pub fn meta(
        &self,
        version: u64,
        parent: Option<u64>,
        groups: &[GroupId],
        selection: &[GroupId],
    ) -> Meta {
        Meta {
            format: checkpoint::FORMAT,
            version,
            parent,
            base_hash: self.base_hash.clone(),
            strategy: self.strategy.clone(),
            selection: selection.iter().map(|g| g.to_string()).collect(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            journal_seq: self.learned,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            learner: None,
            step: None,
            recent: Vec::new(),
        }
    }

    /// Versions of the checkpoints in the data directory, newest first.
    pub fn checkpoint_versions(&self) -> Result<Vec<u64>> {
        Ok(self.checkpoints.list()?.into_iter().map(|c| c.0).collect())
    }

    /// The checkpoint of `version`, verified, if the data directory keeps it.
    pub fn checkpoint_of(
        &self,
        version: u64,
        device: &candle_core::Device,
    ) -> Result<Option<Checkpoint>> {
        let path = self.checkpoints.path_of(version);
        if !path.exists() {
            return Ok(None);
        }
        checkpoint::load(&path, device).map(Some)
    }

    /// Groups whose weights may differ from the base model's now.
    pub fn changed_since_base(&self) -> &BTreeSet<GroupId> {
        &self.dirty
    }

    /// The base model's content hash.
    pub fn base_hash(&self) -> &str {
        &self.base_hash
    }

    /// The newest checkpoint's version and file, if one was written.
    pub fn newest_checkpoint(&self) -> Option<(u64, PathBuf)> {
        self.parent.map(|v| (v, self.checkpoints.path_of(v)))
    }

    /// Checkpoints retained in the data directory.
    pub fn keep_checkpoints(&self) -> usize {
        self.config.keep_checkpoints.max(1)
    }

    /// Writes `snapshot` (the served weights after every batch learned so far) as a checkpoint of
    /// the groups changed since the base model, with the `recent` learning steps, then prunes old
    /// checkpoints.
    pub fn checkpoint(
        &mut self,
        snapshot: &Snapshot,
        selection: &[GroupId],
        learner: Option<&LearnerState>,
        recent: Vec<Step>,
    ) -> Result<Written> {
        let groups = self.dirty.iter().copied().collect::<Vec<_>>();
        let mut tensors = snapshot.tensors_of(&groups);
        let mut meta = self.meta(snapshot.version(), self.parent, &groups, selection);
        meta.recent = recent;
        if let Some(state) = learner {
            let (learner_meta, moments) = checkpoint::learner_parts(state);
            meta.learner = Some(learner_meta);
            tensors.extend(moments);
        }
        let (path, bytes) = self.checkpoints.write(&meta, &tensors)?;
        self.parent = Some(meta.version);
        self.covered = meta.journal_seq;
        self.since = 0;
        for old in self.checkpoints.prune(self.keep_checkpoints())? {
            tracing::info!(path = %old.display(), "old checkpoint removed");
        }
        // The checkpoint is written; a journal left long only costs disk.
        if let Err(e) = self.compact_journal() {
            tracing::error!("compacting the journal: {e}");
        }
        Ok(Written { meta, path, bytes })
    }

    /// Drops the journal records that the oldest kept checkpoint covers: recovery starts from
    /// one of the kept checkpoints (an older one when a newer is damaged), never from before them.
    fn compact_journal(&mut self) -> Result<()> {
        let Some((_, oldest)) = self.checkpoints.list()?.pop() else {
            return Ok(());
        };
        let seq = checkpoint::read_meta(&oldest)?.journal_seq;
        let removed = self.journal.compact(seq)?;
        if removed > 0 {
            tracing::info!(up_to = seq, bytes = removed, "journal compacted");
        }
        Ok(())
    }
}
