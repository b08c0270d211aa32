//! The drift-set format (a public interface): `updates.jsonl`, `stable.jsonl`, `general.txt`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::spans::find_all;

/// A probe of an updated fact: the new answer should come to outscore the outdated one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateProbe {
    /// The prompt.
    pub prompt: String,
    /// The current answer (a continuation, leading space included).
    pub new: String,
    /// The outdated answer.
    pub old: String,
}

/// One changed fact with its documents and probes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// Identifier; `test-` marks held-out facts.
    pub id: String,
    /// Documents stating the new fact.
    pub docs: Vec<String>,
    /// Salient strings (entity mentions) in the documents.
    pub salient: Vec<String>,
    /// Probes in other wording than the documents.
    pub probes: Vec<UpdateProbe>,
}

impl Update {
    /// The salient strings that `text` mentions (a server refuses a document with one it lacks).
    pub fn salient_in(&self, text: &str) -> Vec<String> {
        self.salient
            .iter()
            .filter(|s| text.contains(s.as_str()))
            .cloned()
            .collect()
    }
}

/// A probe of an unchanged fact.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StableProbe {
    /// The prompt.
    pub prompt: String,
    /// The right answer.
    pub gold: String,
    /// A wrong answer.
    pub foil: String,
}

/// A whole drift set.
#[derive(Debug, Clone)]
pub struct DriftSet {
    /// Changed facts.
    pub updates: Vec<Update>,
    /// Unchanged facts.
    pub stable: Vec<StableProbe>,
    /// General text paragraphs for perplexity.
    pub general: Vec<String>,
}

fn read(dir: &Path, name: &str) -> Result<(String, String)> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    Ok((path.display().to_string(), text))
}

fn jsonl<T: for<'de> Deserialize<'de>>(
    source: &str,
    text: &str,
    check: impl Fn(&T) -> std::result::Result<(), (String, String)>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let err = |field: String, reason: String| Error::Input {
            source_name: source.into(),
            line: i + 1,
            field,
            reason,
        };
        let item: T =
            serde_json::from_str(line).map_err(|e| err("-".into(), format!("invalid: {e}")))?;
        check(&item).map_err(|(f, r)| err(f, r))?;
        out.push(item);
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!("{source}: no entries")));
    }
    Ok(out)
}

fn answer(field: &str, a: &str) -> std::result::Result<(), (String, String)> {
    if a.trim().is_empty() {
        return Err((field.into(), "empty answer".into()));
    }
    Ok(())
}

impl DriftSet {
    /// Loads and validates a drift directory, naming the file, line and field of any problem.
    pub fn load(dir: &Path) -> Result<Self> {
        let updates = read(dir, "updates.jsonl")?;
        let stable = read(dir, "stable.jsonl")?;
        let (_, general) = read(dir, "general.txt")?;
        Self::parse((&updates.0, &updates.1), (&stable.0, &stable.1), &general)
    }

    /// Parses the three files' contents, each JSONL one with the name its errors give.
    pub fn parse(updates: (&str, &str), stable: (&str, &str), general: &str) -> Result<Self> {
        let (src, text) = updates;
        let updates = jsonl(src, text, |u: &Update| {
            if u.docs.is_empty() {
                return Err(("docs".into(), "at least one document is needed".into()));
            }
            for s in &u.salient {
                if !u.docs.iter().any(|d| !find_all(d, s).is_empty()) {
                    return Err(("salient".into(), format!("{s:?} occurs in no document")));
                }
            }
            for (k, p) in u.probes.iter().enumerate() {
                answer(&format!("probes[{k}].new"), &p.new)?;
                answer(&format!("probes[{k}].old"), &p.old)?;
            }
            Ok(())
        })?;
        let (src, text) = stable;
        let stable = jsonl(src, text, |p: &StableProbe| {
            answer("gold", &p.gold)?;
            answer("foil", &p.foil)
        })?;
        let general: Vec<String> = general
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect();
        Ok(DriftSet {
            updates,
            stable,
            general,
        })
    }
}
