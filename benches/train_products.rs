//! The matrix products of a training step at the step bench's shape (4 x 128 = 512 rows) on
//! SmolLM2-135M's weights, in candle's general product (the `gemm` crate, as locus's layers use
//! it): the forward `x @ w^T`, the input gradient `dy @ w` and the weight gradient `dy^T @ x` of
//! each projection and of the head. `scripts/reference/train_products_torch.py` times the same
//! products in PyTorch, so the two give the ceiling each library's kernels put on a step.
//!
//! `cargo bench --bench train_products` prints one JSON object: best of 6 milliseconds and GFLOP/s
//! per product, and the GFLOP/s of one forward and backward's mix of them (a layer's 7
//! projections and the head). `forward_layer` is the forward product as locus's linear layer runs
//! it (`ops::linear`: on AVX-512 its own kernel, which reads the weight in place); it stays out of
//! the mix, which prices candle's general product.

use std::time::Instant;

use candle_core::{Device, Tensor};

#[path = "support/machine.rs"]
mod machine;

const ROWS: usize = 512;
/// Weight shapes `(out, in)` and how often a forward uses each: query/output, key/value, gate/up,
/// down (per layer), the head.
const SHAPES: [(usize, usize, usize); 5] = [
    (576, 576, 2),
    (192, 576, 2),
    (1536, 576, 2),
    (576, 1536, 1),
    (49152, 576, 1),
];

/// Best of 6 seconds of `f`.
fn best(f: impl Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..6 {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    locus::compute::configure_threads(false);
    let device = Device::Cpu;
    let (mut flops, mut secs) = (0f64, 0f64);
    let mut products = Vec::new();
    for (out, inp, uses) in SHAPES {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &device)?;
        let x = Tensor::randn(0f32, 1.0, (ROWS, inp), &device)?;
        let dy = Tensor::randn(0f32, 1.0, (ROWS, out), &device)?;
        let f = 2.0 * (ROWS * out * inp) as f64;
        let times = [
            ("forward", best(|| x.matmul(&w.t()?))?),
            ("input_grad", best(|| dy.matmul(&w))?),
            ("weight_grad", best(|| dy.t()?.matmul(&x))?),
        ];
        for (what, s) in times {
            products.push(serde_json::json!({
                "weight": [out, inp], "product": what, "ms": s * 1e3, "gflops": f / s / 1e9,
            }));
            flops += f * uses as f64;
            secs += s * uses as f64;
        }
        let layer = best(|| locus::model::ops::linear(&x, &w, None))?;
        products.push(serde_json::json!({
            "weight": [out, inp], "product": "forward_layer", "ms": layer * 1e3,
            "gflops": f / layer / 1e9,
        }));
    }
    let out = serde_json::json!({
        "machine": machine::machine(), "library": "candle (gemm crate)", "rows": ROWS,
        "products": products, "step_mix_gflops": flops / secs / 1e9,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
