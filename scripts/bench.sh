#!/usr/bin/env bash
# Trace-step and training-step benchmark of locus against PyTorch on this machine, one after the
# other (never concurrently), 4 x 128 tokens on SmolLM2-135M, 2 threads each. Prints both JSON
# objects and the ratios. Needs torch, transformers and gguf for python3 (see scripts/reference/).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench}
mkdir -p "$out"
cargo bench --bench step > "$out/locus.json"
gguf=$(python3 -c 'import os; print(os.path.join(os.environ.get("LOCUS_HOME", os.path.expanduser("~/.cache/locus")), "models/SmolLM2-135M-Instruct.Q4_1.gguf"))')
python3 scripts/reference/bench_torch.py --gguf "$gguf" --threads 2 --json-out "$out/torch.json" > /dev/null
python3 - "$out/locus.json" "$out/torch.json" <<'PY'
import json, sys
l, t = (json.load(open(p)) for p in sys.argv[1:3])
print("machine:", t["machine"]["cpu"], f'{t["machine"]["logical_cpus"]} logical CPUs; torch', t["torch"])
print(f'{"":14}{"locus s":>10}{"torch s":>10}{"torch/locus":>13}')
for k in ["forward_s", "fwd_bwd_s", "trace_step_s"]:
    print(f'{k:14}{l[k]:10.3f}{t[k]:10.3f}{t[k] / l[k]:13.2f}')
print("peak RSS MB: locus", {k: round(v) for k, v in l["peak_rss_mb"].items()}, "torch", t["peak_rss_mb"])
PY
