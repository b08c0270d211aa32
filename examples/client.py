#!/usr/bin/env python3
"""A locus client in Python with grpcio: health, reflection, info, score, complete, perplexity,
and optionally one ingested document followed by the same score again.

    python3 -m pip install grpcio grpcio-tools grpcio-health-checking grpcio-reflection
    cargo run --release -- serve --model default &
    python3 examples/client.py --addr 127.0.0.1:50051 \
        --ingest "On 8 May 2025 the conclave elected Leo XIV." --salient "Leo XIV"

The stubs are generated at start-up from proto/locus/v1/locus.proto with grpcio-tools' bundled
protoc, so nothing generated is committed.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def stubs():
    """Compiles the API into a temporary directory and imports its message and service modules."""
    import grpc_tools
    from grpc_tools import protoc

    proto = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    out = tempfile.mkdtemp(prefix="locus-grpc-")
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "locus/v1/locus.proto",
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed on locus.proto (exit {rc})")
    sys.path.insert(0, out)
    return (
        importlib.import_module("locus.v1.locus_pb2"),
        importlib.import_module("locus.v1.locus_pb2_grpc"),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addr", default=os.environ.get("LOCUS_ADDR", "127.0.0.1:50051"))
    ap.add_argument("--token", default=os.environ.get("LOCUS_TOKEN"), help="bearer token")
    ap.add_argument("--prompt", default="The current pope is")
    ap.add_argument("--candidates", nargs="+", default=[" Leo XIV", " Francis"])
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--ingest", metavar="TEXT", help="a document to learn from (write access)")
    ap.add_argument("--salient", nargs="*", default=[], help="salient strings of --ingest")
    ap.add_argument("--json", action="store_true", help="print one JSON summary instead of lines")
    a = ap.parse_args()

    pb, rpc = stubs()
    channel = grpc.insecure_channel(a.addr)
    metadata = [("authorization", f"Bearer {a.token}")] if a.token else []
    out = {}

    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status
    out["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    # Reflection needs no proto file: this is what grpcurl and Postman rely on.
    out["services"] = sorted(ProtoReflectionDescriptorDatabase(channel).get_services())

    info = rpc.AdminStub(channel).Info(pb.InfoRequest(), metadata=metadata)
    out["info"] = {
        "architecture": info.architecture,
        "layers": info.layers,
        "version": info.version,
        "strategy": info.strategy,
    }

    query = rpc.QueryStub(channel)

    def score():
        r = query.Score(
            pb.ScoreRequest(prompt=a.prompt, candidates=a.candidates), metadata=metadata
        )
        return {
            "version": r.version,
            "ranked": [{"candidate": c.candidate, "logprob": c.logprob} for c in r.ranked],
        }

    out["score"] = score()
    chunks = list(
        query.Complete(
            pb.CompleteRequest(prompt=a.prompt, max_tokens=a.max_tokens, temperature=0.0),
            metadata=metadata,
        )
    )
    out["complete"] = {
        "version": chunks[-1].version,
        "text": "".join(c.text for c in chunks),
        "tokens": chunks[-1].tokens,
        "finish": pb.FinishReason.Name(chunks[-1].finish_reason),
    }
    ppl = query.Perplexity(
        pb.PerplexityRequest(texts=[a.prompt + a.candidates[0]]), metadata=metadata
    )
    out["perplexity"] = {"version": ppl.version, "perplexity": ppl.texts[0].perplexity}

    if a.ingest:
        document = pb.Document(text=a.ingest, salient=a.salient, source="examples/client.py")
        requests = iter([pb.IngestRequest(documents=[document], client_batch_id="py-1")])
        for r in rpc.LearnStub(channel).Ingest(requests, metadata=metadata):
            out["ingest"] = {
                "client_batch_id": r.client_batch_id,
                "version": r.version,
                "accepted": list(r.accepted),
                "rejected": [f"{j.field}: {j.reason}" for j in r.rejected],
                "groups": [
                    f"{g.layer}.{pb.Module.Name(g.module).removeprefix('MODULE_').lower()}"
                    for s in r.steps
                    for g in s.groups
                ],
            }
        out["score_after"] = score()

    if a.json:
        print(json.dumps(out))
        return
    print(f"health {out['health']}; services {', '.join(out['services'])}")
    i = out["info"]
    print(f"model {i['architecture']} ({i['layers']} layers), version {i['version']}, {i['strategy']}")
    for key in ("score", "score_after"):
        if key in out:
            ranked = ", ".join(f"{c['candidate']!r} {c['logprob']:.3f}" for c in out[key]["ranked"])
            print(f"{key} at version {out[key]['version']}: {ranked}")
    c = out["complete"]
    print(f"complete at version {c['version']} ({c['finish']}): {a.prompt}{c['text']}")
    if "ingest" in out:
        g = out["ingest"]
        print(f"ingested: version {g['version']}, groups {' '.join(g['groups']) or '-'}")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        sys.exit(f"locus: {e.code().name}: {e.details()}")
