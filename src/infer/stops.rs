//! Stop strings: where the first one begins in a growing text.

use aho_corasick::{AhoCorasick, Input, MatchKind};

use crate::error::{Error, Result};

/// The stop strings of one generation as one automaton, searched only where the text can hold a
/// new match: a token then costs the same however many stop strings a request brings.
pub(super) struct Stops {
    automaton: Option<AhoCorasick>,
    /// Bytes of the longest stop string.
    pub(super) longest: usize,
    /// The text last searched, which holds no stop string.
    searched: String,
}

impl Stops {
    pub(super) fn new(stop: &[String]) -> Result<Self> {
        let automaton = if stop.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostFirst)
                    .build(stop)
                    .map_err(|e| Error::Invalid(format!("stop strings: {e}")))?,
            )
        };
        Ok(Stops {
            automaton,
            longest: stop.iter().map(String::len).max().unwrap_or(0),
            searched: String::new(),
        })
    }

    /// Where the first stop string in `text` starts. Past their common prefix `text` may differ from
    /// the text searched before (a byte-level token can complete a character); a new match ends
    /// after that prefix, so it starts no more than `longest - 1` bytes before the prefix ends.
    pub(super) fn find(&mut self, text: &str) -> Option<usize> {
        let automaton = self.automaton.as_ref()?;
        let common = self
            .searched
            .bytes()
            .zip(text.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let from = common.saturating_sub(self.longest.saturating_sub(1));
        let found = automaton
            .find(Input::new(text).span(from..text.len()))
            .map(|m| m.start());
        self.searched.clear();
        self.searched.push_str(text);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::Stops;

    fn stops(s: &[&str]) -> Stops {
        Stops::new(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn a_stop_string_is_found_across_the_texts_it_grows_through() {
        let mut s = stops(&["END", "xyzab", "za"]);
        for text in ["The E", "The EN", "The ENxy"] {
            assert_eq!(s.find(text), None, "{text}");
        }
        // "za" ends first, but "xyzab" starts first.
        assert_eq!(s.find("The ENxyzab"), Some(6));
    }

    #[test]
    fn a_text_that_changes_behind_its_end_is_searched_again_there() {
        let mut s = stops(&["é!"]);
        assert_eq!(s.find("caf\u{FFFD}"), None);
        assert_eq!(s.find("café!"), Some(3));
        assert_eq!(stops(&[]).find("anything"), None);
    }
}
