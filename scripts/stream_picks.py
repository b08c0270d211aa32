#!/usr/bin/env python3
"""Which names the automatic span rule picked in an `locus eval-stream --json` run, against which
facts were taken up (docs/learning.md point 28).

Usage: python3 scripts/stream_picks.py RUN.json [BATCH_SIZE]   (BATCH_SIZE: the run's, default 2)

A document "picks the new answer" when one of its span texts (the step report's `spans`) shares a
word of three letters or more with a new answer of its fact's probes. Prints, over the run's
facts: how many probes fail where every, some or no document picked the new answer, and the
picks of facts whose documents fell into two steps against facts learned in one. Standard library.
"""

import json
import re
import sys
from pathlib import Path


def words(text):
    return {w.lower() for w in re.findall(r"[\w\-]+", text) if len(w) >= 3}


def main():
    run = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    updates = Path(__file__).resolve().parent.parent / "data/drift/updates.jsonl"
    facts = {}
    for line in updates.read_text(encoding="utf-8").splitlines():
        u = json.loads(line)
        facts[u["id"]] = u
    failed, steps = {}, {}
    for p in run["probes"]:
        failed.setdefault(p["fact"], []).append(p["after"] <= 0)
    for i, d in enumerate(run["spans"]):
        steps.setdefault(d["fact"], set()).add(i // batch)
    rows = []
    for fact, fails in failed.items():
        probes = facts[fact]["probes"]
        new = set().union(*(words(p["new"]) for p in probes))
        docs = [d["texts"] for d in run["spans"] if d["fact"] == fact]
        hits = sum(any(words(t) & new for t in texts) for texts in docs)
        rows.append((len(steps[fact]) > 1, hits, len(docs), sum(fails), len(fails), fact))
    groups = [
        ("every document picks the new answer", [r for r in rows if r[1] == r[2]]),
        ("some documents do", [r for r in rows if 0 < r[1] < r[2]]),
        ("no document does", [r for r in rows if r[1] == 0]),
        ("facts split between two steps", [r for r in rows if r[0]]),
        ("facts learned in one step", [r for r in rows if not r[0]]),
    ]
    for name, g in groups:
        print(
            f"{name}: {len(g)} facts, picks naming the new answer "
            f"{sum(r[1] for r in g)} of {sum(r[2] for r in g)} documents, "
            f"{sum(r[3] for r in g)} of {sum(r[4] for r in g)} probes fail"
        )
    print("facts no document picked for:", ", ".join(r[5] for r in rows if r[1] == 0))


if __name__ == "__main__":
    main()
