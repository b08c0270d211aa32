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

/// A document's span targets: its given spans where they mark a target token, else (absent, or a
/// span on the first token alone) the automatic rule's: `entity` marks names now, falling back to
/// `surprisal` where it finds none; `None` leaves the `surprisal` rule to fill them at the forward
/// pass. The flag says whether given spans fell back.
pub fn choose_targets(
    enc: &Encoded,
    text: &str,
    given: Option<&[(usize, usize)]>,
    auto: SpanRule,
) -> (Option<Vec<bool>>, SpanRule, bool) {
    let given_targets = given
        .map(|s| span_targets(enc, s))
        .filter(|t| t.iter().any(|&b| b));
    if let Some(t) = given_targets {
        return (Some(t), SpanRule::Given, false);
    }
    let fell_back = given.is_some();
    if auto == SpanRule::Entity {
        let t = span_targets(enc, &entity_spans(text));
        if t.iter().any(|&b| b) {
            return (Some(t), SpanRule::Entity, fell_back);
        }
    }
    (None, SpanRule::Surprisal, fell_back)
}

/// How salient spans are found for a document that brings none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpanRule {
    /// The spans the client gave.
    Given,
    /// Capitalised multi-word names, numbers and dates.
    Entity,
    /// The highest-loss token runs under the current model.
    Surprisal,
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// The `entity` rule: runs of two or more capitalised words (a month followed by a number counts),
/// and numbers, as character ranges.
pub fn entity_spans(text: &str) -> Vec<(usize, usize)> {
    // Words with their character ranges.
    let mut words: Vec<(usize, usize, &str)> = Vec::new();
    let mut start = None;
    let mut byte_start = 0;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for (ci, &(bi, c)) in chars.iter().enumerate() {
        let part = c.is_alphanumeric() || c == '\'' || c == '-';
        match (part, start) {
            (true, None) => {
                start = Some(ci);
                byte_start = bi;
            }
            (false, Some(s)) => {
                words.push((s, ci, &text[byte_start..bi]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push((s, chars.len(), &text[byte_start..]));
    }
    let capital = |w: &str| w.chars().next().is_some_and(char::is_uppercase);
    let number = |w: &str| w.chars().next().is_some_and(|c| c.is_ascii_digit());
    let mut spans = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let (s, mut e, w) = words[i];
        if number(w) {
            spans.push((s, e));
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < words.len()
            && (capital(words[j].2) || (MONTHS.contains(&w) && number(words[j].2)))
        {
            e = words[j].1;
            j += 1;
        }
        if capital(w) && j - i >= 2 {
            spans.push((s, e));
        }
        i = j;
    }
    spans
}

/// The `surprisal` rule: targets whose loss is in the top `fraction` of the document, merged into
/// runs of adjacent targets. `nll[j - 1]` is the loss of target `j`.
pub fn surprisal_targets(nll: &[f32], fraction: f64) -> Vec<bool> {
    let k = ((nll.len() as f64 * fraction).ceil() as usize).clamp(1, nll.len().max(1));
    let mut sorted: Vec<f32> = nll.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let Some(&threshold) = sorted.get(k.min(sorted.len()).saturating_sub(1)) else {
        return vec![false; nll.len()];
    };
    nll.iter().map(|&v| v >= threshold).collect()
}
