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

/// A name a span rule may choose as a document's span targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Name {
    /// The targets of every mention.
    pub targets: Vec<bool>,
    /// The targets of its first mention with any: what `novel` measures its surprise on (later
    /// mentions are predictable from the first) and `trending` orders names by.
    pub first: Vec<bool>,
}

impl Name {
    /// A name mentioned at `spans` (character ranges, in order), or `None` when no mention
    /// covers a target token.
    fn of(enc: &Encoded, spans: &[(usize, usize)]) -> Option<Name> {
        let first = spans
            .iter()
            .map(|&s| span_targets(enc, &[s]))
            .find(|t| t.iter().any(|&b| b))?;
        Some(Name {
            targets: span_targets(enc, spans),
            first,
        })
    }

    /// Mean loss of the first mention's targets; `nll[j - 1]` is target `j`'s loss.
    fn surprise(&self, nll: &[f32]) -> f32 {
        let (sum, n) = self
            .first
            .iter()
            .zip(nll)
            .filter(|(&on, _)| on)
            .fold((0f32, 0usize), |(s, n), (_, &v)| (s + v, n + 1));
        sum / n.max(1) as f32
    }
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
    /// Under `novel`: the names in the text for [`novel_targets`] to choose from.
    pub names: Vec<Name>,
    /// Under `trending`: the targets of the names it passed over (those the step mentions less
    /// often, such as an outgoing office holder named once, and the other names tied for most
    /// mentions), which the update may weigh down; empty otherwise.
    pub minor: Vec<bool>,
}

/// A document's span targets: its given spans where they mark a target token, else (absent, or a
/// span on the first token alone) the automatic rule's. `entity` marks names now, falling back to
/// `surprisal` where it finds none; `trending` marks the first mentioned of the names `mentions`
/// counts most often ([`trending_targets`]); `novel` leaves the choice among its names to the
/// forward pass, and `surprisal` picks the highest-loss tokens there.
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
        SpanRule::Novel => {
            let chars: Vec<char> = text.chars().collect();
            let names: Vec<Name> = entity_spans(text)
                .into_iter()
                .filter(|&(s, _)| chars[s].is_alphabetic())
                .filter_map(|span| Name::of(enc, &[span]))
                .collect();
            if !names.is_empty() {
                return choice(None, SpanRule::Novel, names);
            }
        }
        SpanRule::Trending => {
            let (entities, less) = mentions.split(text);
            let names: Vec<Name> = entities.iter().filter_map(|s| Name::of(enc, s)).collect();
            if let Some((chosen, passed)) = trending_targets(&names) {
                let mut minor = span_targets(enc, &less);
                union(&mut minor, &passed);
                return Choice {
                    minor,
                    ..choice(Some(chosen), SpanRule::Trending, Vec::new())
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
pub fn novel_targets(nll: &[f32], names: &[Name]) -> Vec<bool> {
    let means: Vec<f32> = names.iter().map(|n| n.surprise(nll)).collect();
    let mut sorted = means.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[(sorted.len() - 1) / 2];
    let mut out = vec![false; nll.len()];
    for (n, m) in names.iter().zip(&means) {
        if *m >= median {
            union(&mut out, &n.targets);
        }
    }
    out
}

fn union(into: &mut [bool], targets: &[bool]) {
    for (o, &on) in into.iter_mut().zip(targets) {
        *o |= on;
    }
}

/// The `trending` rule's choice among the names a step mentions most: the one the document
/// mentions first. News leads with what is new ("Sanae Takaichi became prime minister ...,
/// succeeding Shigeru Ishiba"); where the successor and the predecessor are both named
/// throughout, the predecessor comes later, often in a clause about the past. (The model's
/// surprise at a name chose worse on dev facts: a name it has not learned yet may be the
/// outgoing one, and any name opening a document looks surprising; docs/learning.md point 29.)
/// Returns the chosen targets and those of the names passed over, which the update may weigh
/// down as it does the names mentioned less often; `None` without names.
pub fn trending_targets(names: &[Name]) -> Option<(Vec<bool>, Vec<bool>)> {
    let first = |n: &Name| n.first.iter().position(|&on| on);
    let best = (0..names.len()).min_by_key(|&i| first(&names[i]))?;
    let len = names[best].targets.len();
    let mut chosen = vec![false; len];
    let mut passed = vec![false; len];
    for (i, n) in names.iter().enumerate() {
        match i == best {
            true => union(&mut chosen, &n.targets),
            false => union(&mut passed, &n.targets),
        }
    }
    // A token both names cover (a shared word) stays a target.
    for (p, &c) in passed.iter_mut().zip(&chosen) {
        *p &= !c;
    }
    Some((chosen, passed))
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
    /// is new); where several entities tie, the one the document mentions first.
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

/// Lower-case words that join the parts of a name ("Luca de Meo", "Ursula von der Leyen").
const PARTICLES: [&str; 14] = [
    "de", "del", "della", "der", "den", "di", "da", "du", "van", "von", "la", "le", "bin", "ibn",
];

/// Names: runs of capitalised words joined by single spaces or hyphens, one word long or more,
/// not starting with an opener or a month; lower-case particles and prefixes such as `al-` join
/// two parts of a name. As character ranges.
pub fn names(text: &str) -> Vec<(usize, usize)> {
    let words = words(text);
    let chars: Vec<char> = text.chars().collect();
    // A capital anywhere marks a name: "iPhone" and "iOS" as well as "Apple".
    let capital = |w: &str| w.chars().any(char::is_uppercase);
    let plain = |w: &str| !OPENERS.contains(&w) && !MONTHS.contains(&w);
    // "al-Sharaa": a lower-case prefix, a hyphen, then a capital.
    let prefixed = |w: &str| {
        w.split_once('-')
            .is_some_and(|(p, rest)| p.len() <= 3 && capital(rest))
    };
    let single = |a: usize, b: usize| {
        let gap: String = chars[a..b].iter().collect();
        gap == " " || gap == "-"
    };
    let mut spans = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let (s, mut e, w) = words[i];
        i += 1;
        if !(capital(w) && plain(w)) {
            continue;
        }
        while i < words.len() && single(e, words[i].0) {
            let next = words[i].2;
            if (capital(next) && plain(next)) || prefixed(next) {
                e = words[i].1;
                i += 1;
            } else if PARTICLES.contains(&next)
                && i + 1 < words.len()
                && capital(words[i + 1].2)
                && single(words[i].1, words[i + 1].0)
            {
                e = words[i + 1].1;
                i += 2;
            } else {
                break;
            }
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

    /// The names of `text` (see [`names`]) whose most frequent word is mentioned most often,
    /// grouped by the entity they name (occurrences that end in the same word: "Sheinbaum" and
    /// "Claudia Sheinbaum"), in order of first mention; and the other names.
    pub fn split(&self, text: &str) -> (Vec<Spans>, Spans) {
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
        let rest = rest.into_iter().map(|(s, _)| s).collect();
        // A name's last word identifies its entity: a surname or a numeral ("Leo XIV" against
        // "Leo XIII"), where a shared title or first name ("Pope", "Aga Khan") would not.
        let last = |&(s, e): &(usize, usize)| {
            words
                .iter()
                .rfind(|&&(ws, we, _)| s <= ws && we <= e)
                .map(|&(_, _, w)| w.trim_end_matches("'s"))
        };
        let mut entities: Vec<(Option<&str>, Spans)> = Vec::new();
        for (span, _) in most {
            let key = last(&span);
            match entities.iter_mut().find(|(k, _)| *k == key) {
                Some((_, spans)) => spans.push(span),
                None => entities.push((key, vec![span])),
            }
        }
        (entities.into_iter().map(|(_, s)| s).collect(), rest)
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
        let names = [name(&[0, 1]), name(&[3]), name(&[5, 6])].map(|t| Name {
            first: t.clone(),
            targets: t,
        });
        let got = novel_targets(&nll, &names);
        assert_eq!(got, name(&[0, 1, 5, 6]));
        assert_eq!(novel_targets(&nll, &names[1..2]), names[1].targets);
    }

    #[test]
    fn trending_chooses_the_name_mentioned_first() {
        // Name A: first mentioned at target 3, again at 6; name B: first at 1, again at 5 and 6,
        // where A's second mention and B's share target 6.
        let name = |on: &[usize]| (0..7).map(|j| on.contains(&j)).collect::<Vec<_>>();
        let a = Name {
            targets: name(&[3, 6]),
            first: name(&[3]),
        };
        let b = Name {
            targets: name(&[1, 5, 6]),
            first: name(&[1]),
        };
        let (chosen, passed) = trending_targets(&[a, b]).unwrap();
        assert_eq!(chosen, name(&[1, 5, 6]));
        assert_eq!(passed, name(&[3]));
        assert_eq!(trending_targets(&[]), None);
    }

    #[test]
    fn names_skip_openers_and_months_and_stop_at_punctuation() {
        let text =
            "In May 2025 Leo XIV succeeded Francis. The Vatican's Dicastery met, Lip-Bu Tan \
            said. Luca de Meo met Ahmed al-Sharaa and the de facto leader.";
        let got: Vec<String> = names(text)
            .into_iter()
            .map(|(s, e)| text.chars().skip(s).take(e - s).collect())
            .collect();
        assert_eq!(
            got,
            [
                "Leo XIV",
                "Francis",
                "Vatican's Dicastery",
                "Lip-Bu Tan",
                "Luca de Meo",
                "Ahmed al-Sharaa"
            ]
        );
    }

    #[test]
    fn trending_keeps_the_names_the_step_mentions_most() {
        let docs = [
            "Leo XIV succeeded Pope Francis in Rome. Pope Leo XIV met Prevost's brother.",
            "As Leo XIV he leads the Church. Pope Francis died. Robert Prevost took the name.",
        ];
        let mentions = Mentions::of(docs);
        let text = docs[0];
        let said = |spans: &[(usize, usize)]| -> Vec<String> {
            spans
                .iter()
                .map(|&(s, e)| text.chars().skip(s).take(e - s).collect())
                .collect()
        };
        let (most, minor) = mentions.split(text);
        // Occurrences ending in the same word are one entity, a shared title is not.
        let most: Vec<Vec<String>> = most.iter().map(|e| said(e)).collect();
        assert_eq!(
            most,
            [vec!["Leo XIV", "Pope Leo XIV"], vec!["Pope Francis"]]
        );
        assert_eq!(said(&minor), ["Rome", "Prevost's"]);
    }
}
