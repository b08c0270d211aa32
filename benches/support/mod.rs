//! What the server benchmarks share: the drift data as probes and ingest batches, latency
//! summaries and the machine's name.

use locus::proto::v1 as pb;

mod drift;
mod machine;
pub use machine::machine;

const STABLE: &str = include_str!("../../data/drift/stable.jsonl");

/// `(prompt, [gold, foil])` probes to score, cycled through.
pub fn probes() -> Vec<(String, Vec<String>)> {
    STABLE
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let field = |k: &str| v[k].as_str().map(String::from);
            Some((field("prompt")?, vec![field("gold")?, field("foil")?]))
        })
        .collect()
}

/// The drifted documents in batches of `size`, to ingest in a loop; batch ids start with `tag`.
pub fn batches(tag: &str, size: usize) -> Vec<pb::IngestRequest> {
    let docs: Vec<pb::Document> = drift::update_texts()
        .into_iter()
        .map(|text| pb::Document {
            text,
            ..Default::default()
        })
        .collect();
    docs.chunks(size)
        .enumerate()
        .map(|(i, chunk)| pb::IngestRequest {
            documents: chunk.to_vec(),
            client_batch_id: format!("{tag}-{i}"),
        })
        .collect()
}

/// The `q` quantile (0 to 1) of latencies sorted ascending; NaN when there are none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// p50, p99, mean and max of latencies in milliseconds.
pub fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    serde_json::json!({
        "requests": ms.len(),
        "p50_ms": quantile(&ms, 0.50),
        "p99_ms": quantile(&ms, 0.99),
        "mean_ms": ms.iter().sum::<f64>() / ms.len() as f64,
        "max_ms": ms.last().copied().unwrap_or(f64::NAN),
    })
}
