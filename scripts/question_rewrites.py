#!/usr/bin/env python3
"""Builds a drift-set copy in which each document of the first N facts of a split ends with its
subject-first sentences asked as questions: "Kristrún Frostadóttir became prime minister of
Iceland ..." adds "Who became prime minister of Iceland ...? Kristrún Frostadóttir." The idea tried
in docs/learning.md point 26 through `locus eval-stream --data OUT`: news names the new office
holder first and the office after, a probe asks for the office first and the name after, and a
model trained on one order of a fact does not learn the other (the "reversal curse").

Usage: python3 scripts/question_rewrites.py SPLIT N OUT [--control]
  The lead name of a fact's documents is the name (a run of capitalised words) whose last word
  they mention most, as the server's `trending` rule counts them; only sentences that open with it
  and go on with a lower-case word are rewritten. Rows stay as many as before. Standard library.
  --control: the same sentences appended unchanged instead, so a row grows by about as many tokens
  without the reordering.
"""

import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

OPENERS = set("The A An In On At Since After Before He She It They Its His Her This That As By "
              "For From With When While".split())
MONTHS = set("January February March April May June July August September October November "
             "December".split())
NAME = r"(?:[A-ZÀ-Ý][\w'\-]*)(?:\s+(?:(?:de|da|del|van|von|bin)\s+|al-)?[A-ZÀ-Ý][\w'\-]*)*"


def sentences(text):
    return re.split(r"(?<=[.!?])\s+", text.strip())


def last_word(name):
    return name.split()[-1].removesuffix("'s")


def lead(docs):
    counts = Counter(w for d in docs for w in re.findall(r"[\w'\-]+", d))
    best = None
    for d in docs:
        for m in re.finditer(NAME, d):
            name = m.group()
            if name.split()[0] in OPENERS or name.split()[0] in MONTHS:
                continue
            key = (counts[last_word(name)], len(name))
            if best is None or key > best[0]:
                best = (key, name)
    return best[1] if best else None


def questions(doc, name, control):
    out = []
    for s in sentences(doc):
        m = re.match(NAME, s)
        if not m or m.group().split()[0] in OPENERS or last_word(m.group()) != last_word(name):
            continue
        rest = s[m.end():].strip()
        if not rest or not rest[0].islower():
            continue
        out.append(s if control else f"Who {rest.rstrip('.!?')}? {m.group()}.")
    return out


def main():
    split, n, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    control = "--control" in sys.argv[4:]
    out.mkdir(parents=True, exist_ok=True)
    for name in ("stable.jsonl", "general.txt"):
        shutil.copy(Path("data/drift") / name, out / name)
    lines, seen, rewritten, docs_total = [], 0, 0, 0
    for line in Path("data/drift/updates.jsonl").read_text(encoding="utf-8").splitlines():
        u = json.loads(line)
        if u["id"].startswith(f"{split}-") and seen < n:
            seen += 1
            name = lead(u["docs"])
            docs = []
            for d in u["docs"]:
                qs = questions(d, name, control) if name else []
                docs_total += 1
                rewritten += bool(qs)
                docs.append(" ".join([d] + qs))
            u["docs"] = docs
        lines.append(json.dumps(u, ensure_ascii=False))
    (out / "updates.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{rewritten} of {docs_total} documents got questions", file=sys.stderr)


if __name__ == "__main__":
    main()
