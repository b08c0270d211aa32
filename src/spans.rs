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

/// How a document's span targets were chosen, before the forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The targets, or `None` when they are picked from this step's losses.
    pub targets: Option<Vec<bool>>,
    /// The rule that chose them.
    pub rule: SpanRule,
    /// Whether given spans marked no target token and a rule stood in.
    pub fell_back: bool,
    /// Under `novel`: the targets of each name in the text, for [`novel_targets`] to choose from.
    pub names: Vec<Vec<bool>>,
    /// Under `trending`: the targets of the names the step mentions less often (an outgoing
    /// office holder named once), which the update may weigh down; empty otherwise.
    pub minor: Vec<bool>,
}

/// A document's span targets: its given spans where they mark a target token, else (absent, or a
/// span on the first token alone) the automatic rule's. `entity` marks names now, falling back to
/// `surprisal` where it finds none; `novel` and `trending` leave the choice among their names to
/// the forward pass (`trending` offers only the names `mentions` counts most often);
/// `surprisal` picks the highest-loss tokens there.
pub fn choose_targets(
    enc: &Encoded,
    text: &str,
    given: Option<&[(usize, usize)]>,
    (auto, mentions): (SpanRule, &Mentions),
) -> Choice {
    let given_targets = given
        .map(|s| span_targets(enc, s))
        .filter(|t| t.iter().any(|&b| b));
    let fell_back = given.is_some() && given_targets.is_none();
    let choice = |targets, rule, names| Choice {
        targets,
        rule,
        fell_back,
        names,
        minor: Vec::new(),
    };
    if let Some(t) = given_targets {
        return choice(Some(t), SpanRule::Given, Vec::new());
    }
    match auto {
        SpanRule::Entity => {
            let t = span_targets(enc, &entity_spans(text));
            if t.iter().any(|&b| b) {
                return choice(Some(t), SpanRule::Entity, Vec::new());
            }
        }
        SpanRule::Novel | SpanRule::Trending => {
            let (spans, minor) = match auto {
                SpanRule::Novel => {
                    let chars: Vec<char> = text.chars().collect();
                    let names = entity_spans(text)
                        .into_iter()
                        .filter(|&(s, _)| chars[s].is_alphabetic())
                        .collect();
                    (names, Vec::new())
                }
                _ => mentions.split(text),
            };
            let names: Vec<Vec<bool>> = spans
                .into_iter()
                .map(|span| span_targets(enc, &[span]))
                .filter(|t| t.iter().any(|&b| b))
                .collect();
            if !names.is_empty() {
                return Choice {
                    minor: span_targets(enc, &minor),
                    ..choice(None, auto, names)
                };
            }
        }
        _ => {}
    }
    choice(None, SpanRule::Surprisal, Vec::new())
}

/// The `novel` rule: of a document's names, those the model finds at least as surprising as the
/// median name (mean loss of their targets), so a name it already expects there (an outgoing
/// office holder, a well-known place) is not what the update leans on. `nll[j - 1]` is target
/// `j`'s loss.
pub fn novel_targets(nll: &[f32], names: &[Vec<bool>]) -> Vec<bool> {
    let mean = |t: &Vec<bool>| {
        let (sum, n) = t
            .iter()
            .zip(nll)
            .filter(|(&on, _)| on)
            .fold((0f32, 0usize), |(s, n), (_, &v)| (s + v, n + 1));
        sum / n.max(1) as f32
    };
    let means: Vec<f32> = names.iter().map(mean).collect();
    let mut sorted = means.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[(sorted.len() - 1) / 2];
    let mut out = vec![false; nll.len()];
    for (t, m) in names.iter().zip(&means) {
        if *m >= median {
            for (o, &on) in out.iter_mut().zip(t) {
                *o |= on;
            }
        }
    }
    out
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
    /// The names the current model finds most surprising in context.
    Novel,
    /// Of a document's names, those the step's documents mention most often (news repeats what
    /// is new), the most surprising of them where many tie.
    Trending,
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

/// A text's words (letters, digits, apostrophes and hyphens) with their character ranges.
fn words(text: &str) -> Vec<(usize, usize, &str)> {
    let mut words = Vec::new();
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
    words
}

/// Capitalised words that open a sentence or a clause without naming anything.
const OPENERS: [&str; 25] = [
    "The", "A", "An", "In", "On", "At", "Since", "After", "Before", "He", "She", "It", "They",
    "Its", "His", "Her", "This", "That", "As", "By", "For", "From", "With", "When", "While",
];

/// Names: runs of capitalised words joined by single spaces or hyphens, one word long or more,
/// not starting with an opener or a month; as character ranges.
pub fn names(text: &str) -> Vec<(usize, usize)> {
    let words = words(text);
    let chars: Vec<char> = text.chars().collect();
    let capital = |w: &str| w.chars().next().is_some_and(char::is_uppercase);
    let plain = |w: &str| !OPENERS.contains(&w) && !MONTHS.contains(&w);
    let mut spans = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let (s, mut e, w) = words[i];
        i += 1;
        if !(capital(w) && plain(w)) {
            continue;
        }
        while i < words.len() && capital(words[i].2) && plain(words[i].2) {
            let gap: String = chars[e..words[i].0].iter().collect();
            if gap != " " && gap != "-" {
                break;
            }
            e = words[i].1;
            i += 1;
        }
        spans.push((s, e));
    }
    spans
}

/// Character ranges of names in a text.
pub type Spans = Vec<(usize, usize)>;

/// How often each word occurs in a set of texts (a learning step's documents), for the
/// `trending` rule.
#[derive(Debug, Default)]
pub struct Mentions(std::collections::HashMap<String, usize>);

impl Mentions {
    /// Counts the words of `texts`.
    pub fn of<'a>(texts: impl IntoIterator<Item = &'a str>) -> Mentions {
        let mut counts = std::collections::HashMap::new();
        for t in texts {
            for (_, _, w) in words(t) {
                *counts.entry(w.to_string()).or_insert(0) += 1;
            }
        }
        Mentions(counts)
    }

    /// The names of `text` (see [`names`]) whose most frequent word is mentioned most often, and
    /// the other names.
    pub fn split(&self, text: &str) -> (Spans, Spans) {
        let words = words(text);
        let scored: Vec<((usize, usize), usize)> = names(text)
            .into_iter()
            .map(|(s, e)| {
                let count = words
                    .iter()
                    .filter(|&&(ws, we, _)| s <= ws && we <= e)
                    .map(|(_, _, w)| self.0.get(*w).copied().unwrap_or(0))
                    .max()
                    .unwrap_or(0);
                ((s, e), count)
            })
            .collect();
        let top = scored.iter().map(|&(_, c)| c).max().unwrap_or(0);
        let (most, rest): (Vec<_>, Vec<_>) = scored.into_iter().partition(|&(_, c)| c == top);
        let spans = |v: Vec<((usize, usize), usize)>| v.into_iter().map(|(s, _)| s).collect();
        (spans(most), spans(rest))
    }
}

/// The `entity` rule: runs of two or more capitalised words (a month followed by a number counts),
/// and numbers, as character ranges.
pub fn entity_spans(text: &str) -> Vec<(usize, usize)> {
    let words = words(text);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn novel_keeps_the_names_at_least_as_surprising_as_the_median() {
        // Targets 0-1 are one name (mean loss 4), 3 another (0.5), 5-6 a third (2).
        let nll = [5.0, 3.0, 9.0, 0.5, 9.0, 1.0, 3.0];
        let name = |on: &[usize]| (0..nll.len()).map(|j| on.contains(&j)).collect::<Vec<_>>();
        let names = [name(&[0, 1]), name(&[3]), name(&[5, 6])];
        let got = novel_targets(&nll, &names);
        assert_eq!(got, name(&[0, 1, 5, 6]));
        assert_eq!(novel_targets(&nll, &names[1..2]), names[1]);
    }

    #[test]
    fn names_skip_openers_and_months_and_stop_at_punctuation() {
        let text =
            "In May 2025 Leo XIV succeeded Francis. The Vatican's Dicastery met, Lip-Bu Tan said.";
        let got: Vec<String> = names(text)
            .into_iter()
            .map(|(s, e)| text.chars().skip(s).take(e - s).collect())
            .collect();
        assert_eq!(
            got,
            ["Leo XIV", "Francis", "Vatican's Dicastery", "Lip-Bu Tan"]
        );
    }

    #[test]
    fn trending_keeps_the_names_the_step_mentions_most() {
        let docs = [
            "Leo XIV succeeded Pope Francis in Rome.",
            "As Leo XIV he leads the Church.",
        ];
        let mentions = Mentions::of(docs);
        let text = docs[0];
        let said = |spans: Vec<(usize, usize)>| -> Vec<String> {
            spans
                .into_iter()
                .map(|(s, e)| text.chars().skip(s).take(e - s).collect())
                .collect()
        };
        let (most, minor) = mentions.split(text);
        assert_eq!(said(most), ["Leo XIV"]);
        assert_eq!(said(minor), ["Pope Francis", "Rome"]);
    }
}
