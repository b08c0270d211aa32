//! Benchmark of one trace step and one plain training step on the default model, CPU, 4 x 128 tokens.
//! The trace step runs twice: building both backwards' gradients, as PyTorch's baseline does, and
//! keeping only their norms, as `locus trace` does.
//!
//! `cargo bench --bench step` prints one JSON object; `scripts/bench.sh` runs it beside the PyTorch
//! baseline (scripts/reference/bench_torch.py) on the same machine and prints the ratios.
//! Timings are medians of 5 runs after one warm-up; peak RSS is reset before each measurement.
//! `LOCUS_DEVICE=cuda:0` runs it on a GPU (a build with `--features cuda`).

use std::time::Instant;

use locus::memory::{peak_rss_mb, reset_peak};

use candle_core::{Device, Tensor};
use locus::model::{grads, load};
use locus::trace::{span_and_full_loss, squared_norms};

#[path = "support/machine.rs"]
mod machine;

const BATCH: usize = 4;
const SEQ: usize = 128;
const REPS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed(device: &Device, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<(f64, f64)> {
    f()?;
    device.synchronize()?;
    reset_peak();
    let mut times = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let start = Instant::now();
        f()?;
        // A GPU runs ahead of the host: the time is the device's.
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok((median(times), peak_rss_mb()))
}

fn main() -> anyhow::Result<()> {
    locus::compute::configure_threads(false);
    let device = locus::model::device::from_env()?;
    let model = load::load("default", &device)?;
    let vocab = model.arch.vocab_size() as u32;
    // A fixed pseudo-random batch; the ids only steer the embedding lookup.
    let ids: Vec<u32> = (0..BATCH * SEQ)
        .map(|i| ((i as u64 * 2654435761) % vocab as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (BATCH, SEQ), &device)?;
    // The same span layout as the PyTorch baseline: a quarter of each row's targets.
    let mut mask = vec![0f32; BATCH * (SEQ - 1)];
    for b in 0..BATCH {
        let start = 8 + 24 * b;
        for j in start..start + (SEQ - 1) / 4 {
            mask[b * (SEQ - 1) + j] = 1.0;
        }
    }
    let mask = Tensor::from_vec(mask, (BATCH, SEQ - 1), &device)?;
    let frozen = model.params(|_| false);
    let tracked = model.params(|_| true);

    let (forward_s, forward_rss) = timed(&device, || {
        model.arch.forward(&frozen, &ids)?;
        Ok(())
    })?;
    let (fwd_bwd_s, fwd_bwd_rss) = timed(&device, || {
        let nll = model.arch.next_token_nll(&tracked, &ids)?;
        grads::backward(&nll.mean_all()?)?;
        Ok(())
    })?;
    // The trace step building both backwards' gradients, as PyTorch's baseline does, or keeping
    // only their norms, as `locus trace` does.
    let trace = |norms_only: bool| {
        timed(&device, || {
            let nll = model.arch.next_token_nll(&tracked, &ids)?;
            let (span, full) = span_and_full_loss(&nll, &mask)?;
            for loss in [&span, &full] {
                match norms_only {
                    true => squared_norms(&model, &tracked, &grads::backward_norms(loss)?)?,
                    false => squared_norms(&model, &tracked, &grads::backward(loss)?)?,
                };
            }
            Ok(())
        })
    };
    let (trace_s, trace_rss) = trace(false)?;
    let (trace_norms_s, trace_norms_rss) = trace(true)?;
    let tokens = (BATCH * SEQ) as f64;
    let cpu = machine::machine();
    let out = serde_json::json!({
        "machine": {"cpu": cpu, "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "device": locus::model::device::name(&device),
        "batch": BATCH, "seq": SEQ, "reps": REPS,
        "forward_s": forward_s, "fwd_bwd_s": fwd_bwd_s, "trace_step_s": trace_s, "trace_norms_s": trace_norms_s,
        "tokens_per_s_fwd": tokens / forward_s,
        "tokens_per_s_fwd_bwd": tokens / fwd_bwd_s,
        "tokens_per_s_trace": tokens / trace_s,
        "tokens_per_s_trace_norms": tokens / trace_norms_s,
        "peak_rss_mb": {"forward": forward_rss, "fwd_bwd": fwd_bwd_rss, "trace_step": trace_rss, "trace_norms": trace_norms_rss},
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
