//! The soak's report: the JSON object with samples, per-minute table, slopes, errors and the
//! restart check, and its markdown summary.

use std::collections::BTreeMap;

use locus::proto::v1 as pb;
use serde_json::{json, Value};

use crate::clients::{COMPLETE, INGEST, PERPLEXITY, SCORE};
use crate::record::{slope_pct_per_10min, Recorder, Sample};
use crate::support::machine;
use crate::Settings;

/// The goal for RSS and descriptors: at most this growth per 10 minutes after warm-up.
const MAX_SLOPE_PCT: f64 = 1.0;

/// The JSON report.
pub fn build(
    settings: &Settings,
    info: &pb::InfoResponse,
    rec: &Recorder,
    samples: &[Sample],
    restart: Value,
) -> Value {
    let warm = |s: &&Sample| s.t_s >= settings.warmup_minutes * 60.0;
    let slope = |field: fn(&Sample) -> Option<u64>| {
        let points: Vec<(f64, f64)> = samples
            .iter()
            .filter(warm)
            .filter_map(|s| Some((s.t_s, field(s)? as f64)))
            .collect();
        slope_pct_per_10min(&points)
    };
    let rss = slope(|s| s.rss_kib);
    let fds = slope(|s| s.fds);
    let table = rec.table();
    let errors = rec.errors();
    let within = |slope: Option<f64>| slope.map(|s| s <= MAX_SLOPE_PCT);
    json!({
        "machine": machine(),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "model": settings.model,
        "architecture": info.architecture,
        "minutes": settings.minutes,
        "warmup_minutes": settings.warmup_minutes,
        "query_gap_ms": settings.query_gap.as_millis() as u64,
        "samples": samples,
        "per_minute": table,
        "totals": rec.totals(),
        "p99_max_over_min_after_warmup": p99_spread(&table, settings),
        "rss_slope_pct_per_10min": rss,
        "fds_slope_pct_per_10min": fds,
        "errors": errors,
        "restart": restart,
        "goals": {
            "rss_slope_at_most_1pct": within(rss),
            "fds_slope_at_most_1pct": within(fds),
            "no_unexpected_status": errors["total"] == 0,
            "restart_same_model": restart["same_model"],
        },
    })
}

/// For each RPC, the largest per-minute p99 over the smallest, over the whole minutes after
/// warm-up (null with fewer than two).
fn p99_spread(table: &[Value], settings: &Settings) -> BTreeMap<String, Option<f64>> {
    let mut p99s: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for row in table {
        let minute = row["minute"].as_f64().unwrap_or(0.0);
        let whole = minute >= settings.warmup_minutes.floor() && minute + 1.0 <= settings.minutes;
        if let (true, Some(p99)) = (whole, row["p99_ms"].as_f64()) {
            p99s.entry(row["rpc"].as_str().unwrap_or("").to_string())
                .or_default()
                .push(p99);
        }
    }
    p99s.into_iter()
        .map(|(rpc, v)| {
            let (min, max) = v
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), &p| (lo.min(p), hi.max(p)));
            (rpc, (v.len() >= 2).then(|| max / min))
        })
        .collect()
}

/// A short markdown summary: p50/p99 per minute of the main RPCs, then the resources and checks.
pub fn markdown(report: &Value) -> String {
    let rpcs = [SCORE, COMPLETE, PERPLEXITY, INGEST];
    let mut out = String::from("| minute |");
    for rpc in rpcs {
        out += &format!(" {rpc} p50 / p99 ms (n) |");
    }
    out += " errors |\n|---|";
    out += &"---|".repeat(rpcs.len() + 1);
    let rows = report["per_minute"].as_array().cloned().unwrap_or_default();
    let last = rows.iter().filter_map(|r| r["minute"].as_u64()).max();
    for minute in 0..=last.unwrap_or(0) {
        let of = |rpc: &str| {
            rows.iter()
                .find(|r| r["minute"] == minute && r["rpc"] == rpc)
        };
        out += &format!("\n| {minute} |");
        for rpc in rpcs {
            out += &match of(rpc) {
                Some(r) => format!(
                    " {} / {} ({}) |",
                    ms(&r["p50_ms"]),
                    ms(&r["p99_ms"]),
                    r["calls"]
                ),
                None => " - |".into(),
            };
        }
        let errors: u64 = rows
            .iter()
            .filter(|r| r["minute"] == minute)
            .filter_map(|r| r["errors"].as_u64())
            .sum();
        out += &format!(" {errors} |");
    }
    out + &resources(report)
}

/// A latency of the table, `-` where there is none.
fn ms(value: &Value) -> String {
    value.as_f64().map_or("-".into(), |ms| ms.to_string())
}

/// The lines under the table: RSS, descriptors, versions, errors and the restart.
fn resources(report: &Value) -> String {
    let samples = report["samples"].as_array().cloned().unwrap_or_default();
    let ends = |field: &str| {
        let first = samples.first().map_or(Value::Null, |s| s[field].clone());
        let last = samples.last().map_or(Value::Null, |s| s[field].clone());
        format!("{first} -> {last}")
    };
    let r = &report["restart"];
    format!(
        "\n\nRSS KiB {} (slope after warm-up {} %/10 min); fds {} (slope {} %/10 min); \
         version {}; unexpected statuses {}; restart: exit {}, version {} -> {}, \
         max |logprob diff| {}, same model {}",
        ends("rss_kib"),
        report["rss_slope_pct_per_10min"],
        ends("fds"),
        report["fds_slope_pct_per_10min"],
        ends("version"),
        report["errors"]["total"],
        r["exit"],
        r["version_before"],
        r["version_after"],
        r["max_abs_diff"],
        r["same_model"],
    )
}
