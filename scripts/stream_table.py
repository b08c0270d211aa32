#!/usr/bin/env python3
"""Tables of `locus eval-stream --json` runs: mean and standard deviation over seeds per cell.

Usage: python3 scripts/stream_table.py DIR [DIR ...]
Reads DIR/NAME.SPLIT.seedS.json and prints one markdown table per split, cells in the order they
first appear in the cells files' runs (sorted by file time). Standard library only.
"""

import json
import statistics
import sys
from pathlib import Path


def stat(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def lag(run, k):
    for point in run["lags"]:
        if point["lag"] == k:
            return point["heldout" if run["settings"]["split"] == "test" else "dev"]
    return None


def main():
    runs = {}
    files = sorted((p for d in sys.argv[1:] for p in Path(d).glob("*.json")),
                   key=lambda p: p.stat().st_mtime)
    for path in files:
        stem = path.name[: -len(".json")]
        name, split, seed = stem.rsplit(".", 2)
        runs.setdefault(split, {}).setdefault(name, []).append(json.loads(path.read_text()))
    for split, cells in runs.items():
        pref = "new_pref_accuracy_heldout" if split == "test" else "new_pref_accuracy_dev"
        print(f"\n### {split} facts\n")
        print("| cell | seeds | new pref before | new pref after | at lag 0 | at lag 10 | at lag 40 "
              "| stable pref | general ppl ratio | docs/s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, rs in cells.items():
            print(f"| {name} | {len(rs)} | {stat(r['before'][pref] for r in rs)} "
                  f"| {stat(r['after'][pref] for r in rs)} "
                  f"| {stat(lag(r, 0) for r in rs)} | {stat(lag(r, 10) for r in rs)} "
                  f"| {stat(lag(r, 40) for r in rs)} "
                  f"| {stat(r['after']['stable_pref_accuracy'] for r in rs)} "
                  f"(before {stat(r['before']['stable_pref_accuracy'] for r in rs)}) "
                  f"| {stat(r['after']['general_ppl_ratio'] for r in rs)} "
                  f"| {stat(r['documents_per_s'] for r in rs)} |")


if __name__ == "__main__":
    main()
