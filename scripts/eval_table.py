"""Renders the JSON of `locus eval --json` as the markdown table `locus eval` prints.

    python3 scripts/eval_table.py docs/eval-default.json
"""
import json
import sys


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main() -> None:
    r = json.load(open(sys.argv[1]))
    cols = [("new_pref_accuracy", ".3f"), ("new_pref_accuracy_heldout", ".3f"), ("new_answer_logprob", ".3f"),
            ("new_answer_ppl", ".1f"), ("entity_span_ppl", ".1f"), ("stable_pref_accuracy", ".3f"),
            ("stable_logprob_change", "+.3f"), ("general_ppl_ratio", ".3f"), ("fuar", ".3f")]
    print("| strategy | new pref acc | held-out new pref acc | new answer logprob | new answer ppl | entity span ppl "
          "| stable pref acc | stable logprob change | general ppl ratio | FUAR | groups trained | tokens/s | peak RSS MB |")
    print("|" + "---|" * 13)
    rows = [("(before)", r["before"], None)] + [(s["name"], s, s) for s in r["strategies"]]
    for name, m, s in rows:
        cells = [fmt(m.get(k), f) for k, f in cols]
        extra = ["-", "-", "-"] if s is None else [str(s["groups_trained"]), f'{s["tokens_per_s"]:.0f}', f'{s["peak_rss_mb"]:.0f}']
        print("| " + " | ".join([name] + cells + extra) + " |")


if __name__ == "__main__":
    main()
