//! The append-only journal of accepted ingest batches.
//!
//! Each record is `MAGIC | payload length (u32 LE) | CRC-32 of length and payload (u32 LE) |
//! payload`, the payload being JSON. A crash can leave the last record half written: a record that
//! fails its checksum with no good record after it is such a torn tail and is cut off on open. A
//! bad record followed by good ones is damage inside the file, which would silently drop
//! acknowledged batches if cut, so it is an error instead.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::checkpoint::write_atomic;
use super::{sync_dir, Result, StoreError};
use crate::learn::Doc;

/// Marks the start of every record, so a scan can look for good records after a bad one.
const MAGIC: [u8; 4] = *b"LJR1";
/// Magic, length and checksum.
const HEADER: usize = 12;
/// No batch comes near this; a larger length is damage, not a record.
const MAX_PAYLOAD: usize = 1 << 30;

/// One journaled batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// 1-based sequence number, increasing through the file.
    pub seq: u64,
    /// The client's batch id.
    pub batch_id: String,
    /// The accepted documents, in order.
    pub docs: Vec<JournalDoc>,
}

/// A document as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalDoc {
    /// The text.
    pub text: String,
    /// Salient character ranges, if the client gave them.
    pub spans: Option<Vec<(usize, usize)>>,
}

impl Record {
    /// The documents to learn from.
    pub fn docs(&self) -> Vec<Doc> {
        self.docs
            .iter()
            .map(|d| Doc {
                text: d.text.clone(),
                spans: d.spans.clone(),
            })
            .collect()
    }
}

/// What a scan of a journal file found.
#[derive(Debug, Clone)]
pub struct Scan {
    /// The good records, in order.
    pub records: Vec<Record>,
    /// Bytes up to the end of the last good record.
    pub valid_len: u64,
    /// Bytes after it: a torn tail.
    pub torn_bytes: u64,
}

/// Encodes one record with its header.
fn encode(record: &Record) -> Vec<u8> {
    let payload = serde_json::to_vec(record).expect("a record always serializes");
    let len = (payload.len() as u32).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(&payload);
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The record at `at` and the offset after it, or `None` if the bytes there are not a good record.
fn decode(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let header = bytes.get(at..at + HEADER)?;
    if header[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[8..12].try_into().ok()?);
    if len > MAX_PAYLOAD {
        return None;
    }
    let payload = bytes.get(at + HEADER..at + HEADER + len)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&header[4..8]);
    h.update(payload);
    if h.finalize() != crc {
        return None;
    }
    let record = serde_json::from_slice(payload).ok()?;
    Some((record, at + HEADER + len))
}

/// Parses a whole journal: good records up to a torn tail, or an error for damage inside it.
pub fn scan(path: &Path, bytes: &[u8]) -> Result<Scan> {
    let mut records: Vec<Record> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some((record, next)) = decode(bytes, at) else {
            // A good record further on means this one was damaged after it was written.
            let later = (at + 1..bytes.len().saturating_sub(HEADER - 1))
                .filter(|&i| bytes[i..i + 4] == MAGIC)
                .find(|&i| decode(bytes, i).is_some());
            if let Some(i) = later {
                return Err(StoreError::corrupt(
                    path,
                    format!("bad record at byte {at}, good records resume at byte {i}"),
                ));
            }
            break;
        };
        if let Some(prev) = records.last() {
            if record.seq <= prev.seq {
                return Err(StoreError::corrupt(
                    path,
                    format!(
                        "record at byte {at} has sequence number {} after {}",
                        record.seq, prev.seq
                    ),
                ));
            }
        }
        records.push(record);
        at = next;
    }
    Ok(Scan {
        records,
        valid_len: at as u64,
        torn_bytes: (bytes.len() - at) as u64,
    })
}

/// Reads a journal file without changing it (an absent file is an empty journal).
pub fn read(path: &Path) -> Result<Scan> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(StoreError::io(path, e)),
    };
    scan(path, &bytes)
}

/// The journal open for appending.
pub struct Journal {
    path: PathBuf,
    file: File,
    next: u64,
    /// Bytes of good records, where a failed append is cut back to.
    len: u64,
}

impl Journal {
    /// Opens or creates the journal, cutting off a torn tail; returns it with its good records and
    /// the number of bytes cut.
    pub fn open(path: PathBuf) -> Result<(Journal, Vec<Record>, u64)> {
        let mut file = open_append(&path)?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        // A compaction cut short by a crash; the journal itself is whole.
        let unfinished = path.with_extension("tmp");
        if unfinished.exists() {
            std::fs::remove_file(&unfinished).map_err(|e| StoreError::io(&unfinished, e))?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| StoreError::io(&path, e))?;
        let found = scan(&path, &bytes)?;
        if found.torn_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = found.torn_bytes,
                "journal ends in a torn record (a write cut off by a crash); cutting it off"
            );
            file.set_len(found.valid_len)
                .and_then(|()| file.sync_all())
                .map_err(|e| StoreError::io(&path, e))?;
        }
        let next = found.records.last().map_or(1, |r| r.seq + 1);
        let journal = Journal {
            path,
            file,
            next,
            len: found.valid_len,
        };
        Ok((journal, found.records, found.torn_bytes))
    }

    /// Drops the records up to sequence number `seq`: the records after it replace the file
    /// atomically (temporary file, fsync, rename, directory fsync). Returns the bytes removed.
    pub fn compact(&mut self, seq: u64) -> Result<u64> {
        let bytes = std::fs::read(&self.path).map_err(|e| StoreError::io(&self.path, e))?;
        let good = &bytes[..(self.len as usize).min(bytes.len())];
        let mut at = 0;
        while at < good.len() {
            let (record, next) = decode(good, at).ok_or_else(|| {
                StoreError::corrupt(&self.path, format!("bad record at byte {at}"))
            })?;
            if record.seq > seq {
                break;
            }
            at = next;
        }
        if at == 0 {
            return Ok(0);
        }
        write_atomic(&self.path, &good[at..])?;
        self.file = open_append(&self.path)?;
        self.len -= at as u64;
        Ok(at as u64)
    }

    /// Makes the next record's sequence number at least `seq`.
    pub fn skip_to(&mut self, seq: u64) {
        self.next = self.next.max(seq);
    }

    /// Appends a batch and syncs it to disk before returning its sequence number.
    pub fn append(&mut self, batch_id: &str, docs: &[Doc]) -> Result<u64> {
        let record = Record {
            seq: self.next,
            batch_id: batch_id.to_string(),
            docs: docs
                .iter()
                .map(|d| JournalDoc {
                    text: d.text.clone(),
                    spans: d.spans.clone(),
                })
                .collect(),
        };
        let bytes = encode(&record);
        if bytes.len() - HEADER > MAX_PAYLOAD {
            return Err(StoreError::Mismatch(format!(
                "a batch of {} bytes is too large to journal",
                bytes.len()
            )));
        }
        if let Err(e) = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data())
        {
            // A partial record left in place would sit under the next one and damage the file.
            if let Err(cut) = self.file.set_len(self.len) {
                tracing::error!(path = %self.path.display(), "cutting back a failed append: {cut}");
            }
            return Err(StoreError::io(&self.path, e));
        }
        self.len += bytes.len() as u64;
        self.next += 1;
        Ok(record.seq)
    }
}

/// Opens (or creates) the journal file for reading and appending.
fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| StoreError::io(path, e))
}
