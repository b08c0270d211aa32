#!/usr/bin/env bash
# The GPU check: the CUDA build's exactness against the committed PyTorch fixtures and its speed
# against PyTorch on the same GPU, in one table.
#
# The GPU machine has no Rust toolchain and no network, and a device call carries at most 64 MiB,
# so the work is split in two:
#
#   scripts/gpu_check.sh pack            on a CPU machine: builds the `cuda` feature's binary,
#                                        reference tests and benches (scripts/build_cuda.sh, about
#                                        12 min cold on 2 cores), and packs them with the default
#                                        model and the `gguf` wheel into gpu-check/part.NN
#                                        (48 MiB each, so a part and the working tree fit one call; about 3 parts)
#   scripts/gpu_check.sh run PARTS_DIR   on the GPU machine, once every part is in PARTS_DIR:
#                                        unpacks, then prints one table
#
# With the device tool: one call per part, carrying `gpu-check/part.NN` and copying it to
# /tmp/gc (a warm machine keeps /tmp between calls made within its idle window), the last call
# ending in `scripts/gpu_check.sh run /tmp/gc`. What `run` does (about 4 minutes on one H200):
#   1. the reference tests (tiny models of every architecture: logits, losses and every parameter
#      gradient against transformers) and the default-model trace test on cuda:0;
#   2. `step` and `update_step` on cuda:0, then scripts/reference/bench_torch.py --device cuda;
#   3. the table: forward, forward + backward and trace step, locus against PyTorch.
# `LOCUS_DEVICE=cpu scripts/gpu_check.sh run DIR` does the same on the CPU with parts packed from a
# CPU build (`pack` with GPU_CHECK_FEATURES=""): a dry run of the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
pack_dir=$repo/gpu-check
tests=(reference default_model)
benches=(step update_step)

# The newest binary cargo built for test or bench target $1.
built() {
  ls -t target/release/deps/"$1"-* | grep -v '\.d$' | head -1
}

pack() {
  local stage features=${GPU_CHECK_FEATURES-cuda} cargo=(scripts/build_cuda.sh --)
  [[ -z $features ]] && cargo=(cargo)
  stage=$(mktemp -d)
  "${cargo[@]}" build --locked --release --features "$features" --bin locus
  "${cargo[@]}" test --locked --release --features "$features" --no-run "${tests[@]/#/--test=}"
  "${cargo[@]}" bench --locked --features "$features" --no-run "${benches[@]/#/--bench=}"
  mkdir -p "$stage/bin"
  cp target/release/locus "$stage/bin/"
  for t in "${tests[@]}" "${benches[@]}"; do cp "$(built "$t")" "$stage/bin/$t"; done
  strip "$stage"/bin/*
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$stage/wheels" gguf
  local model
  model=$(python3 -c 'import os; print(os.path.join(os.environ.get("LOCUS_HOME", os.path.expanduser("~/.cache/locus")), "models/SmolLM2-135M-Instruct.Q4_1.gguf"))')
  cp "$model" "$stage/"
  rm -rf "$pack_dir"
  mkdir -p "$pack_dir"
  tar -C "$stage" -cJf - . | split -b 48m -d - "$pack_dir/part."
  rm -rf "$stage"
  ls -l "$pack_dir"
}

# The directories of the CUDA runtime libraries of the local PyTorch install (cuBLAS, cudart,
# cuRAND, NVRTC), for the binaries built against the same CUDA 13 libraries.
cuda_libs() {
  python3 - <<'PY'
import glob, os
import nvidia
roots = list(nvidia.__path__)
dirs = {os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PY
}

run() {
  local parts=$1 work torch_device=cpu
  export LOCUS_DEVICE=${LOCUS_DEVICE:-cuda:0}
  if [[ $LOCUS_DEVICE == cuda* ]]; then
    torch_device=cuda
    command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi: not a GPU machine" >&2; exit 1; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    LD_LIBRARY_PATH=$(cuda_libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LD_LIBRARY_PATH
  fi
  work=$(mktemp -d)
  cat "$parts"/part.* | tar -C "$work" -xJf -
  export LOCUS_HOME=$work/home LOCUS_REPO=$repo
  mkdir -p "$LOCUS_HOME/models"
  mv "$work/SmolLM2-135M-Instruct.Q4_1.gguf" "$LOCUS_HOME/models/"
  python3 -m pip install -q --no-index --find-links "$work/wheels" gguf
  local failed=0
  for t in "${tests[@]}"; do
    echo "== $t on $LOCUS_DEVICE"
    "$work/bin/$t" --test-threads 1 || failed=1
  done
  echo "== step, update_step on $LOCUS_DEVICE"
  "$work/bin/step" --bench >"$work/locus.json"
  "$work/bin/update_step" --bench >"$work/update.json"
  python3 scripts/reference/bench_torch.py --device "$torch_device" \
    --gguf "$LOCUS_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf" --json-out "$work/torch.json" >/dev/null
  python3 - "$work/locus.json" "$work/torch.json" "$work/update.json" <<'PY'
import json, sys
l, t, u = (json.load(open(p)) for p in sys.argv[1:4])
print(f"GPU run: locus on {l['device']}, torch {t['torch']} on {t['device']}; CPU {t['machine']['cpu']}")
print(f'{"":14}{"locus s":>10}{"torch s":>10}{"torch/locus":>13}')
for k in ["forward_s", "fwd_bwd_s", "trace_step_s"]:
    print(f'{k:14}{l[k]:10.4f}{t[k]:10.4f}{t[k] / l[k]:13.2f}')
for r in u["runs"]:
    loc = r["localization"]
    every = f', re-selected every {loc["reselect_every"]}' if "reselect_every" in loc else ""
    print(f'update_step {r["strategy"]} ({loc["mode"]}{every}, {r["groups_updated"]} groups): {r["seconds_per_batch"]:.4f} s')
traced = next(r for r in u["runs"] if r["localization"].get("reselect_every") == 1)
print(f'per-batch TGL step traced every batch: torch trace + train {t["tgl_step_s"]:.4f} s / locus '
      f'{traced["seconds_per_batch"]:.4f} s = {t["tgl_step_s"] / traced["seconds_per_batch"]:.2f}')
PY
  cp "$work"/*.json "${OUT:-$work}/" 2>/dev/null || true
  exit "$failed"
}

case ${1:-} in
  pack) pack ;;
  run) run "${2:?usage: scripts/gpu_check.sh run PARTS_DIR}" ;;
  *) echo "usage: scripts/gpu_check.sh pack | run PARTS_DIR" >&2; exit 2 ;;
esac
