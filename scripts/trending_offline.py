#!/usr/bin/env python3
"""Which name the `trending` rule would pick in each dev document, under the base model, for two
ways of settling a tie (docs/learning.md point 29).

Usage: .venv/bin/python scripts/trending_offline.py [--gguf PATH] [--orders N]

Mirrors src/spans.rs (`names`, `Mentions::split`) in Python: the dev facts in N seeded orders
(Python's own shuffle, not locus's), two documents a step, words counted over the step's
documents. Among the entities tied for most mentions it picks either the one the base model finds
most surprising at its first mention (the mean loss of its tokens; the rule before point 29) or the
one the document mentions first (the rule since), both with today's names, and counts the documents whose pick shares a word
with a probe's new answer, and with its old answer. No learning happens, so this only says which
picks a rule makes at the start of a stream; the stream runs in docs/stream/ say what they do.
Needs torch and transformers (the repository's .venv).
"""

import argparse
import json
import random
import re
from pathlib import Path

# What counts as a pick naming an answer is stream_picks.py's rule, shared so the two agree.
from stream_picks import words as answer_words

ROOT = Path(__file__).resolve().parent.parent
OPENERS = set("The A An In On At Since After Before He She It They Its His Her This That As By "
              "For From With When While".split())
MONTHS = set("January February March April May June July August September October November "
             "December".split())
PARTICLES = set("de del della der den di da du van von la le bin ibn".split())


def words(text):
    """Runs of alphanumerics, apostrophes and hyphens, as (start, end, word)."""
    return [(m.start(), m.end(), m.group()) for m in re.finditer(r"(?:[^\W_]|['\-])+", text)]


def names(text):
    ws, spans, i = words(text), [], 0
    capital = lambda w: any(c.isupper() for c in w)
    plain = lambda w: w not in OPENERS and w not in MONTHS
    prefixed = lambda w: "-" in w and len(w.split("-", 1)[0]) <= 3 and capital(w.split("-", 1)[1])
    single = lambda a, b: text[a:b] in (" ", "-")
    while i < len(ws):
        s, e, w = ws[i]
        i += 1
        if not (capital(w) and plain(w)):
            continue
        while i < len(ws) and single(e, ws[i][0]):
            nxt = ws[i][2]
            if (capital(nxt) and plain(nxt)) or prefixed(nxt):
                e, i = ws[i][1], i + 1
            elif (nxt in PARTICLES and i + 1 < len(ws) and capital(ws[i + 1][2])
                  and single(ws[i][1], ws[i + 1][0])):
                e, i = ws[i + 1][1], i + 2
            else:
                break
        spans.append((s, e))
    return spans


def tied_entities(step, text):
    """The entities of `text` whose words the step mentions most, each as its mentions."""
    counts = {}
    for t in step:
        for _, _, w in words(t):
            counts[w] = counts.get(w, 0) + 1
    ws = words(text)
    inside = lambda s, e: [w for a, b, w in ws if s <= a and b <= e]
    scored = [((s, e), max(counts.get(w, 0) for w in inside(s, e))) for s, e in names(text)]
    top = max((c for _, c in scored), default=0)
    entities = {}
    for span, c in scored:
        if c == top:
            last = inside(*span)[-1]
            last = last[:-2] if last.endswith("'s") else last
            entities.setdefault(last, []).append(span)
    return list(entities.values())


def pick(text, step, tokens, rule):
    nll, offsets = tokens
    best, key = None, None
    for mentions in tied_entities(step, text):
        firsts = [[j for j in range(1, len(offsets)) if offsets[j][0] < e and s < offsets[j][1]]
                  for s, e in mentions]
        first = next((t for t in firsts if t), None)
        if first is None:
            continue
        k = (-sum(nll[j - 1] for j in first) / len(first)) if rule == "surprise" else first[0]
        if key is None or k < key:
            best, key = mentions, k
    return [text[s:e] for s, e in best or []]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path,
                    default=Path.home() / ".cache/locus/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--orders", type=int, default=5)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(2)
    g = args.gguf
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name,
                                                 dtype=torch.float32).eval()
    facts = [json.loads(l) for l in (ROOT / "data/drift/updates.jsonl").read_text().splitlines()]
    dev = [f for f in facts if f["id"].startswith("dev-")]
    tokens = {}
    for f in dev:
        for d in f["docs"]:
            enc = tok(d, return_offsets_mapping=True, add_special_tokens=False)
            ids = torch.tensor([enc["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            nll = (-logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)).tolist()
            tokens[d] = (nll, enc["offset_mapping"])
    for rule in ("surprise", "first"):
        new_hits = old_hits = 0
        for seed in range(args.orders):
            order = dev[:]
            random.Random(seed).shuffle(order)
            stream = [(f, d) for f in order for d in f["docs"]]
            for i, (f, d) in enumerate(stream):
                step = [x[1] for x in stream[i - i % 2:i - i % 2 + 2]]
                picked = set().union(*(answer_words(t) for t in pick(d, step, tokens[d], rule)))
                new = set().union(*(answer_words(p["new"]) for p in f["probes"]))
                old = set().union(*(answer_words(p["old"]) for p in f["probes"])) - new
                new_hits += bool(picked & new)
                old_hits += bool(picked & old)
        total = args.orders * sum(len(f["docs"]) for f in dev)
        print(f"{rule}: of {total} documents, the pick names the new answer in {new_hits}, "
              f"the old answer in {old_hits}")


if __name__ == "__main__":
    main()
