//! Rehearsal of the fresh stream: every learned document comes back at spaced later steps, its
//! sentences in a new order.
//!
//! A fact seen once in one wording is memorised but rarely answerable; seen again over time and in
//! other forms it becomes knowledge. The server can make both itself: the schedule spaces a
//! document's repeats at 1, 3, 7, 15, ... steps after it was first learned, and each repeat
//! reorders its sentences.

use std::collections::VecDeque;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::engine::Doc;

/// A document waiting for its next rehearsal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The document as first learned.
    pub doc: Doc,
    /// Rehearsals already done.
    pub done: usize,
    /// The learning step (batch counter) at which it is next due.
    pub due: u64,
}

/// Recent documents and when each is rehearsed next; bounded, oldest dropped first.
#[derive(Debug, Clone, Default)]
pub struct Rehearsal {
    /// Rehearsals per document.
    times: usize,
    /// Documents kept at most.
    capacity: usize,
    entries: VecDeque<Entry>,
}

impl Rehearsal {
    /// A buffer that rehearses each document `times` times and keeps at most `capacity`.
    pub fn new(times: usize, capacity: usize) -> Self {
        Rehearsal {
            times,
            capacity,
            entries: VecDeque::new(),
        }
    }

    /// Documents waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no document waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Takes the documents due at `step`, at most `limit`, oldest first, and schedules their next
    /// rehearsal (gaps double: 1, 2, 4, ... steps) or lets them go after the last one.
    pub fn take_due(&mut self, step: u64, limit: usize) -> Vec<Doc> {
        let mut out = Vec::new();
        for e in self.entries.iter_mut() {
            if out.len() == limit {
                break;
            }
            if e.due <= step {
                out.push(e.doc.clone());
                e.done += 1;
                e.due = step + (1u64 << e.done.min(20));
            }
        }
        let times = self.times;
        self.entries.retain(|e| e.done < times);
        out
    }

    /// Adds documents first learned at `step`; they are due at the next step.
    pub fn add(&mut self, docs: &[Doc], step: u64) {
        if self.times == 0 || self.capacity == 0 {
            return;
        }
        for d in docs {
            if self.entries.len() == self.capacity {
                self.entries.pop_front();
            }
            self.entries.push_back(Entry {
                doc: d.clone(),
                done: 0,
                due: step + 1,
            });
        }
    }

    /// The waiting documents, for a checkpoint.
    pub fn export(&self) -> Vec<Entry> {
        self.entries.iter().cloned().collect()
    }

    /// Restores waiting documents from a checkpoint (the newest `capacity` of them).
    pub fn import(&mut self, entries: Vec<Entry>) {
        let skip = entries.len().saturating_sub(self.capacity);
        self.entries = entries.into_iter().skip(skip).collect();
    }
}

/// `doc` with its sentences in another order, spans moved with their sentence. A document of one
/// sentence, or with a span across a sentence boundary, comes back unchanged.
pub fn reorder(doc: &Doc, rng: &mut impl rand::Rng) -> Doc {
    let chars: Vec<char> = doc.text.chars().collect();
    let sentences = sentences(&chars);
    if sentences.len() < 2 {
        return doc.clone();
    }
    let spans = doc.spans.clone().unwrap_or_default();
    let home = |&(s, e): &(usize, usize)| sentences.iter().position(|&(a, b)| a <= s && e <= b);
    let Some(homes) = spans.iter().map(home).collect::<Option<Vec<usize>>>() else {
        return doc.clone();
    };
    let mut order: Vec<usize> = (0..sentences.len()).collect();
    order.shuffle(rng);
    let mut text = String::with_capacity(doc.text.len());
    let mut moved = Vec::with_capacity(spans.len());
    for (k, &i) in order.iter().enumerate() {
        if k > 0 {
            text.push(' ');
        }
        let (a, b) = sentences[i];
        let at = text.chars().count();
        for (span, _) in spans.iter().zip(&homes).filter(|(_, &h)| h == i) {
            moved.push((span.0 - a + at, span.1 - a + at));
        }
        text.extend(&chars[a..b]);
    }
    moved.sort_unstable();
    Doc {
        text,
        spans: doc.spans.as_ref().map(|_| moved),
    }
}

/// Character ranges of the sentences of `chars`: a sentence ends at `.`, `!` or `?` followed by
/// whitespace and an upper-case letter or digit; whitespace between sentences is left out.
fn sentences(chars: &[char]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        if matches!(chars[i], '.' | '!' | '?') {
            let mut j = i + 1;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let next_starts = chars
                .get(j)
                .is_some_and(|c| c.is_uppercase() || c.is_ascii_digit());
            if j > i + 1 && next_starts {
                out.push((start, i + 1));
                start = j;
                i = j;
                continue;
            }
        }
        i += 1;
    }
    let end = chars.len() - chars.iter().rev().take_while(|c| c.is_whitespace()).count();
    if start < end {
        out.push((start, end));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn doc(text: &str, spans: Option<Vec<(usize, usize)>>) -> Doc {
        Doc {
            text: text.into(),
            spans,
        }
    }

    #[test]
    fn repeats_are_spaced_and_end() {
        let mut r = Rehearsal::new(3, 10);
        r.add(&[doc("a b", None)], 0);
        let due: Vec<u64> = (1..20).filter(|&s| !r.take_due(s, 8).is_empty()).collect();
        assert_eq!(due, vec![1, 3, 7]);
        assert!(r.is_empty());
    }

    #[test]
    fn capacity_drops_the_oldest_and_limit_defers() {
        let mut r = Rehearsal::new(1, 2);
        r.add(&[doc("one", None), doc("two", None), doc("three", None)], 0);
        assert_eq!(r.len(), 2);
        let first = r.take_due(1, 1);
        assert_eq!(first[0].text, "two");
        assert_eq!(r.take_due(1, 1)[0].text, "three");
    }

    #[test]
    fn reorder_moves_spans_with_their_sentence() {
        let text = "Alice won the prize. Bob came second! Carol was 3rd.";
        let spans = vec![(0, 5), (21, 24), (38, 43)];
        let d = doc(text, Some(spans));
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut seen_other = false;
        for _ in 0..8 {
            let r = reorder(&d, &mut rng);
            seen_other |= r.text != text;
            assert_eq!(r.text.len(), text.len());
            let chars: Vec<char> = r.text.chars().collect();
            let mut names: Vec<String> = r
                .spans
                .unwrap()
                .iter()
                .map(|&(s, e)| chars[s..e].iter().collect())
                .collect();
            names.sort();
            assert_eq!(names, ["Alice", "Bob", "Carol"]);
        }
        assert!(seen_other);
    }

    #[test]
    fn reorder_keeps_a_span_across_sentences() {
        let d = doc("It ended. Then it began.", Some(vec![(3, 13)]));
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(reorder(&d, &mut rng), d);
        let one = doc("Just one sentence here", None);
        assert_eq!(reorder(&one, &mut rng), one);
    }
}
