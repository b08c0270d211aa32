#!/usr/bin/env python3
"""Builds a drift-set copy in which each document of the first N facts of a split is followed by
the model's own one-sentence summary of it: the "server's own rewrites" tried in docs/learning.md
point 21 through `locus eval-stream --data OUT`.

Usage: .venv/bin/python scripts/self_summaries.py SPLIT N OUT [--copies]
  Greedy, with the default model (SmolLM2-135M-Instruct, the GGUF locus downloads) and its chat
  template: "Summarize in one sentence: <document>". A summary is kept only if it ends a sentence,
  shares a name with its document and names no word or number the document does not contain (the
  guard a server would need against the model writing its outdated belief back in).
  --copies: the control at the same number of rows: each kept summary replaced by a verbatim copy of
  its document.
Needs torch, transformers, gguf (the .venv of scripts/reference).
"""

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_DIR = Path.home() / ".cache/locus/models"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def names(text):
    """Capitalised words and numbers, lower-cased, possessive dropped."""
    return {w.lower().removesuffix("'s") for w in re.findall(r"\b[A-Z][\w'-]*|\b\d\w*", text)}


def words(text):
    return {w.lower().removesuffix("'s") for w in re.findall(r"[\w'-]+", text)}


def keep(summary, doc):
    return (
        bool(summary)
        and summary[-1] in ".!?"
        and not names(summary) - words(doc)
        and bool(names(summary) & words(doc))
    )


def main():
    split, n, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    copies = "--copies" in sys.argv[4:]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("stable.jsonl", "general.txt"):
        shutil.copy(Path("data/drift") / name, out / name)
    lines, seen, kept, total = [], 0, 0, 0
    for line in open("data/drift/updates.jsonl", encoding="utf-8"):
        fact = json.loads(line)
        if fact["id"].startswith(split + "-") and seen < n:
            seen += 1
            docs = []
            for doc in fact["docs"]:
                ids = tok.apply_chat_template(
                    [{"role": "user", "content": f"Summarize in one sentence: {doc}"}],
                    add_generation_prompt=True,
                    return_tensors="pt",
                )
                if not torch.is_tensor(ids):
                    ids = ids["input_ids"]
                gen = model.generate(ids, max_new_tokens=60, do_sample=False)
                summary = tok.decode(gen[0][ids.shape[1]:], skip_special_tokens=True).strip()
                docs.append(doc)
                total += 1
                if keep(summary, doc):
                    kept += 1
                    docs.append(doc if copies else summary)
                print(("kept: " if keep(summary, doc) else "dropped: ") + summary, file=sys.stderr)
            fact = dict(fact, docs=docs)
        lines.append(json.dumps(fact, ensure_ascii=False))
    (out / "updates.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{kept} of {total} summaries kept", file=sys.stderr)


if __name__ == "__main__":
    main()
