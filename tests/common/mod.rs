//! Helpers shared by the integration tests: fixture paths and reference JSON.
#![allow(dead_code)]

use std::path::PathBuf;

use serde::Deserialize;

/// The directory of a committed fixture.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The tiny random HF models built by `scripts/reference/make_fixtures.py`.
pub const TINY: [&str; 5] = ["llama", "llama_untied_bf16", "gpt2", "gpt2_f16", "gpt_neo"];

#[derive(Deserialize)]
pub struct RefText {
    pub text: String,
    pub spans: Vec<(usize, usize)>,
}

#[derive(Deserialize)]
pub struct RefGroup {
    pub layer: usize,
    pub module: String,
    pub span_norm: f64,
    pub full_norm: f64,
    #[serde(default)]
    pub relative: f64,
}

#[derive(Deserialize)]
pub struct RefParam {
    pub span: f64,
    pub full: f64,
}

/// What transformers computed for a fixture's texts.
#[derive(Deserialize)]
pub struct Expected {
    pub texts: Vec<RefText>,
    pub token_ids: Vec<Vec<u32>>,
    pub span_targets: Vec<Vec<usize>>,
    #[serde(default)]
    pub logits: Vec<Vec<Vec<f32>>>,
    pub span_loss: Vec<f64>,
    pub full_loss: Vec<f64>,
    pub per_text: Vec<Vec<RefGroup>>,
    pub groups: Vec<RefGroup>,
    pub param_grad_norms: std::collections::BTreeMap<String, RefParam>,
}

/// Reads a reference JSON file.
pub fn expected(path: PathBuf) -> Expected {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `|a - b| / max(|b|, floor)`.
pub fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}
