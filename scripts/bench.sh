#!/usr/bin/env bash
# locus against PyTorch on this machine, one benchmark after the other (never concurrently), 2
# threads each, SmolLM2-135M f32: the training steps on 4 x 128 tokens (forward, forward +
# backward, trace step, building the gradients and keeping only their norms, the per-batch TGL step, traced every batch and as served, against PyTorch's
# naive trace-then-train loop),
# scoring and greedy generation (locus through gRPC, PyTorch through transformers), query p99
# under ingest against idle, and peak memory. Prints one table with the machine, and keeps every
# JSON object in OUT (default target/bench). About 20 minutes on 2 cores. Needs torch,
# transformers, gguf and accelerate for python3 (see scripts/reference/).
# LOCUS_FEATURES=mkl benchmarks the build on Intel MKL (scripts/fetch_mkl.sh fetches it).
# ROUNDS=3 repeats the step benches of both (with the per-batch step traced every batch) twice
# more, alternated, and prints the median ratios.
# TORCH_COMPILE=1 also times PyTorch's training steps compiled by torch.compile (inductor, about
# 3 minutes more) and prints locus's median against them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench}
mkdir -p "$out"
features=${LOCUS_FEATURES-}
if [[ $features == *mkl* && -z ${MKLROOT-} ]]; then
  export "$(scripts/fetch_mkl.sh)"
fi
bench=(cargo bench --features "$features")
"${bench[@]}" --bench step > "$out/locus.json"
"${bench[@]}" --bench update_step > "$out/update_step.json"
"${bench[@]}" --bench load > "$out/load.json"
gguf=$(python3 -c 'import os; print(os.path.join(os.environ.get("LOCUS_HOME", os.path.expanduser("~/.cache/locus")), "models/SmolLM2-135M-Instruct.Q4_1.gguf"))')
python3 scripts/reference/bench_torch.py --gguf "$gguf" --threads 2 --json-out "$out/torch.json" > /dev/null
# ROUNDS=N repeats the step benches of both, one after the other, N - 1 more times: on a shared
# machine one run's ratio moves 10-30%, and the median over rounds says more.
rm -f "$out"/locus.[0-9]*.json "$out"/update_step.[0-9]*.json "$out"/torch.[0-9]*.json
for ((round = 2; round <= ${ROUNDS:-1}; round++)); do
  "${bench[@]}" --bench step > "$out/locus.$round.json"
  "${bench[@]}" --bench update_step -- --traced-only > "$out/update_step.$round.json"
  python3 scripts/reference/bench_torch.py --gguf "$gguf" --threads 2 --steps-only \
    --json-out "$out/torch.$round.json" > /dev/null
done
rm -f "$out/torch.compiled.json"
if [[ ${TORCH_COMPILE-} == 1 ]]; then
  python3 scripts/reference/bench_torch.py --gguf "$gguf" --threads 2 --compile \
    --json-out "$out/torch.compiled.json" > /dev/null
fi
python3 - "$out" "${ROUNDS:-1}" <<'PY'
import datetime, json, os, statistics, sys
out = sys.argv[1]
l, u, q, t = (json.load(open(f"{out}/{n}.json")) for n in ["locus", "update_step", "load", "torch"])
def every(u, n):
    return next(r for r in u["runs"] if r["localization"].get("reselect_every") == n)
traced, served = every(u, 1), every(u, 4)
features = os.environ.get("LOCUS_FEATURES") or "default"
print(f'machine: {t["machine"]["cpu"]}, {t["machine"]["logical_cpus"]} logical CPUs; torch {t["torch"]}; '
      f'locus features: {features}; {datetime.date.today()}')
print("| operation | locus | PyTorch | PyTorch time / locus time |")
print("| --- | --- | --- | --- |")
def row(name, mine, theirs, unit, faster_is_lower=True):
    ratio = theirs / mine if faster_is_lower else mine / theirs
    print(f"| {name} | {mine:.3g} {unit} | {theirs:.3g} {unit} | {ratio:.2f} |")
row("forward", l["forward_s"], t["forward_s"], "s")
row("forward + backward", l["fwd_bwd_s"], t["fwd_bwd_s"], "s")
row("trace step", l["trace_step_s"], t["trace_step_s"], "s")
row("trace step keeping only the norms, as `locus trace` (PyTorch: the trace step)", l["trace_norms_s"], t["trace_step_s"], "s")
row("per-batch TGL step, traced every batch (PyTorch: trace step + train step)", traced["seconds_per_batch"], t["tgl_step_s"], "s")
row("per-batch TGL step as served, re-selected every 4th batch (mean of 4)", served["seconds_per_batch"], t["tgl_step_s"], "s")
row("score 2 candidates (locus p50 through gRPC)", q["idle"]["p50_ms"], t["score_ms"], "ms")
row("greedy generation (locus through gRPC)", q["generation"]["median_tokens_per_s"], t["generate_tok_s"], "tok/s", False)
print(f'query p99 under ingest / idle p99 (locus): {q["p99_ratio"]:.2f} '
      f'({q["during_ingest"]["p99_ms"]:.0f} ms / {q["idle"]["p99_ms"]:.0f} ms)')
for d in u["drift_documents"]:
    print(f'per-batch TGL step as served on {d["documents"]} drift documents ({d["tokens_per_batch"]} tokens, packed): '
          f'{d["seconds_per_batch"]:.2f} s, {d["tokens_per_s"]:.0f} tokens/s (locus; 4 x 128 full rows: '
          f'{4 * 128 / served["seconds_per_batch"]:.0f} tokens/s)')
# Each round as its step timings: locus's step bench with its per-batch step traced every batch.
def timings(l, u):
    return {**l, "tgl_step_s": every(u, 1)["seconds_per_batch"]}
rounds = [(timings(l, u), t)] + [
    (timings(json.load(open(f"{out}/locus.{r}.json")), json.load(open(f"{out}/update_step.{r}.json"))),
     json.load(open(f"{out}/torch.{r}.json")))
    for r in range(2, 1 + int(sys.argv[2]))]
steps = [("forward", "forward_s"), ("forward + backward", "fwd_bwd_s"), ("trace step", "trace_step_s"),
         ("per-batch TGL step traced every batch", "tgl_step_s")]
if len(rounds) > 1:
    for name, key in steps:
        ratios = [theirs[key] / mine[key] for mine, theirs in rounds]
        each = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"{name}, PyTorch time / locus time over {len(rounds)} alternated rounds: {each}; "
              f"median {statistics.median(ratios):.2f}")
if os.path.exists(f"{out}/torch.compiled.json"):
    c = json.load(open(f"{out}/torch.compiled.json"))
    # The compiled run has no TGL step: it recompiles on every call.
    for name, key in (row for row in steps if c[row[1]] is not None):
        mine = statistics.median(m[key] for m, _ in rounds)
        print(f"{name} against torch.compile (inductor, compiled in {c['compile_s'][key[:-2]]} s): "
              f"locus {mine:.3g} s (median of {len(rounds)}), PyTorch compiled {c[key]:.3g} s, ratio {c[key] / mine:.2f}")
print("peak RSS MB, training steps: locus", {k: round(v) for k, v in l["peak_rss_mb"].items()},
      "PyTorch", t["peak_rss_mb"], f'(with AdamW state: {t["peak_rss_with_adamw_mb"]})')
PY
