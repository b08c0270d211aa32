#!/usr/bin/env bash
# lm-evaluation-harness against the live server: its `local-completions` model on
# `locus serve --http-addr`, with the server's own tokenizer (tokenizer_backend=remote), on the
# local task tests/fixtures/lm_eval/locus_drift.yaml, before and after ingesting the documents of
# its facts. Nothing is fetched from a hub.
#
#   python3 -m pip install "lm-eval[api]"    # no torch or transformers needed for this
#   cargo build --release
#   scripts/lm_eval_drift.sh [extra `locus serve` flags, e.g. --model tests/fixtures/llama]
#
# LOCUS (the binary), LM_EVAL (the lm_eval command), GRPC_ADDR and HTTP_ADDR override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
locus=${LOCUS:-target/release/locus}
lm_eval=${LM_EVAL:-lm_eval}
grpc=${GRPC_ADDR:-127.0.0.1:50091}
http=${HTTP_ADDR:-127.0.0.1:8091}
out=$(mktemp -d)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$locus" serve --grpc-addr "$grpc" --http-addr "$http" "$@" 2>"$out/serve.log" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
until curl -sf "http://$http/v1/models" >/dev/null; do
  kill -0 "$server" 2>/dev/null || { cat "$out/serve.log" >&2; exit 1; }
  sleep 1
done

evaluate() {
  "$lm_eval" --model local-completions \
    --model_args "model=locus,base_url=http://$http/v1/completions,tokenizer_backend=remote,num_concurrent=1,max_retries=1" \
    --include_path tests/fixtures/lm_eval --tasks locus_drift \
    --output_path "$out/$1" --log_samples >"$out/$1.log" 2>&1 || { cat "$out/$1.log" >&2; exit 1; }
  python3 - "$out/$1" "$1" "$(curl -sf "http://$http/v1/models" -o /dev/null -w '%header{x-locus-version}')" <<'PY'
import glob, json, sys
path = sorted(glob.glob(f"{sys.argv[1]}/**/results_*.json", recursive=True))[-1]
r = json.load(open(path))["results"]["locus_drift"]
print(f"{sys.argv[2]:>6}: model version {sys.argv[3]}, acc {r['acc,none']:.3f} ± {r['acc_stderr,none']:.3f}")
PY
}

evaluate before
"$locus" client --addr "$grpc" ingest tests/fixtures/lm_eval/drift_docs.jsonl >"$out/ingest.log"
evaluate after
