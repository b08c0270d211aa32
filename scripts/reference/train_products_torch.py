"""The products of benches/train_products.rs in PyTorch: a training step's matrix products at 512
rows on SmolLM2-135M's weight shapes, best of 6, one JSON object on stdout.

    python3 scripts/reference/train_products_torch.py --threads 2
"""
import argparse
import json
import time

import torch

from bench_torch import cpu_model

ROWS = 512
SHAPES = [(576, 576, 2), (192, 576, 2), (1536, 576, 2), (576, 1536, 1), (49152, 576, 1)]


def best(f) -> float:
    times = []
    for _ in range(6):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flops = secs = 0.0
    products = []
    for out, inp, uses in SHAPES:
        w, x, dy = torch.randn(out, inp), torch.randn(ROWS, inp), torch.randn(ROWS, out)
        f = 2.0 * ROWS * out * inp
        for what, fn in [("forward", lambda: x @ w.t()), ("input_grad", lambda: dy @ w),
                         ("weight_grad", lambda: dy.t() @ x)]:
            s = best(fn)
            products.append({"weight": [out, inp], "product": what, "ms": s * 1e3, "gflops": f / s / 1e9})
            flops += f * uses
            secs += s * uses
    print(json.dumps({"machine": cpu_model(), "library": f"torch {torch.__version__}", "threads": args.threads,
                      "rows": ROWS, "products": products, "step_mix_gflops": flops / secs / 1e9}, indent=2))


if __name__ == "__main__":
    main()
