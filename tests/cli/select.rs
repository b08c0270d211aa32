//! `locus select` on a saved trace: the rules, the seeded random draw, and what it refuses.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::common::{fails, ok, rel_err};
use crate::{f, fixture_str, gid, good_input, mean_relative, path_str, trace_args};

/// A saved `locus trace --json` of the llama fixture.
fn saved_trace(dir: &Path) -> (PathBuf, Value) {
    let input = good_input(dir);
    let r = ok(&trace_args(&fixture_str("llama"), &input, &["--json"]));
    let p = dir.join("trace.json");
    std::fs::write(&p, &r.stdout).unwrap();
    (p, serde_json::from_str(&r.stdout).unwrap())
}

/// `locus select --from trace ...`, parsed; checks the echoed rule.
fn select(trace: &Path, rule: &str, extra: &[&str]) -> Value {
    let mut args = vec!["select", "--from", path_str(trace), "--rule", rule];
    args.extend_from_slice(extra);
    let r = ok(&args);
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("select output is not JSON: {e}\n{}", r.stdout));
    assert_eq!(v["rule"], json!(rule));
    v
}

fn picked(v: &Value) -> Vec<(u64, String)> {
    v["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(gid)
        .collect()
}

#[test]
fn select_rules_pick_the_defined_groups() {
    let dir = TempDir::new().unwrap();
    let (path, trace) = saved_trace(dir.path());
    let groups = trace["groups"].as_array().unwrap();
    let all: Vec<(u64, String)> = groups.iter().map(gid).collect();
    let mean = mean_relative(groups);

    // tgl-fp: exactly the groups above the mean, as `trace` reported.
    let fp = picked(&select(&path, "tgl-fp", &[]));
    let above: Vec<_> = groups
        .iter()
        .filter(|g| f(&g["relative"]) > mean)
        .map(gid)
        .collect();
    assert_eq!(fp, above);
    let reported: Vec<_> = trace["selection"]["tgl_fp"]
        .as_array()
        .unwrap()
        .iter()
        .map(gid)
        .collect();
    assert_eq!(fp, reported);
    // The default rule is tgl-fp.
    let r = ok(&["select", "--from", path_str(&path)]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(picked(&v), fp);

    // topk: the k highest relative norms, listed in layer order.
    let top = picked(&select(&path, "topk", &["--k", "2"]));
    let mut by_rel: Vec<&Value> = groups.iter().collect();
    by_rel.sort_by(|a, b| f(&b["relative"]).total_cmp(&f(&a["relative"])));
    let mut want: Vec<_> = by_rel[..2].iter().map(|g| gid(g)).collect();
    want.sort();
    assert_eq!(top, want);

    // all: every group in order.
    assert_eq!(picked(&select(&path, "all", &[])), all);

    // tgl-alr: one scale per group, relative / mean.
    let alr = select(&path, "tgl-alr", &[]);
    let scales = alr["scales"].as_array().unwrap();
    assert_eq!(scales.len(), groups.len());
    for (s, g) in scales.iter().zip(groups) {
        assert_eq!(gid(s), gid(g));
        assert!(rel_err(f(&s["scale"]), f(&g["relative"]) / mean) < 1e-12);
    }
}

#[test]
fn random_k_is_reproducible_and_depends_on_the_seed() {
    let dir = TempDir::new().unwrap();
    let (path, trace) = saved_trace(dir.path());
    let all: BTreeSet<(u64, String)> = trace["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(gid)
        .collect();
    let draw = |seed: u64| {
        picked(&select(
            &path,
            "random-k",
            &["--k", "3", "--seed", &seed.to_string()],
        ))
    };
    let one = draw(1);
    assert_eq!(one.len(), 3);
    let distinct: BTreeSet<_> = one.iter().cloned().collect();
    assert_eq!(distinct.len(), 3, "{one:?}");
    assert!(distinct.is_subset(&all), "{one:?}");
    let mut sorted = one.clone();
    sorted.sort();
    assert_eq!(one, sorted, "listed in layer order");
    assert_eq!(draw(1), one, "same seed, same draw");

    let draws: BTreeSet<Vec<(u64, String)>> = (0..8).map(draw).collect();
    assert!(draws.len() > 1, "every seed drew {one:?}");
    for d in &draws {
        assert_eq!(d.len(), 3);
    }
}

#[test]
fn select_without_k_or_with_an_unknown_rule_fails() {
    let dir = TempDir::new().unwrap();
    let (path, _) = saved_trace(dir.path());
    let from = path_str(&path);
    fails(
        &["select", "--from", from, "--rule", "topk"],
        &["rule `topk` needs --k"],
    );
    fails(
        &[
            "select", "--from", from, "--rule", "random-k", "--seed", "3",
        ],
        &["rule `random-k` needs --k"],
    );
    let line = fails(
        &["select", "--from", from, "--rule", "bogus", "--k", "2"],
        &["unknown selection rule `bogus`"],
    );
    for rule in ["tgl-fp", "topk", "random-k", "all", "tgl-alr"] {
        assert!(line.contains(rule), "{line} does not list {rule}");
    }
}

#[test]
fn select_from_a_file_that_is_not_a_trace_fails() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing.json");
    fails(&["select", "--from", path_str(&missing)], &["missing.json"]);
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "{\"rule\": \"tgl-fp\"}").unwrap();
    fails(
        &["select", "--from", path_str(&junk)],
        &["junk.json", "not the JSON of `locus trace --json`"],
    );
    std::fs::write(
        &junk,
        r#"{"groups": [{"layer": 0, "module": "ffn", "span_norm": 1, "full_norm": 1, "relative": 1}]}"#,
    )
    .unwrap();
    fails(
        &["select", "--from", path_str(&junk)],
        &["junk.json", "unknown module `ffn`"],
    );
}
