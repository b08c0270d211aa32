"""Shared reference math for the locus fixture scripts.

Not run directly; imported by make_fixtures.py and default_model.py (which
sit in the same folder, so a plain `import refcommon` works when either is run
as `python3 scripts/reference/<script>.py`).

Everything here is the *definition* the Rust side is tested against, so it is
written out explicitly instead of relying on HF's `labels=` loss (which would
hide the shift and the choice of targets).
"""

from __future__ import annotations

import json
import math
import re
from typing import Iterable

import torch

# Attention / MLP blocks for the three HF naming schemes we cover:
#   llama:   model.layers.{l}.self_attn.* / model.layers.{l}.mlp.*
#   gpt2:    transformer.h.{l}.attn.*     / transformer.h.{l}.mlp.*
#   gpt-neo: transformer.h.{l}.attn.attention.* / transformer.h.{l}.mlp.*
# Norms (input_layernorm, ln_1, ...) deliberately match nothing.
GROUP_RE = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.(self_attn|attn|mlp)\.")


def group_of(param_name: str):
    """(layer, "attn"|"mlp") for grouped params, None for norms/embeddings/head."""
    m = GROUP_RE.match(param_name)
    if m is None:
        return None
    return int(m.group(1)), ("mlp" if m.group(2) == "mlp" else "attn")


def r8(x: float) -> float:
    """8 significant digits: plenty for f32 comparisons, halves the JSON size."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"non-finite value in reference output: {x}")
    return float(f"{x:.8g}")


def span_targets(offsets: list[tuple[int, int]], spans: Iterable[tuple[int, int]]) -> list[int]:
    """Targets j >= 1 whose token char range [a,b) overlaps a span [s,e).

    Position 0 is never a target: nothing predicts it.
    """
    spans = list(spans)
    out = []
    for j in range(1, len(offsets)):
        a, b = offsets[j]
        if any(a < e and s < b for s, e in spans):
            out.append(j)
    return out


def measure_text(model, token_ids: list[int], targets: list[int], want_logits: bool):
    """One forward, then backward of the span loss and of the full loss.

    Returns losses, per-parameter gradient norms for both losses, and
    optionally the f32 logits. The span backward runs first with
    retain_graph=True, grads are cleared, then the full backward runs on the
    same graph: this mirrors what the Rust trace step does (one forward, two
    backward passes) so any graph-reuse bug there shows up as a mismatch.
    """
    if not targets:
        raise ValueError("text has no span targets")
    ids = torch.tensor([token_ids], dtype=torch.long)
    logits = model(input_ids=ids).logits[0]  # [n, V]
    if logits.dtype != torch.float64:
        logits = logits.float()
    n = ids.shape[1]
    # Row k of logprobs predicts target j = k + 1.
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logprobs[torch.arange(n - 1), ids[0, 1:]]
    full_loss = nll.mean()
    span_loss = nll[torch.tensor(targets) - 1].mean()

    params = dict(model.named_parameters())  # tied weights appear once

    def grad_norms():
        # float64 accumulation: the reference should not add its own f32
        # rounding on top of what the Rust side will have.
        out = {}
        for name, p in params.items():
            g = p.grad
            out[name] = 0.0 if g is None else float(g.detach().double().pow(2).sum().sqrt())
        return out

    model.zero_grad(set_to_none=True)
    span_loss.backward(retain_graph=True)
    span_norms = grad_norms()
    model.zero_grad(set_to_none=True)
    full_loss.backward()
    full_norms = grad_norms()
    model.zero_grad(set_to_none=True)

    return {
        "span_loss": span_loss.item(),
        "full_loss": full_loss.item(),
        "span_norms": span_norms,
        "full_norms": full_norms,
        "logits": logits.detach() if want_logits else None,
    }


def group_norms(param_norms: dict[str, float]) -> dict[tuple[int, str], float]:
    """sqrt of the summed squares of all params in each (layer, module) group."""
    sq: dict[tuple[int, str], float] = {}
    for name, v in param_norms.items():
        key = group_of(name)
        if key is not None:
            sq[key] = sq.get(key, 0.0) + v * v
    # layer ascending, "attn" < "mlp" alphabetically, which is the order we want
    return {k: math.sqrt(sq[k]) for k in sorted(sq)}


def summarize(results: list[dict]) -> dict:
    """per_text / groups / param_grad_norms sections of expected.json."""
    per_text = []
    span_groups, full_groups = [], []
    for res in results:
        sg = group_norms(res["span_norms"])
        fg = group_norms(res["full_norms"])
        span_groups.append(sg)
        full_groups.append(fg)
        per_text.append([
            {"layer": l, "module": m, "span_norm": r8(sg[(l, m)]), "full_norm": r8(fg[(l, m)])}
            for (l, m) in sg
        ])
    groups = []
    for key in span_groups[0]:
        # Mean of per-text norms (not norm of mean grads): that is the
        # aggregate the service reports.
        s = sum(g[key] for g in span_groups) / len(span_groups)
        f = sum(g[key] for g in full_groups) / len(full_groups)
        groups.append({"layer": key[0], "module": key[1], "span_norm": r8(s),
                       "full_norm": r8(f), "relative": r8(s / f)})
    return {"per_text": per_text, "groups": groups}


def param_grad_norm_means(results: list[dict]) -> dict:
    """Per-parameter norms averaged over texts, same convention as groups."""
    names = list(results[0]["span_norms"])
    k = len(results)
    return {
        name: {"span": r8(sum(r["span_norms"][name] for r in results) / k),
               "full": r8(sum(r["full_norms"][name] for r in results) / k)}
        for name in names
    }


def dump_json(obj: dict, path) -> None:
    """One top-level key per line, values compact: diffable yet small."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'), ensure_ascii=False)}"
             for k, v in obj.items()]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("{\n" + ",\n".join(lines) + "\n}\n")
