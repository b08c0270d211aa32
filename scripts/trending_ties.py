#!/usr/bin/env python3
"""How often the outgoing answer ties with the news for the most mentions in a fact's documents.

Usage: python3 scripts/trending_ties.py [dev|test] [N]   (first N facts of the split; default all)

Mirrors the name rule of src/spans.rs (`names`, `Mentions::split`) as it was before names joined
particles, counting words over the fact's documents (one fact's documents share a learning step
at the served defaults). A fact counts as a tie when a probe's old answer is among the names tied
for the most mentions: the `trending` rule then had both the old and the new answer as targets.
Standard library only; no model.
"""

import json
import re
import sys
from pathlib import Path

OPENERS = set("The A An In On At Since After Before He She It They Its His Her This That As By "
              "For From With When While".split())
MONTHS = set("January February March April May June July August September October November "
             "December".split())


def words(text):
    return [(m.start(), m.end(), m.group()) for m in re.finditer(r"[\w'\-]+", text)]


def names(text):
    ws, out, i = words(text), [], 0
    named = lambda w: w[0].isupper() and w not in OPENERS and w not in MONTHS
    while i < len(ws):
        s, e, w = ws[i]
        i += 1
        if not named(w):
            continue
        while i < len(ws) and named(ws[i][2]) and text[e:ws[i][0]] in (" ", "-"):
            e = ws[i][1]
            i += 1
        out.append(text[s:e])
    return out


def top_names(docs):
    counts = {}
    for d in docs:
        for _, _, w in words(d):
            counts[w] = counts.get(w, 0) + 1
    scored = [(n, max(counts.get(w, 0) for _, _, w in words(n))) for d in docs for n in names(d)]
    top = max((c for _, c in scored), default=0)
    return {n for n, c in scored if c == top}


def main():
    split = sys.argv[1] if len(sys.argv) > 1 else "dev"
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else None
    path = Path(__file__).resolve().parent.parent / "data/drift/updates.jsonl"
    facts = [json.loads(l) for l in path.read_text().splitlines()]
    facts = [f for f in facts if f["id"].startswith(split + "-")][:limit]
    ties = []
    for f in facts:
        top = top_names(f["docs"])
        olds = {p["old"].strip() for p in f["probes"]}
        if any(o in n or n in o for o in olds for n in top):
            ties.append(f["id"])
    print(f"{split}: {len(ties)} of {len(facts)} facts name the old answer among the most mentioned")
    for t in ties:
        print("  ", t)


if __name__ == "__main__":
    main()
