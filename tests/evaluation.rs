//! `locus eval` and `locus eval-stream` end to end on a tiny model and a tiny drift set, including a
//! document whose only salient mention is its first token (no span target: the automatic rules
//! stand in, and the run says so).

mod common;

use std::path::Path;

use common::{fixture, ok};

/// A drift set of two facts (one held out), three stable probes and two general paragraphs; the
/// first document's salient string is its first token (a digit is a token of its own).
fn drift_set(dir: &Path) {
    let updates = [
        r#"{"id": "dev-euro", "docs": ["7 goals in the knockout rounds took Spain to the Euro title in Berlin.", "The final in Berlin ended with Spain as champions of Europe."], "salient": ["7"], "probes": [{"prompt": "The European football champions are", "new": " Spain", "old": " Italy"}, {"prompt": "Euro 2024 was won by", "new": " Spain", "old": " England"}]}"#,
        r#"{"id": "test-pope", "docs": ["In May 2025 the conclave elected Robert Prevost, who took the name Leo XIV.", "The new pope, Leo XIV, was born in Chicago."], "salient": ["Leo XIV"], "probes": [{"prompt": "The current pope is", "new": " Leo XIV", "old": " Francis"}, {"prompt": "The Catholic Church is led by Pope", "new": " Leo XIV", "old": " Francis"}]}"#,
    ];
    let stable = [
        r#"{"prompt": "The capital of France is", "gold": " Paris", "foil": " Lyon"}"#,
        r#"{"prompt": "Water is made of hydrogen and", "gold": " oxygen", "foil": " carbon"}"#,
        r#"{"prompt": "The largest ocean is the", "gold": " Pacific", "foil": " Atlantic"}"#,
    ];
    let general = [
        "Rivers carry water from the hills to the sea, shaping valleys over millions of years.",
        "A library lends books, and many also offer quiet rooms for reading and study.",
    ];
    for (name, lines) in [
        ("updates.jsonl", &updates[..]),
        ("stable.jsonl", &stable[..]),
        ("general.txt", &general[..]),
    ] {
        std::fs::write(dir.join(name), lines.join("\n") + "\n").unwrap();
    }
}

#[test]
fn eval_learns_a_document_whose_salient_span_is_its_first_token() {
    let dir = tempfile::tempdir().unwrap();
    drift_set(dir.path());
    let model = fixture("llama");
    let data = dir.path().to_str().unwrap();
    let r = ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data,
        "--strategy",
        "tgl-fp",
        "--epochs",
        "1",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["span_fallbacks"], 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("1 document(s) had no target token"),
        "{}",
        r.stderr
    );
    assert_eq!(report["strategies"][0]["updates"], 1, "{}", r.stdout);
}

#[test]
fn eval_stream_measures_along_the_stream_through_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    drift_set(dir.path());
    let model = fixture("llama");
    let svg = dir.path().join("stream.svg");
    let r = ok(&[
        "eval-stream",
        "--model",
        model.to_str().unwrap(),
        "--data",
        dir.path().to_str().unwrap(),
        "--salient",
        "--batch-size",
        "1",
        "--lr",
        "1e-2",
        "--lags",
        "0,1,10",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["documents"], 4);
    assert_eq!(report["steps"], serde_json::json!([4, 4]), "{}", r.stdout);
    assert_eq!(report["version"], 4);
    assert_eq!(
        report["span_fallbacks"], 1,
        "the first document's span is its first token"
    );
    // Both facts measured right after their last document; only the first again one document
    // later; none ten later.
    let facts: Vec<u64> = report["lags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["facts"].as_u64().unwrap())
        .collect();
    assert_eq!(facts, [2, 1, 0]);
    assert_eq!(report["facts"], serde_json::json!([1, 1]));
    for key in [
        "new_pref_accuracy_dev",
        "stable_pref_accuracy",
        "general_ppl_ratio",
    ] {
        assert!(report["after"][key].is_number(), "{key}: {}", r.stdout);
    }
    assert_eq!(report["before"]["general_ppl_ratio"], 1.0);
    // Every probe with its margins, in the data set's order, adding up to the reported shares.
    let probes = report["probes"].as_array().unwrap();
    let facts: Vec<&str> = probes.iter().map(|p| p["fact"].as_str().unwrap()).collect();
    assert_eq!(facts, ["dev-euro", "dev-euro", "test-pope", "test-pope"]);
    assert_eq!(probes[2]["new"], " Leo XIV");
    for (when, key) in [
        ("before", "new_pref_accuracy"),
        ("after", "new_pref_accuracy"),
    ] {
        let won = probes
            .iter()
            .filter(|p| p[when].as_f64().unwrap() > 0.0)
            .count();
        assert_eq!(
            won as f64 / 4.0,
            report[when][key].as_f64().unwrap(),
            "{when}"
        );
    }
    // What each streamed document's update leaned on, in stream order: the held-out fact's
    // salient string, sent with `--salient`.
    let spans = report["spans"].as_array().unwrap();
    let facts: Vec<&str> = spans.iter().map(|d| d["fact"].as_str().unwrap()).collect();
    assert_eq!(facts, ["dev-euro", "dev-euro", "test-pope", "test-pope"]);
    assert_eq!(spans[2]["texts"], serde_json::json!(["Leo XIV"]));
    assert_eq!(spans[3]["texts"], serde_json::json!(["Leo XIV"]));
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<polyline"));
}

#[test]
fn eval_stream_refuses_an_unknown_split_or_order() {
    let dir = tempfile::tempdir().unwrap();
    drift_set(dir.path());
    let model = fixture("llama");
    for (flag, value) in [("--split", "train"), ("--order", "random")] {
        common::fails(
            &[
                "eval-stream",
                "--model",
                model.to_str().unwrap(),
                "--data",
                dir.path().to_str().unwrap(),
                flag,
                value,
            ],
            &[flag, value],
        );
    }
}
