//! Checkpoints: the layer groups changed since the base model, with the state that places them.
//!
//! A file is `MAGIC | metadata length (u64 LE) | metadata JSON | tensors length (u64 LE) |
//! safetensors | SHA-256 of everything before it`. It is written to a temporary file, synced,
//! renamed into place and the directory synced, so a crash leaves either the old set of
//! checkpoints or the new one, never half a file under a checkpoint's name. A file that fails its
//! checksum on load is renamed aside and the next older one is used.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{sync_dir, Result, StoreError};
use crate::learn::engine::LearnerState;
use crate::learn::history::{self, Step};
use crate::learn::optimizer::Moments;
use crate::learn::rehearsal::Entry;
use crate::model::GroupId;

/// The file format version in [`Meta::format`].
pub const FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"LOCUSCK1";
const DIGEST: usize = 32;
pub(crate) const EXT: &str = "ckpt";

/// What a checkpoint is, besides its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// File format version.
    pub format: u32,
    /// The model version it holds.
    pub version: u64,
    /// The version of the checkpoint before it (`None`: made from the base model).
    pub parent: Option<u64>,
    /// [`super::model_hash`] of the base model the groups replace parts of.
    pub base_hash: String,
    /// The learning strategy in force.
    pub strategy: String,
    /// The groups the strategy selected when it was written (`layer.module`).
    pub selection: Vec<String>,
    /// The groups it holds: every group changed since the base (`layer.module`).
    pub groups: Vec<String>,
    /// The last journal record whose batch it includes.
    pub journal_seq: u64,
    /// When it was written, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// The learner's state, so that learning resumes as if never stopped (checkpoints only).
    #[serde(default)]
    pub learner: Option<LearnerMeta>,
    /// The learning step that made this version (deltas only), for a reader's status page.
    #[serde(default, deserialize_with = "history::lenient_step")]
    pub step: Option<Step>,
    /// The recent learning steps, oldest first (checkpoints only), for the status page after a
    /// restart and on a reader that starts from this checkpoint.
    #[serde(default, deserialize_with = "history::lenient_steps")]
    pub recent: Vec<Step>,
}

impl Meta {
    /// The groups it holds, parsed (names that do not parse are skipped: they name no group).
    pub fn group_ids(&self) -> Vec<GroupId> {
        self.groups
            .iter()
            .filter_map(|g| GroupId::parse(g))
            .collect()
    }
}

/// The learner's state besides its tensors, as a checkpoint's metadata holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnerMeta {
    /// Batches seen and updates applied.
    pub batches: u64,
    /// Updates applied.
    pub applied: u64,
    /// AdamW steps per parameter; the moments are the tensors `optimizer/<name>`.
    pub steps: BTreeMap<String, i32>,
    /// Optimizer steps since each parameter's last update (absent in older versions: 0).
    #[serde(default)]
    pub idle: BTreeMap<String, u64>,
    /// `(group, span norm, full norm)`: the localization statistics.
    pub norms: Option<Vec<(String, f64, f64)>>,
    /// The groups selected.
    pub selection: Option<Vec<String>>,
    /// `(span norm, full norm)` of each unit by group under `+units` (absent in older versions).
    #[serde(default)]
    pub unit_norms: Option<BTreeMap<String, Vec<(f64, f64)>>>,
    /// Recent documents waiting for rehearsal (absent in checkpoints of older versions).
    #[serde(default)]
    pub rehearsal: Vec<Entry>,
    /// The last documents learned, for `trending`'s counts (absent in older versions).
    #[serde(default)]
    pub recent: Vec<String>,
}

/// Name prefix of optimizer moments among a checkpoint's tensors.
const OPTIMIZER: &str = "optimizer/";

/// Splits a learner's state into checkpoint metadata and tensors.
pub fn learner_parts(state: &LearnerState) -> (LearnerMeta, BTreeMap<String, Tensor>) {
    let names = |gs: &[GroupId]| gs.iter().map(|g| g.to_string()).collect();
    let meta = LearnerMeta {
        batches: state.batches,
        applied: state.applied,
        steps: state
            .moments
            .iter()
            .map(|(n, m)| (n.clone(), m.steps))
            .collect(),
        idle: state
            .moments
            .iter()
            .map(|(n, m)| (n.clone(), m.idle))
            .collect(),
        norms: state.norms.as_ref().map(|norms| {
            norms
                .iter()
                .map(|(g, &(span, full))| (g.to_string(), span, full))
                .collect()
        }),
        selection: state.selection.as_deref().map(names),
        unit_norms: state.unit_norms.as_ref().map(|norms| {
            norms
                .iter()
                .map(|(g, units)| (g.to_string(), units.clone()))
                .collect()
        }),
        rehearsal: state.rehearsal.clone(),
        recent: state.recent.clone(),
    };
    let tensors = state
        .moments
        .iter()
        .map(|(n, m)| (format!("{OPTIMIZER}{n}"), m.state.clone()))
        .collect();
    (meta, tensors)
}

/// Takes the optimizer tensors out of `tensors` and rebuilds the learner's state with `meta`.
fn learner_state(
    path: &Path,
    meta: Option<&LearnerMeta>,
    tensors: &mut BTreeMap<String, Tensor>,
) -> Result<Option<LearnerState>> {
    let moments: BTreeMap<String, Tensor> = tensors
        .extract_if(.., |n, _| n.starts_with(OPTIMIZER))
        .map(|(n, t)| (n[OPTIMIZER.len()..].to_string(), t))
        .collect();
    let Some(meta) = meta else {
        return Ok(None);
    };
    let groups = |names: &[String]| names.iter().filter_map(|g| GroupId::parse(g)).collect();
    let mut out = BTreeMap::new();
    for (name, state) in moments {
        let steps = *meta.steps.get(&name).ok_or_else(|| {
            StoreError::corrupt(
                path,
                format!("optimizer state of `{name}` without its steps"),
            )
        })?;
        let idle = meta.idle.get(&name).copied().unwrap_or(0);
        out.insert(name, Moments { state, steps, idle });
    }
    Ok(Some(LearnerState {
        moments: out,
        batches: meta.batches,
        applied: meta.applied,
        norms: meta.norms.as_ref().map(|norms| {
            norms
                .iter()
                .filter_map(|(g, span, full)| Some((GroupId::parse(g)?, (*span, *full))))
                .collect()
        }),
        selection: meta.selection.as_deref().map(groups),
        unit_norms: meta.unit_norms.as_ref().map(|norms| {
            norms
                .iter()
                .filter_map(|(g, units)| Some((GroupId::parse(g)?, units.clone())))
                .collect()
        }),
        rehearsal: meta.rehearsal.clone(),
        recent: meta.recent.clone(),
    }))
}

/// A checkpoint read back: its metadata, the tensors of its groups and the learner's state.
pub struct Checkpoint {
    /// Metadata.
    pub meta: Meta,
    /// Weights by parameter name.
    pub tensors: BTreeMap<String, Tensor>,
    /// Optimizer moments and localization statistics, when the checkpoint holds them.
    pub learner: Option<LearnerState>,
}

/// Encodes a checkpoint file in memory (a delta to publish: only the groups one update changed).
pub fn encode(meta: &Meta, tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    let layout = Layout::of(tensors)?;
    let mut out = Vec::with_capacity(layout.file_len(meta) as usize);
    layout
        .write(meta, tensors, &mut out)
        .expect("writing to a Vec cannot fail");
    Ok(out)
}

/// Where each tensor goes in a checkpoint's safetensors section, worked out before any tensor's
/// bytes are written, so a file is written one tensor at a time and never held whole in memory.
struct Layout {
    /// The safetensors header: its length (u64 LE) and JSON.
    header: Vec<u8>,
    /// Tensor names in the order of their bytes.
    order: Vec<String>,
    /// Length of the safetensors section.
    payload: u64,
}

/// A tensor as the safetensors header sees it: dtype and shape, no bytes.
struct Described<'a>(&'a Tensor);

impl safetensors::View for Described<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::View::dtype(&self.0)
    }
    fn shape(&self) -> &[usize] {
        self.0.dims()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        safetensors::View::data_len(&self.0)
    }
}

impl Layout {
    fn of(tensors: &BTreeMap<String, Tensor>) -> Result<Layout> {
        let failed = |e: &dyn std::fmt::Display| {
            StoreError::Mismatch(format!("serializing checkpoint tensors: {e}"))
        };
        // Serializing tensors without bytes gives exactly the header the library would write.
        let header = safetensors::serialize(tensors.iter().map(|(n, t)| (n, Described(t))), None)
            .map_err(|e| failed(&e))?;
        let json: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header[8..]).map_err(|e| failed(&e))?;
        let mut placed: Vec<(u64, String)> = json
            .iter()
            .filter_map(|(name, info)| Some((info["data_offsets"][0].as_u64()?, name.clone())))
            .collect();
        placed.sort();
        let order: Vec<String> = placed.into_iter().map(|(_, name)| name).collect();
        if order.len() != tensors.len() {
            return Err(failed(&"the header does not place every tensor"));
        }
        let bytes: usize = tensors
            .values()
            .map(|t| safetensors::View::data_len(&t))
            .sum();
        let payload = (header.len() + bytes) as u64;
        Ok(Layout {
            header,
            order,
            payload,
        })
    }

    /// The whole file's length.
    fn file_len(&self, meta: &Meta) -> u64 {
        let meta_len = serde_json::to_vec(meta).map_or(0, |m| m.len());
        (MAGIC.len() + 8 + meta_len + 8 + DIGEST) as u64 + self.payload
    }

    /// Writes the file to `out`, hashing as it goes; returns its length.
    fn write(
        &self,
        meta: &Meta,
        tensors: &BTreeMap<String, Tensor>,
        out: &mut impl Write,
    ) -> std::io::Result<u64> {
        let meta_json = serde_json::to_vec(meta).expect("metadata always serializes");
        let mut hashed = Hashed {
            out,
            hash: Sha256::new(),
            len: 0,
        };
        hashed.write_all(MAGIC)?;
        hashed.write_all(&(meta_json.len() as u64).to_le_bytes())?;
        hashed.write_all(&meta_json)?;
        hashed.write_all(&self.payload.to_le_bytes())?;
        hashed.write_all(&self.header)?;
        for name in &self.order {
            hashed.write_all(&safetensors::View::data(&&tensors[name]))?;
        }
        let digest = hashed.hash.finalize();
        hashed.out.write_all(&digest)?;
        Ok(hashed.len + DIGEST as u64)
    }
}

/// A writer that hashes and counts what passes through it.
struct Hashed<'a, W: Write> {
    out: &'a mut W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashed<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Verifies and decodes a checkpoint file's bytes.
pub fn decode(path: &Path, bytes: &[u8], device: &Device) -> Result<Checkpoint> {
    let bad = |reason: &str| StoreError::corrupt(path, reason);
    if bytes.len() < MAGIC.len() + 16 + DIGEST || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("too short or not a locus checkpoint"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - DIGEST);
    if Sha256::digest(body).as_slice() != digest {
        return Err(bad("checksum mismatch (truncated or damaged)"));
    }
    let take = |at: usize| -> Result<(usize, usize)> {
        let n = body
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .ok_or_else(|| bad("length field past the end"))?;
        let end = (at + 8)
            .checked_add(n)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| bad("section past the end"))?;
        Ok((at + 8, end))
    };
    let (m0, m1) = take(MAGIC.len())?;
    let (t0, t1) = take(m1)?;
    if t1 != body.len() {
        return Err(bad("trailing bytes"));
    }
    let meta: Meta =
        serde_json::from_slice(&body[m0..m1]).map_err(|e| bad(&format!("metadata: {e}")))?;
    if meta.format != FORMAT {
        return Err(bad(&format!(
            "format {} (this build reads {FORMAT})",
            meta.format
        )));
    }
    let mut tensors = candle_core::safetensors::load_buffer(&body[t0..t1], device)?
        .into_iter()
        .collect();
    let learner = learner_state(path, meta.learner.as_ref(), &mut tensors)?;
    Ok(Checkpoint {
        meta,
        tensors,
        learner,
    })
}

/// Reads only the metadata at the start of the checkpoint at `path`, without verifying the rest.
pub fn read_meta(path: &Path) -> Result<Meta> {
    let bad = |reason: String| StoreError::corrupt(path, reason);
    let mut file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut head = [0u8; MAGIC.len() + 8];
    file.read_exact(&mut head)
        .map_err(|e| StoreError::io(path, e))?;
    if &head[..MAGIC.len()] != MAGIC {
        return Err(bad("not a locus checkpoint".into()));
    }
    let len = u64::from_le_bytes(head[MAGIC.len()..].try_into().expect("8 bytes"));
    let mut json = Vec::new();
    file.take(len)
        .read_to_end(&mut json)
        .map_err(|e| StoreError::io(path, e))?;
    serde_json::from_slice(&json).map_err(|e| bad(format!("metadata: {e}")))
}

/// Reads and verifies the checkpoint at `path`.
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bytes = fs::read(path).map_err(|e| StoreError::io(path, e))?;
    decode(path, &bytes, device)
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one: a temporary
/// sibling, synced, renamed into place, and the directory synced.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// [`write_atomic`] with the content written by `fill`, so it need not be in memory at once.
fn write_atomic_with<T>(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<File>) -> std::io::Result<T>,
) -> Result<T> {
    let tmp = path.with_extension("tmp");
    let written = File::create(&tmp).and_then(|f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let value = fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(value)
    });
    match written {
        Ok(value) => {
            sync_dir(path.parent().unwrap_or(Path::new(".")))?;
            Ok(value)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(StoreError::io(path, e))
        }
    }
}

/// The newest checkpoint that verifies, with its path, and the errors of newer ones.
pub type Found = (Option<(PathBuf, Checkpoint)>, Vec<StoreError>);

/// The newest checkpoint in `dir` that verifies, and the errors of newer ones that did not,
/// changing nothing in `dir`: for readers of a directory that a server writes.
pub fn newest_readable(dir: &Path, device: &Device) -> Result<Found> {
    let mut failed = Vec::new();
    for (_, path) in list_in(dir)? {
        match load(&path, device) {
            Ok(c) => return Ok((Some((path, c)), failed)),
            Err(e) => failed.push(e),
        }
    }
    Ok((None, failed))
}

/// Checkpoint files in `dir` by version, newest first, changing nothing (a directory that does
/// not exist holds none): readers of a directory a server writes use this.
pub fn list_in(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list_versions(dir, EXT)
}

/// Files `<version>.<ext>` in `dir` by version, newest first (none where `dir` does not exist).
pub(crate) fn list_versions(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| StoreError::io(dir, e))?.path();
        let version = path.file_name().and_then(|n| version_of(n.to_str()?, ext));
        if let Some(v) = version {
            out.push((v, path));
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    Ok(out)
}

/// The version in a file name `<version>.<ext>`.
pub(crate) fn version_of(name: &str, ext: &str) -> Option<u64> {
    name.strip_suffix(ext)?.strip_suffix('.')?.parse().ok()
}

/// The checkpoint directory.
pub struct Checkpoints {
    dir: PathBuf,
}

impl Checkpoints {
    /// Opens (or creates) the directory and removes temporary files a crash left behind.
    pub fn open(dir: PathBuf) -> Result<Checkpoints> {
        fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))? {
            let path = entry.map_err(|e| StoreError::io(&dir, e))?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                tracing::info!(path = %path.display(), "removing an unfinished checkpoint");
                fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
            }
        }
        Ok(Checkpoints { dir })
    }

    /// Where the checkpoint of `version` goes.
    pub fn path_of(&self, version: u64) -> PathBuf {
        self.dir.join(format!("{version:020}.{EXT}"))
    }

    /// Checkpoint files by version, newest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        list_in(&self.dir)
    }

    /// The newest checkpoint that verifies, and the files that did not (renamed to `*.corrupt`,
    /// kept for inspection, and reported).
    pub fn newest_good(&self, device: &Device) -> Result<(Option<Checkpoint>, Vec<PathBuf>)> {
        let mut rejected = Vec::new();
        for (_, path) in self.list()? {
            match load(&path, device) {
                Ok(c) => return Ok((Some(c), rejected)),
                Err(e) => {
                    tracing::error!("{e}; falling back to an older checkpoint");
                    let aside = path.with_extension("corrupt");
                    fs::rename(&path, &aside).map_err(|e| StoreError::io(&path, e))?;
                    sync_dir(&self.dir)?;
                    rejected.push(aside);
                }
            }
        }
        Ok((None, rejected))
    }

    /// Writes a checkpoint atomically; returns its path and size.
    pub fn write(&self, meta: &Meta, tensors: &BTreeMap<String, Tensor>) -> Result<(PathBuf, u64)> {
        let layout = Layout::of(tensors)?;
        let path = self.path_of(meta.version);
        let bytes = write_atomic_with(&path, |w| layout.write(meta, tensors, w))?;
        Ok((path, bytes))
    }

    /// Removes all but the newest `keep` checkpoints; returns the removed paths.
    pub fn prune(&self, keep: usize) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for (_, path) in self.list()?.into_iter().skip(keep) {
            fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
            removed.push(path);
        }
        if !removed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}
