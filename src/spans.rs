//! Salient spans: the JSONL input format, and character ranges turned into span targets.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::tokenize::Encoded;

/// A text with its salient spans as character ranges (Unicode scalar offsets, end exclusive).
#[derive(Debug, Clone, PartialEq)]
pub struct SpanText {
    /// 1-based line of the input it came from, for errors.
    pub line: usize,
    /// The text itself.
    pub text: String,
    /// Salient character ranges, sorted.
    pub spans: Vec<(usize, usize)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    text: Option<String>,
    spans: Option<Vec<Vec<i64>>>,
    salient: Option<Vec<String>>,
}

/// Parses JSONL where each line is `{"text", "spans": [[s, e], ...]}` and/or `{"text", "salient": [...]}`.
/// `source_name` names the input in errors; blank lines are skipped.
pub fn parse_jsonl(source_name: &str, content: &str) -> Result<Vec<SpanText>> {
    let mut out = Vec::new();
    for (i, raw) in content.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let err = |field: &str, reason: String| Error::Input {
            source_name: source_name.to_string(),
            line: i + 1,
            field: field.to_string(),
            reason,
        };
        let line: Line =
            serde_json::from_str(raw).map_err(|e| err("-", format!("invalid JSON: {e}")))?;
        let text = line.text.ok_or_else(|| err("text", "missing".into()))?;
        let spans = spans_of(&text, line.spans.as_deref(), line.salient.as_deref())
            .map_err(|(f, r)| err(f, r))?;
        out.push(SpanText {
            line: i + 1,
            text,
            spans,
        });
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "{source_name}: no texts (the file is empty)"
        )));
    }
    Ok(out)
}

/// Validates explicit ranges and resolves salient strings, naming the field at fault.
pub fn spans_of(
    text: &str,
    ranges: Option<&[Vec<i64>]>,
    salient: Option<&[String]>,
) -> std::result::Result<Vec<(usize, usize)>, (&'static str, String)> {
    let chars = text.chars().count();
    let mut spans = Vec::new();
    for (k, r) in ranges.unwrap_or_default().iter().enumerate() {
        let [s, e] = r[..] else {
            return Err(("spans", format!("span {k} must be [start, end], got {r:?}")));
        };
        if s < 0 || e < 0 || e as usize > chars {
            return Err((
                "spans",
                format!("span {k} [{s}, {e}] is out of range for a text of {chars} characters"),
            ));
        }
        if s >= e {
            return Err((
                "spans",
                format!("span {k} [{s}, {e}] is empty or inverted (start must be < end)"),
            ));
        }
        spans.push((s as usize, e as usize));
    }
    for needle in salient.unwrap_or_default() {
        let found = find_all(text, needle);
        if needle.is_empty() || found.is_empty() {
            return Err(("salient", format!("{needle:?} does not occur in the text")));
        }
        spans.extend(found);
    }
    if spans.is_empty() {
        return Err((
            "spans",
            "no salient spans given (use `spans` or `salient`)".into(),
        ));
    }
    spans.sort_unstable();
    Ok(spans)
}

/// Character ranges of every non-overlapping occurrence of `needle` in `text`.
pub fn find_all(text: &str, needle: &str) -> Vec<(usize, usize)> {
    if needle.is_empty() {
        return Vec::new();
    }
    let len = needle.chars().count();
    text.match_indices(needle)
        .map(|(byte, _)| {
            let start = text[..byte].chars().count();
            (start, start + len)
        })
        .collect()
}

/// For targets `j = 1..n`, whether token `j`'s character range overlaps a salient span.
pub fn span_targets(enc: &Encoded, spans: &[(usize, usize)]) -> Vec<bool> {
    enc.offsets
        .iter()
        .skip(1)
        .map(|&(a, b)| spans.iter().any(|&(s, e)| a < e && s < b))
        .collect()
}
