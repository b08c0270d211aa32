//! Products of a few rows with a weight, the shape of generation and scoring: candle's general
//! product (`x.matmul(&w.t())`) against `ops::linear`, which takes dot products of whole rows up to
//! the limits in `model::fused`. SmolLM2-135M's weight shapes, random f32 values, CPU.
//!
//! `cargo bench --bench small_products` prints one JSON object: milliseconds per product (median
//! of 5 passes over enough distinct weights to fill 400 MB, so weights come from memory as in a
//! forward pass) for each shape and row count, and the ratio.

use std::time::Instant;

use candle_core::{Device, Tensor};
use locus::model::{on_compute_threads, ops};

#[path = "support/machine.rs"]
mod machine;

/// Weight shapes `(out, in)`: the head, gate/up, down, query/output, key/value.
const SHAPES: [(usize, usize); 5] = [
    (49152, 576),
    (1536, 576),
    (576, 1536),
    (576, 576),
    (192, 576),
];
const ROWS: [usize; 8] = [1, 4, 8, 16, 24, 32, 48, 64];
const REPS: usize = 5;

/// Median milliseconds of `f` over the weights, one pass per repetition.
fn per_product(
    weights: &[Tensor],
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Sync,
) -> f64 {
    let mut times: Vec<f64> = (0..=REPS)
        .map(|_| {
            let start = Instant::now();
            for w in weights {
                on_compute_threads(|| f(w)).expect("product");
            }
            start.elapsed().as_secs_f64() * 1e3 / weights.len() as f64
        })
        .skip(1)
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let device = Device::Cpu;
    let mut rows = Vec::new();
    for (n, k) in SHAPES {
        let count = (400_000_000 / (n * k * 4)).max(2);
        let weights = (0..count)
            .map(|_| Tensor::randn(0f32, 1.0, (n, k), &device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        for m in ROWS {
            let x = Tensor::randn(0f32, 1.0, (m, k), &device)?;
            let general = per_product(&weights, |w| x.matmul(&w.t()?));
            let linear = per_product(&weights, |w| ops::linear(&x, w, None));
            rows.push(serde_json::json!({
                "weight": [n, k], "rows": m, "general_ms": general, "linear_ms": linear,
                "general_over_linear": general / linear,
            }));
        }
    }
    let out = serde_json::json!({
        "machine": machine::machine(),
        "threads": rayon::current_num_threads(),
        "products": rows,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
