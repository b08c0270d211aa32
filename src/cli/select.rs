//! `locus select`: applies a selection rule to a saved trace.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use locus::select::{alr_scales, select, Rule};
use locus::trace::GroupStat;

/// Arguments of `locus select`.
#[derive(Args)]
pub struct SelectArgs {
    /// The JSON written by `locus trace --json`.
    #[arg(long)]
    from: PathBuf,
    /// `tgl-fp`, `topk`, `random-k`, `all`, or `tgl-alr` (learning-rate scales instead of a subset).
    #[arg(long, default_value = "tgl-fp")]
    rule: String,
    /// How many groups for `topk` and `random-k`.
    #[arg(long)]
    k: Option<usize>,
    /// Seed of `random-k`.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(serde::Deserialize)]
struct Saved {
    groups: Vec<SavedGroup>,
}

#[derive(serde::Deserialize)]
struct SavedGroup {
    layer: usize,
    module: String,
    span_norm: f64,
    full_norm: f64,
    relative: f64,
}

/// Runs `locus select`.
pub fn run(a: SelectArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.from)
        .with_context(|| format!("reading {}", a.from.display()))?;
    let saved: Saved = serde_json::from_str(&text)
        .with_context(|| format!("{}: not the JSON of `locus trace --json`", a.from.display()))?;
    let groups = saved
        .groups
        .into_iter()
        .map(|g| {
            let module = match g.module.as_str() {
                "attn" => locus::model::Module::Attn,
                "mlp" => locus::model::Module::Mlp,
                m => anyhow::bail!("{}: unknown module `{m}`", a.from.display()),
            };
            Ok(GroupStat {
                layer: g.layer,
                module,
                span_norm: g.span_norm,
                full_norm: g.full_norm,
                relative: g.relative,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !["tgl-fp", "topk", "top-k", "random-k", "all", "tgl-alr"].contains(&a.rule.as_str()) {
        anyhow::bail!(
            "unknown selection rule `{}` (tgl-fp, topk, random-k, all, tgl-alr)",
            a.rule
        );
    }
    let out = if a.rule == "tgl-alr" {
        serde_json::json!({"rule": a.rule, "scales": alr_scales(&groups)})
    } else {
        let rule = Rule::parse(&a.rule, a.k, a.seed)?;
        serde_json::json!({"rule": a.rule, "groups": select(&groups, rule)})
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
