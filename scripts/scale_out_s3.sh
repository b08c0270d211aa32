#!/usr/bin/env bash
# A writer and a reader of the default model publishing through an S3 bucket (moto's
# S3-compatible server on 127.0.0.1): streams the first three drift facts' documents in batches of
# 4 and prints each delta's size against the model's and when the reader served it.
# Needs `python3 -m pip install 'moto[server]'` and a release build (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/locus
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

python3 - "$work/docs.jsonl" <<'EOF'
import json, sys
facts = [json.loads(l) for l in open("data/drift/updates.jsonl") if l.strip()][:3]
with open(sys.argv[1], "w") as out:
    for f in facts:
        for text in f["docs"]:
            out.write(json.dumps({"text": text, "salient": f.get("salient", [])}) + "\n")
EOF

mkfifo "$work/hold"
python3 tests/support/s3_server.py published <"$work/hold" >"$work/endpoint" 2>/dev/null &
pids+=($!)
exec 3>"$work/hold"
until [[ -s $work/endpoint ]]; do sleep 0.2; done
export AWS_ENDPOINT=$(cat "$work/endpoint") AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test RUST_LOG=locus=info NO_COLOR=1

"$bin" serve --data-dir "$work/data" --store s3://published/smol \
  --grpc-addr 127.0.0.1:50061 --checkpoint-every 4 2>"$work/writer.log" &
pids+=($!)
"$bin" serve --role reader --store s3://published/smol --grpc-addr 127.0.0.1:50062 \
  2>"$work/reader.log" &
pids+=($!)
until grep -q 'model loaded' "$work/writer.log" && grep -q 'model loaded' "$work/reader.log"; do
  sleep 0.5
done
"$bin" client --addr 127.0.0.1:50061 ingest --batch-size 4 "$work/docs.jsonl" 2>&1 | tail -n 1
# Publishing runs beside learning; wait (at most a minute) for the reader to serve version 2.
for _ in $(seq 120); do
  grep -q 'following the writer version=2' "$work/reader.log" && break
  sleep 0.5
done
# Timestamps, then what happened: compare a delta's publication with the reader's.
grep -ahE 'update step|delta published' "$work/writer.log" | sed -E 's/ +INFO .*(locus::[a-z:_]+): / \1: /' | cut -c1-180
grep -ah 'following the writer' "$work/reader.log" | sed -E 's/ +INFO / /' | cut -c1-180
