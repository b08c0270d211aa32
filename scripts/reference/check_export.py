"""Check `locus export --hf` directories with transformers: the model and tokenizer load with the
Auto classes, and give the token ids and logits locus computed.

Run by hand from the repository root (CPU, ~1 minute with the default model):

    LOCUS_EXPORT_CHECK_DIR=/tmp/locus-exports \
        cargo test --release --test export -- --ignored write_exports_for_transformers
    python3 scripts/reference/check_export.py /tmp/locus-exports

The Rust helper writes, for every case NAME, an exported directory ROOT/NAME and ROOT/NAME.json:
{"name", "dtype", "logits_from", "source", "texts": [{"text", "ids", "logits"}]} where `logits`
are locus's (seq, vocab) logits for `ids`, `logits_from` says which locus model computed them (the
model that was exported for f32 exports; the export loaded back for f16/bf16, whose weights are
rounded) and `source` is the file or directory the model came from (null for temporary copies).

For each case this loads ROOT/NAME with AutoTokenizer and AutoModelForCausalLM (f32, eager
attention) and insists on no missing, unexpected or mismatched weights, on the same token ids for
each text (no special tokens added), on decoding back to the text, and on logits within --tol of
locus's, relative to the largest logit (|d| / max(1, max |logit|)): two f32 implementations of a
30-layer model differ by about 1e-4 on logits of size 37, export or not. With --source it also
loads the source with transformers (a .gguf through its GGUF loader) and prints how far the
export's logits are from the source's: 0 when the export holds exactly the weights transformers
reads from the source. Exit status 1 if any check fails.

Needs torch and transformers (5.x; 4.x reads the same files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_model(path: Path, gguf: bool = False):
    """An f32 model with eager attention, and its loading report."""
    kw = {"gguf_file": path.name} if gguf else {}
    model, info = AutoModelForCausalLM.from_pretrained(
        path.parent if gguf else path, dtype=torch.float32, attn_implementation="eager",
        output_loading_info=True, **kw)
    return model.eval(), info


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def check(root: Path, want: dict, tol: float, with_source: bool):
    """(max abs diff, max relative diff, max abs diff to the source or None, problems)."""
    d = root / want["name"]
    tok = AutoTokenizer.from_pretrained(d)
    model, info = load_model(d)
    problems = [f"{k}: {sorted(v)}" for k, v in info.items() if v]
    source = None
    src = want.get("source")
    if with_source and src and Path(src["path"]).exists():
        source, _ = load_model(Path(src["path"]), gguf=src["format"] == "gguf")
    worst_abs = worst_rel = 0.0
    worst_src = None
    for i, t in enumerate(want["texts"]):
        ids = tok(t["text"], add_special_tokens=False).input_ids
        if ids != t["ids"]:
            problems.append(f"text {i}: token ids differ: {ids} vs locus {t['ids']}")
        back = tok.decode(t["ids"])
        if back != t["text"]:
            problems.append(f"text {i}: decodes to {back!r}")
        got = logits(model, t["ids"])
        ref = torch.tensor(t["logits"])
        diff = (got - ref).abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(1.0, ref.abs().max().item()))
        if source is not None:
            d_src = (got - logits(source, t["ids"])).abs().max().item()
            worst_src = max(worst_src or 0.0, d_src)
    if worst_rel > tol:
        problems.append(f"logits differ by {worst_rel:.3g} of the largest logit (> {tol:g})")
    return worst_abs, worst_rel, worst_src, problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path, help="directory the Rust helper wrote")
    ap.add_argument("names", nargs="*", help="cases to check (default: every NAME.json)")
    ap.add_argument("--tol", type=float, default=1e-5,
                    help="largest logit difference relative to the largest logit (default 1e-5)")
    ap.add_argument("--source", action="store_true",
                    help="also compare with transformers on the model the export was made from")
    a = ap.parse_args()
    names = a.names or sorted(p.stem for p in a.root.glob("*.json"))
    if not names:
        sys.exit(f"{a.root}: no NAME.json files; run the Rust helper first")
    failed = False
    print(f"{'case':<22} {'class':<19} {'dtype':<5} {'max |d|':>9} {'relative':>9}"
          + (f" {'vs source':>9}" if a.source else ""))
    for name in names:
        want = json.loads((a.root / f"{name}.json").read_text())
        cls = json.loads((a.root / name / "config.json").read_text())["architectures"][0]
        worst_abs, worst_rel, worst_src, problems = check(a.root, want, a.tol, a.source)
        line = f"{name:<22} {cls:<19} {want['dtype']:<5} {worst_abs:>9.3g} {worst_rel:>9.3g}"
        if a.source:
            line += f" {'-' if worst_src is None else f'{worst_src:.3g}':>9}"
        print(line + ("  FAIL" if problems else ""))
        for p in problems:
            print(f"    {p}")
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
