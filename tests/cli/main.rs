//! Black-box tests of the `locus` binary, a module for each part of the command line: `locus
//! trace` and its outputs (JSON, table, heatmaps), how every kind of bad input or model is
//! refused, `--device`, `locus select`, and `locus client` against a `locus serve` process.

#[path = "../common/mod.rs"]
mod common;

mod client;
mod input;
mod model;
mod select;
mod trace;

use std::path::{Path, PathBuf};

use common::{expected, fixture, ok};
use serde_json::{json, Value};

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn fixture_str(name: &str) -> String {
    fixture(name).to_str().unwrap().to_string()
}

/// Writes `lines` (already serialized) to `dir/name` and returns the path.
fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(&p, s).unwrap();
    p
}

/// A fixture's reference texts with their character spans.
fn ref_texts(name: &str) -> Vec<(String, Vec<(usize, usize)>)> {
    expected(fixture(name).join("expected.json"))
        .texts
        .into_iter()
        .map(|t| (t.text, t.spans))
        .collect()
}

/// The texts as `{"text", "spans"}` lines.
fn spans_form(texts: &[(String, Vec<(usize, usize)>)]) -> Vec<String> {
    texts
        .iter()
        .map(|(text, spans)| json!({"text": text, "spans": spans}).to_string())
        .collect()
}

/// The arguments of `locus trace` on `input` with `model`, then `extra`.
fn trace_args<'a>(model: &'a str, input: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["trace", "--model", model, "--input", path_str(input)];
    args.extend_from_slice(extra);
    args
}

/// `locus trace --json` on `input` with `model`, parsed.
fn trace_json(model: &str, input: &Path) -> Value {
    let r = ok(&trace_args(model, input, &["--json"]));
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout of `locus trace --json` is not one JSON object: {e}\n{}",
            r.stdout
        )
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// `(layer, module)` of a group object.
fn gid(v: &Value) -> (u64, String) {
    (
        v["layer"].as_u64().expect("layer"),
        v["module"].as_str().expect("module").to_string(),
    )
}

fn mean_relative(groups: &[Value]) -> f64 {
    groups.iter().map(|g| f(&g["relative"])).sum::<f64>() / groups.len() as f64
}

/// The trace JSON without its timing, which differs between runs.
fn without_seconds(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("seconds");
    v
}

/// A valid input file in `dir`.
fn good_input(dir: &Path) -> PathBuf {
    write_lines(dir, "in.jsonl", &spans_form(&ref_texts("llama")))
}
