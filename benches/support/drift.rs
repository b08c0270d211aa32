//! The drift set's updated documents, for the benchmarks that stream or learn from them.

const UPDATES: &str = include_str!("../../data/drift/updates.jsonl");

/// Every document text of `data/drift/updates.jsonl`, in file order.
pub fn update_texts() -> Vec<String> {
    UPDATES
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|v| {
            v["docs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str().map(String::from))
                .collect::<Vec<_>>()
        })
        .collect()
}
