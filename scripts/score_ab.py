"""Score latency of two running servers, requests alternating between them one at a time, so both
see the same machine load; checks that both give the same log-probabilities.

Usage: python3 scripts/score_ab.py ADDR_A ADDR_B [N]   (N measured requests each, default 100)
Start the two builds first, e.g. `locus serve --grpc-addr 127.0.0.1:50061 --metrics-addr
127.0.0.1:0` and the same on 50062. Needs grpcio and grpcio-tools (.ci/run installs them).
"""
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_tools import protoc

root = Path(__file__).resolve().parent.parent
out = tempfile.mkdtemp()
protoc.main(["protoc", f"-I{root / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}",
             "locus/v1/locus.proto"])
sys.path.insert(0, out)
from locus.v1 import locus_pb2 as pb, locus_pb2_grpc as rpc  # noqa: E402

addrs = sys.argv[1:3]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 100
warmup = 10
probes = [json.loads(l) for l in open(root / "data/drift/stable.jsonl") if l.strip()]
stubs = [rpc.QueryStub(grpc.insecure_channel(a)) for a in addrs]
latencies = [[], []]
for i in range(warmup + n):
    p = probes[i % len(probes)]
    req = pb.ScoreRequest(prompt=p["prompt"], candidates=[p["gold"], p["foil"]])
    scores = []
    for s in ([0, 1] if i % 2 == 0 else [1, 0]):
        start = time.perf_counter()
        reply = stubs[s].Score(req)
        if i >= warmup:
            latencies[s].append((time.perf_counter() - start) * 1e3)
        scores.append(sorted(c.logprob for c in reply.ranked))
    assert all(abs(a - b) < 1e-3 for a, b in zip(*scores)), scores
for addr, lat in zip(addrs, latencies):
    lat.sort()
    print(f"{addr}: p50 {statistics.median(lat):.1f} ms, p90 {lat[int(0.9 * len(lat))]:.1f} ms, "
          f"mean {statistics.mean(lat):.1f} ms, n {len(lat)}")
