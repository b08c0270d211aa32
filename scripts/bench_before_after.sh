#!/usr/bin/env bash
# This tree's step, update_step and load benchmarks against those of an earlier commit, on this
# machine: each benchmark runs for the earlier tree and then for this one, never concurrently, so
# both see the same machine within minutes. Prints one table and keeps every JSON object in OUT.
#
# Usage: scripts/bench_before_after.sh REV [OUT]   (OUT default target/bench-before-after)
# The earlier tree is checked out in OUT/tree (or OLD_TREE) and built in OUT/target (or
# OLD_TARGET_DIR): a cold release build, about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$1 out=${2:-target/bench-before-after}
mkdir -p "$out"
old=${OLD_TREE:-$out/tree}
[ -d "$old" ] || git worktree add --detach "$old" "$rev"
old_target=${OLD_TARGET_DIR:-$(realpath "$out")/target}
(cd "$old" && CARGO_TARGET_DIR=$old_target cargo bench --no-run --quiet)
cargo bench --no-run --quiet
for b in step update_step load; do
  (cd "$old" && CARGO_TARGET_DIR=$old_target cargo bench --bench "$b") > "$out/before-$b.json"
  cargo bench --bench "$b" > "$out/after-$b.json"
done
python3 - "$out" "$(git -C "$old" rev-parse --short HEAD)" "$(git rev-parse --short HEAD)" <<'PY'
import json, sys
out, before_rev, after_rev = sys.argv[1:]
load = lambda side, b: json.load(open(f"{out}/{side}-{b}.json"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"machine: {cpu}; before {before_rev}, after {after_rev}")
print("| benchmark | before | after | after / before |")
print("| --- | --- | --- | --- |")
def row(name, a, b, unit):
    print(f"| {name} | {a:.3g} {unit} | {b:.3g} {unit} | {b / a:.2f} |")
s0, s1 = load("before", "step"), load("after", "step")
for k, name in [("forward_s", "step: forward"), ("fwd_bwd_s", "step: forward + backward"),
                ("trace_step_s", "step: trace step")]:
    row(name, s0[k], s1[k], "s")
key = lambda r: (r["strategy"], json.dumps(r["localization"], sort_keys=True))
u0 = {key(r): r for r in load("before", "update_step")["runs"]}
for r in load("after", "update_step")["runs"]:
    if key(r) in u0:
        loc = r["localization"]["mode"] if isinstance(r["localization"], dict) else r["localization"]
        if isinstance(r["localization"], dict) and "reselect_every" in r["localization"]:
            loc += f', re-selected every {r["localization"]["reselect_every"]}'
        row(f"update_step: {r['strategy']}, {loc}", u0[key(r)]["seconds_per_batch"],
            r["seconds_per_batch"], "s")
q0, q1 = load("before", "load"), load("after", "load")
for part, k in [("idle", "p50_ms"), ("idle", "p99_ms"), ("during_ingest", "p99_ms")]:
    row(f"load: Score {k[:3]} {part.replace('_', ' ')}", q0[part][k], q1[part][k], "ms")
PY
