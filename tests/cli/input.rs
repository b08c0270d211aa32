//! `locus trace` refusing bad input files, naming the file, the line and the field.

use tempfile::TempDir;

use crate::common::fails;
use crate::{fixture_str, trace_args};

const GOOD: &str =
    r#"{"text": "On 3 May 2021, Ada Lovelace opened a museum.", "spans": [[3, 13]]}"#;

/// `locus trace` on the llama fixture with `content` as input must fail naming `needles`.
fn bad_input(content: &str, needles: &[&str]) -> String {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, content).unwrap();
    let mut all = vec!["in.jsonl"];
    all.extend_from_slice(needles);
    fails(&trace_args(&fixture_str("llama"), &input, &[]), &all)
}

#[test]
fn invalid_json_names_the_line() {
    bad_input(
        &format!("{GOOD}\n{{\"text\": \"unterminated\n"),
        &["line 2", "invalid JSON"],
    );
    bad_input(
        &format!("{GOOD}\n{{\"text\": \"Ada\", \"spans\": [[0, \"3\"]]}}\n"),
        &["line 2", "invalid JSON"],
    );
}

#[test]
fn span_out_of_range_is_refused() {
    bad_input(
        &format!(
            "{GOOD}\n{GOOD}\n{}\n",
            r#"{"text": "Ada Lovelace", "spans": [[0, 13]]}"#
        ),
        &[
            "line 3",
            "field `spans`",
            "[0, 13]",
            "out of range",
            "12 characters",
        ],
    );
    bad_input(
        r#"{"text": "Ada Lovelace", "spans": [[-1, 3]]}"#,
        &["line 1", "field `spans`", "out of range"],
    );
}

#[test]
fn inverted_or_empty_span_is_refused() {
    bad_input(
        r#"{"text": "Ada Lovelace", "spans": [[0, 3], [5, 2]]}"#,
        &["line 1", "field `spans`", "span 1 [5, 2]", "inverted"],
    );
    bad_input(
        r#"{"text": "Ada Lovelace", "spans": [[4, 4]]}"#,
        &["line 1", "field `spans`", "empty"],
    );
    bad_input(
        r#"{"text": "Ada Lovelace", "spans": [[0, 3, 5]]}"#,
        &["line 1", "field `spans`", "[start, end]"],
    );
}

#[test]
fn salient_string_not_in_the_text_is_refused() {
    bad_input(
        &format!(
            "{GOOD}\n{}\n",
            r#"{"text": "Ada Lovelace met Babbage.", "salient": ["Lovelace", "Charles Babbage"]}"#
        ),
        &[
            "line 2",
            "field `salient`",
            "\"Charles Babbage\"",
            "does not occur",
        ],
    );
    bad_input(
        r#"{"text": "Ada Lovelace", "salient": [""]}"#,
        &["line 1", "field `salient`"],
    );
}

#[test]
fn a_span_on_the_first_token_alone_has_no_target() {
    // Character 0 lies in the first token, which is never a prediction target.
    bad_input(
        &format!(
            "{GOOD}\n{}\n",
            r#"{"text": "Ada Lovelace opened a museum.", "spans": [[0, 1]]}"#
        ),
        &["line 2", "field `spans`", "no target token"],
    );
}

#[test]
fn a_text_of_one_token_is_refused() {
    bad_input(
        r#"{"text": "A", "spans": [[0, 1]]}"#,
        &["line 1", "field `text`", "at least 2"],
    );
}

#[test]
fn no_spans_at_all_is_refused() {
    bad_input(
        r#"{"text": "Ada Lovelace opened a museum."}"#,
        &["line 1", "field `spans`", "no salient spans"],
    );
    bad_input(
        r#"{"text": "Ada Lovelace opened a museum.", "spans": []}"#,
        &["line 1", "field `spans`", "no salient spans"],
    );
}

#[test]
fn an_empty_file_is_refused() {
    bad_input("", &["no texts"]);
    bad_input("\n  \n\n", &["no texts"]);
}

#[test]
fn a_missing_text_field_is_refused() {
    bad_input(
        &format!("{GOOD}\n{}\n", r#"{"spans": [[0, 3]]}"#),
        &["line 2", "field `text`", "missing"],
    );
}

#[test]
fn an_unknown_field_is_refused() {
    bad_input(
        r#"{"text": "Ada Lovelace", "spans": [[0, 3]], "colour": "red"}"#,
        &["line 1", "unknown field `colour`"],
    );
}

#[test]
fn a_missing_input_file_is_refused() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("nope.jsonl");
    fails(
        &trace_args(&fixture_str("llama"), &missing, &[]),
        &["nope.jsonl", "No such file"],
    );
}
