//! What the soak records: every call's latency and status by minute and RPC, and the server's
//! samples, reduced at the end to a per-minute table, slopes and error counts.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use locus::client::ClientError;
use serde_json::{json, Value};

use crate::support::{quantile, summary};

/// The outcome of a call a client cancelled on purpose; not an error.
pub const DELIBERATE: &str = "Cancelled(deliberate)";
/// Error messages kept for the report, at most.
const MESSAGES_KEPT: usize = 20;

/// Calls of one RPC in one minute.
#[derive(Default)]
struct Cell {
    ms: Vec<f64>,
    codes: BTreeMap<String, u64>,
}

/// Every call's outcome, by minute since the soak began.
pub struct Recorder {
    start: Instant,
    cells: Mutex<BTreeMap<(u64, &'static str), Cell>>,
    messages: Mutex<Vec<String>>,
}

impl Recorder {
    /// Minutes count from now.
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            cells: Mutex::default(),
            messages: Mutex::default(),
        }
    }

    /// Seconds since the soak began.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// A call of `rpc` begun at `began`: its latency when it succeeded, its status code either way.
    pub fn record(&self, rpc: &'static str, began: Instant, outcome: Result<(), ClientError>) {
        let ms = began.elapsed().as_secs_f64() * 1e3;
        let code = match &outcome {
            Ok(()) => "Ok".to_string(),
            Err(ClientError::Status(s)) => format!("{:?}", s.code()),
            Err(_) => "Transport".to_string(),
        };
        if let Err(e) = outcome {
            let mut kept = self.messages.lock().unwrap();
            if kept.len() < MESSAGES_KEPT {
                kept.push(format!("{:.0} s {rpc}: {e}", self.elapsed()));
            }
        }
        let ms = code_is_ok(&code).then_some(ms);
        self.count(rpc, code, ms);
    }

    /// A call of `rpc` the client dropped on purpose.
    pub fn cancelled(&self, rpc: &'static str) {
        self.count(rpc, DELIBERATE.to_string(), None);
    }

    fn count(&self, rpc: &'static str, code: String, ms: Option<f64>) {
        let minute = (self.elapsed() / 60.0) as u64;
        let mut cells = self.cells.lock().unwrap();
        let cell = cells.entry((minute, rpc)).or_default();
        *cell.codes.entry(code).or_default() += 1;
        cell.ms.extend(ms);
    }

    /// One row per minute and RPC: calls, p50/p99 of the successful ones, status counts.
    pub fn table(&self) -> Vec<Value> {
        let cells = self.cells.lock().unwrap();
        cells
            .iter()
            .map(|((minute, rpc), cell)| {
                let mut ms = cell.ms.clone();
                ms.sort_by(f64::total_cmp);
                json!({
                    "minute": minute,
                    "rpc": rpc,
                    "calls": cell.codes.values().sum::<u64>(),
                    "p50_ms": round(quantile(&ms, 0.50)),
                    "p99_ms": round(quantile(&ms, 0.99)),
                    "codes": cell.codes,
                    "errors": errors(&cell.codes),
                })
            })
            .collect()
    }

    /// Latency summary of each RPC's successful calls over the whole run.
    pub fn totals(&self) -> BTreeMap<&'static str, Value> {
        let mut ms: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
        for ((_, rpc), cell) in self.cells.lock().unwrap().iter() {
            ms.entry(rpc).or_default().extend(&cell.ms);
        }
        ms.into_iter().map(|(rpc, ms)| (rpc, summary(ms))).collect()
    }

    /// Unexpected statuses over the whole run, by RPC and code, with the first messages.
    pub fn errors(&self) -> Value {
        let mut by_rpc: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
        for ((_, rpc), cell) in self.cells.lock().unwrap().iter() {
            for (code, n) in cell.codes.iter().filter(|(c, _)| !expected(c)) {
                *by_rpc
                    .entry(rpc)
                    .or_default()
                    .entry(code.clone())
                    .or_default() += n;
            }
        }
        let total: u64 = by_rpc.values().flat_map(|m| m.values()).sum();
        json!({ "total": total, "by_rpc": by_rpc, "first_messages": *self.messages.lock().unwrap() })
    }
}

fn code_is_ok(code: &str) -> bool {
    code == "Ok"
}

/// OK, or a cancellation the soak made itself.
fn expected(code: &str) -> bool {
    code_is_ok(code) || code == DELIBERATE
}

fn errors(codes: &BTreeMap<String, u64>) -> u64 {
    codes
        .iter()
        .filter(|(c, _)| !expected(c))
        .map(|(_, n)| n)
        .sum()
}

/// Milliseconds to a tenth (JSON has no NaN: none is null).
fn round(ms: f64) -> Option<f64> {
    ms.is_finite().then(|| (ms * 10.0).round() / 10.0)
}

/// The server as one sample saw it.
#[derive(serde::Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
    pub version: Option<u64>,
    pub steps: Option<u64>,
    pub queue_depth: Option<u32>,
}

/// Least-squares slope of `(t_s, value)` points, as % of their mean per 10 minutes; None with
/// fewer than 3 points.
pub fn slope_pct_per_10min(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_v)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    (var > 0.0 && mean_v != 0.0).then(|| cov / var * 600.0 / mean_v * 100.0)
}
