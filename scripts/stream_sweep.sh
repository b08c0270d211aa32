#!/usr/bin/env bash
# Streams a drift split once through `locus eval-stream` for each cell of a sweep and seed, and
# writes one JSON per run; scripts/stream_table.py turns them into the table in docs/learning.md.
#
# Usage: scripts/stream_sweep.sh CELLS_FILE OUT_DIR [SPLIT] [SEEDS]
#   CELLS_FILE: one cell a line, `name: flags for locus eval-stream` (# starts a comment)
#   SPLIT: dev (default; choose settings here) or test (report once the choices are fixed)
#   SEEDS: space-separated, default "0 1 2"
# A run whose JSON exists is skipped, so an interrupted sweep resumes. LOCUS_BIN names the binary
# to run (default: build target/release/locus first).
set -euo pipefail
cells=$1 out=$2 split=${3:-dev} seeds=${4:-0 1 2}
cd "$(dirname "$0")/.."
bin=${LOCUS_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet --bin locus
  bin=target/release/locus
fi
mkdir -p "$out"
grep -v '^\s*#' "$cells" | grep -v '^\s*$' | while IFS= read -r line; do
  name=${line%%:*} flags=${line#*:}
  for seed in $seeds; do
    json="$out/$name.$split.seed$seed.json"
    [ -s "$json" ] && continue
    echo "== $name seed $seed ($split): $flags" >&2
    # shellcheck disable=SC2086
    if "$bin" eval-stream --split "$split" --seed "$seed" --json $flags \
        >"$json.tmp" 2>"$out/$name.$split.seed$seed.log"; then
      mv "$json.tmp" "$json"
    else
      echo "failed: see $out/$name.$split.seed$seed.log" >&2
      rm -f "$json.tmp"
    fi
  done
done
