"""Renders the JSON of `locus eval --json` as the markdown table `locus eval` prints.

    python3 scripts/eval_table.py docs/eval-default/*.json

Several files (runs of the same command with different `--strategy` lists, each training from the
same starting weights) are rendered as one table, once their starting scores are checked to agree.
"""
import json
import sys


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def merged(paths):
    """The first run's starting scores and every run's strategies, in the order given."""
    runs = [json.load(open(p)) for p in paths]
    before = runs[0]["before"]
    for p, r in zip(paths, runs):
        for k, v in before.items():
            w = r["before"].get(k)
            if isinstance(v, float) and isinstance(w, float) and abs(v - w) > 1e-6 * max(1.0, abs(v)):
                sys.exit(f"{p}: starting {k} {w} differs from {paths[0]}'s {v}: not the same set or model")
    return before, [s for r in runs for s in r["strategies"]]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: eval_table.py RUN.json [RUN.json ...]")
    before, strategies = merged(sys.argv[1:])
    cols = [("new_pref_accuracy", ".3f"), ("new_pref_accuracy_heldout", ".3f"), ("new_answer_logprob", ".3f"),
            ("new_answer_ppl", ".1f"), ("entity_span_ppl", ".1f"), ("stable_pref_accuracy", ".3f"),
            ("stable_logprob_change", "+.3f"), ("general_ppl_ratio", ".3f"), ("fuar", ".3f")]
    print("| strategy | new pref acc | held-out new pref acc | new answer logprob | new answer ppl | entity span ppl "
          "| stable pref acc | stable logprob change | general ppl ratio | FUAR | groups trained | tokens/s | peak RSS MB |")
    print("|" + "---|" * 13)
    rows = [("(before)", before, None)] + [(s["name"], s, s) for s in strategies]
    for name, m, s in rows:
        cells = [fmt(m.get(k), f) for k, f in cols]
        extra = ["-", "-", "-"] if s is None else [str(s["groups_trained"]), f'{s["tokens_per_s"]:.0f}', f'{s["peak_rss_mb"]:.0f}']
        print("| " + " | ".join([name] + cells + extra) + " |")


if __name__ == "__main__":
    main()
