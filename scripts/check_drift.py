#!/usr/bin/env python3
"""Validate the knowledge-drift dataset under data/drift/ and the replay corpus under data/replay/.

Usage: python3 scripts/check_drift.py [--root REPO_ROOT]

Standard library only. Exits 0 when every check passes, 1 otherwise. Errors make the
run fail; warnings are printed but do not.

Checked:
  * every file exists, is UTF-8, has no blank lines, no CR characters, and ends with a newline;
  * sizes: at least MIN_FACTS update facts, MIN_TEST of them held-out `test-` facts, at least
    MIN_DOCS documents and MIN_PROBES probes per fact, and at least MIN_STABLE stable facts;
  * updates.jsonl: one JSON object a line with exactly {id, docs, salient, probes};
    ids unique and prefixed `dev-` or `test-`; docs and salient are non-empty string lists;
    every salient string occurs verbatim in at least one doc of its fact (and, stricter, in
    every doc, because per-text span loaders reject a text that lacks one of its salient
    strings), and each doc yields a salient target token (the first token has no
    target, so a doc needs an occurrence past the start or a multi-word one at it);
    probes have exactly {prompt, new, old};
  * stable.jsonl: one JSON object a line with exactly {prompt, gold, foil};
  * answers (new/old/gold/foil) start with one space followed by a non-space, are 1-4 words,
    differ, and neither is a prefix of the other (a prefix answer can never out-score the
    longer one by summed log-probability);
  * prompts are non-empty, have no trailing whitespace, are unique, and no update prompt is a
    substring of any doc;
  * general.txt and replay/general.txt mention no salient string of any update fact;
  * no paragraph, and no sentence, of data/replay/general.txt appears anywhere in data/drift/.
"""

import argparse
import json
import re
import sys
from pathlib import Path

# Minimum sizes of the dataset (see data/drift/README.md, "Split").
MIN_FACTS = 100
MIN_TEST = 30
MIN_DOCS = 2
MIN_PROBES = 2
MIN_STABLE = 60

ID_RE = re.compile(r"^(dev|test)-[a-z0-9]+(?:-[a-z0-9]+)*$")
SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])")


class Report:
    def __init__(self):
        self.errors = []
        self.warnings = []

    def err(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    def warn(self, where, msg):
        self.warnings.append(f"{where}: {msg}")


def read_lines(path, rep):
    """Returns the file's lines (without newlines), or None if unreadable; checks layout."""
    if not path.is_file():
        rep.err(str(path), "missing")
        return None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        rep.err(str(path), f"not UTF-8: {e}")
        return None
    if not text:
        rep.err(str(path), "empty file")
        return []
    if "\r" in text:
        rep.err(str(path), "contains CR characters (use LF line endings)")
    if not text.endswith("\n"):
        rep.err(str(path), "does not end with a newline")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            rep.err(f"{path}:{i}", "blank line")
        elif line != line.strip():
            rep.err(f"{path}:{i}", "leading or trailing whitespace")
    return lines


def check_answer(where, name, ans, rep):
    if not isinstance(ans, str):
        rep.err(where, f"{name} must be a string")
        return False
    if not ans.startswith(" ") or len(ans) < 2 or ans[1].isspace():
        rep.err(where, f"{name} {ans!r} must start with exactly one space followed by text")
        return False
    if ans != ans.rstrip():
        rep.err(where, f"{name} {ans!r} has trailing whitespace")
    words = len(ans.split())
    if not 1 <= words <= 4:
        rep.err(where, f"{name} {ans!r} has {words} words (want 1-4)")
    return True


def check_pair(where, a_name, a, b_name, b, rep):
    ok_a = check_answer(where, a_name, a, rep)
    ok_b = check_answer(where, b_name, b, rep)
    if not (ok_a and ok_b):
        return
    if a == b:
        rep.err(where, f"{a_name} and {b_name} are identical ({a!r})")
    elif a.startswith(b) or b.startswith(a):
        rep.err(where, f"{a_name} {a!r} and {b_name} {b!r}: one is a prefix of the other")


def check_prompt(where, prompt, rep):
    if not isinstance(prompt, str) or not prompt.strip():
        rep.err(where, "prompt must be a non-empty string")
        return False
    if prompt != prompt.rstrip():
        rep.err(where, f"prompt {prompt!r} ends with whitespace (the answer carries the space)")
    if prompt != prompt.lstrip():
        rep.err(where, f"prompt {prompt!r} starts with whitespace")
    return True


def is_str_list(x):
    return isinstance(x, list) and len(x) > 0 and all(isinstance(s, str) and s for s in x)


def check_updates(path, rep):
    lines = read_lines(path, rep)
    facts = []
    if lines is None:
        return facts
    seen_ids = set()
    for i, line in enumerate(lines, 1):
        where = f"{path.name}:{i}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rep.err(where, f"invalid JSON: {e}")
            continue
        if not isinstance(obj, dict):
            rep.err(where, "line is not a JSON object")
            continue
        keys = set(obj)
        want = {"id", "docs", "salient", "probes"}
        if keys != want:
            missing, extra = sorted(want - keys), sorted(keys - want)
            rep.err(where, f"fields: missing {missing}, unexpected {extra}")
            if missing:
                continue
        fid = obj["id"]
        if not isinstance(fid, str) or not ID_RE.match(fid):
            rep.err(where, f"id {fid!r} must look like dev-<slug> or test-<slug> (lowercase, digits, hyphens)")
        elif fid in seen_ids:
            rep.err(where, f"duplicate id {fid!r}")
        seen_ids.add(fid)
        where = f"{path.name}:{i} ({fid})"
        docs, salient, probes = obj["docs"], obj["salient"], obj["probes"]
        if not is_str_list(docs):
            rep.err(where, "docs must be a non-empty list of non-empty strings")
            continue
        for k, d in enumerate(docs):
            if d != d.strip() or "\n" in d:
                rep.err(where, f"doc {k} has surrounding whitespace or a newline")
            n = len(SENT_SPLIT.split(d))
            if not 2 <= n <= 4:
                rep.warn(where, f"doc {k} has about {n} sentences (want 2-4)")
        if len(set(docs)) != len(docs):
            rep.err(where, "duplicate docs")
        if len(docs) < MIN_DOCS:
            rep.err(where, f"{len(docs)} doc(s); each fact needs at least {MIN_DOCS}")
        if not is_str_list(salient):
            rep.err(where, "salient must be a non-empty list of non-empty strings")
            salient = []
        if len(set(salient)) != len(salient):
            rep.err(where, "duplicate salient strings")
        for s in salient:
            if s != s.strip():
                rep.err(where, f"salient {s!r} has surrounding whitespace")
            present = [s in d for d in docs]
            if not any(present):
                rep.err(where, f"salient {s!r} occurs in no doc")
            elif not all(present):
                missing = [k for k, p in enumerate(present) if not p]
                rep.err(where, f"salient {s!r} missing from doc(s) {missing}")
        for k, d in enumerate(docs):
            # A span on the first token alone has no prediction target; a salient string that
            # occurs later in the doc, or a multi-word one at the start, still yields targets.
            if salient and not any(d.find(s, 1) > 0 or (d.startswith(s) and " " in s) for s in salient):
                rep.err(where, f"doc {k}: only a one-word salient string at the very start (no target token)")
        if not isinstance(probes, list) or not probes:
            rep.err(where, "probes must be a non-empty list")
            probes = []
        good_probes = []
        for j, p in enumerate(probes):
            pw = f"{where} probe {j}"
            if not isinstance(p, dict):
                rep.err(pw, "probe is not an object")
                continue
            if set(p) != {"prompt", "new", "old"}:
                rep.err(pw, f"fields must be exactly prompt/new/old, got {sorted(p)}")
                if not {"prompt", "new", "old"} <= set(p):
                    continue
            if check_prompt(pw, p["prompt"], rep):
                good_probes.append(p)
            check_pair(pw, "new", p["new"], "old", p["old"], rep)
        if len(probes) < MIN_PROBES:
            rep.err(where, f"{len(probes)} probe(s); each fact needs at least {MIN_PROBES}")
        facts.append({"line": i, "id": fid, "docs": docs, "salient": salient, "probes": good_probes})
    if not facts:
        rep.err(str(path), "no facts")
    # Cross-fact checks: prompts vs all docs, unique prompts.
    all_docs = [(f["id"], d) for f in facts for d in f["docs"]]
    seen_prompts = {}
    for f in facts:
        for p in f["probes"]:
            pr = p["prompt"]
            for other, d in all_docs:
                if pr in d:
                    rep.err(f"{path.name}:{f['line']} ({f['id']})", f"prompt {pr!r} is a substring of a doc of {other}")
                    break
            if pr in seen_prompts:
                rep.err(f"{path.name}:{f['line']} ({f['id']})", f"prompt {pr!r} repeats a prompt of {seen_prompts[pr]}")
            seen_prompts[pr] = f["id"]
    return facts


def check_stable(path, update_prompts, rep):
    lines = read_lines(path, rep)
    rows = []
    if lines is None:
        return rows
    seen = set()
    for i, line in enumerate(lines, 1):
        where = f"{path.name}:{i}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rep.err(where, f"invalid JSON: {e}")
            continue
        if not isinstance(obj, dict):
            rep.err(where, "line is not a JSON object")
            continue
        if set(obj) != {"prompt", "gold", "foil"}:
            rep.err(where, f"fields must be exactly prompt/gold/foil, got {sorted(obj)}")
            if not {"prompt", "gold", "foil"} <= set(obj):
                continue
        if check_prompt(where, obj["prompt"], rep):
            if obj["prompt"] in seen:
                rep.err(where, f"duplicate prompt {obj['prompt']!r}")
            if obj["prompt"] in update_prompts:
                rep.err(where, f"prompt {obj['prompt']!r} is also an update probe prompt")
            seen.add(obj["prompt"])
        check_pair(where, "gold", obj["gold"], "foil", obj["foil"], rep)
        rows.append(obj)
    if not rows:
        rep.err(str(path), "no stable facts")
    return rows


def mentions(text, needle):
    """Case-sensitive whole-word occurrence of needle in text."""
    return re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", text) is not None


def check_general(path, salient, rep, what):
    lines = read_lines(path, rep)
    if lines is None:
        return []
    paras = [l for l in lines if l.strip()]
    seen = {}
    for i, p in enumerate(lines, 1):
        if not p.strip():
            continue
        if p in seen:
            rep.err(f"{path}:{i}", f"duplicate of line {seen[p]}")
        seen.setdefault(p, i)
        n = len(SENT_SPLIT.split(p))
        if not 2 <= n <= 4:
            rep.warn(f"{path}:{i}", f"paragraph has about {n} sentences (want 2-4)")
        for fid, s in salient:
            if mentions(p, s):
                rep.err(f"{path}:{i}", f"{what} mentions {s!r}, a salient string of update fact {fid}")
    return paras


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="repository root (default: the parent of scripts/)")
    args = ap.parse_args()
    root = args.root
    drift, replay = root / "data" / "drift", root / "data" / "replay"
    rep = Report()

    facts = check_updates(drift / "updates.jsonl", rep)
    update_prompts = {p["prompt"] for f in facts for p in f["probes"]}
    stable = check_stable(drift / "stable.jsonl", update_prompts, rep)
    salient = [(f["id"], s) for f in facts for s in f["salient"]]
    general = check_general(drift / "general.txt", salient, rep, "general text")
    replay_paras = check_general(replay / "general.txt", salient, rep, "replay text")
    if not (drift / "README.md").is_file():
        rep.err(str(drift / "README.md"), "missing")

    # Replay must share no paragraph and no sentence with anything under data/drift/.
    drift_texts = []
    for f in facts:
        drift_texts.extend(f["docs"])
        drift_texts.extend(p["prompt"] for p in f["probes"])
    drift_texts.extend(r["prompt"] for r in stable if isinstance(r.get("prompt"), str))
    drift_texts.extend(general)
    if drift.is_dir():
        for fp in sorted(drift.rglob("*")):
            if fp.is_file():
                try:
                    drift_texts.append(fp.read_text(encoding="utf-8"))
                except UnicodeDecodeError:
                    pass
    blob = "\n".join(drift_texts)
    shared_sent = 0
    for i, para in enumerate(replay_paras, 1):
        if para in blob:
            rep.err(f"replay/general.txt:{i}", "paragraph appears under data/drift/")
            continue
        for sent in SENT_SPLIT.split(para):
            if len(sent) >= 20 and sent in blob:
                shared_sent += 1
                rep.err(f"replay/general.txt:{i}", f"sentence appears under data/drift/: {sent[:60]!r}")

    n_test = sum(1 for f in facts if str(f["id"]).startswith("test-"))
    n_dev = sum(1 for f in facts if str(f["id"]).startswith("dev-"))
    n_probes = sum(len(f["probes"]) for f in facts)
    n_docs = sum(len(f["docs"]) for f in facts)
    if facts and (n_test == 0 or n_dev == 0):
        rep.err("updates.jsonl", f"split needs both dev- and test- facts (dev {n_dev}, test {n_test})")
    if len(facts) < MIN_FACTS:
        rep.err("updates.jsonl", f"{len(facts)} facts; at least {MIN_FACTS} required")
    if n_test < MIN_TEST:
        rep.err("updates.jsonl", f"{n_test} held-out test- facts; at least {MIN_TEST} required")
    if len(stable) < MIN_STABLE:
        rep.err("stable.jsonl", f"{len(stable)} stable facts; at least {MIN_STABLE} required")
    min_docs = min((len(f["docs"]) for f in facts), default=0)
    min_probes = min((len(f["probes"]) for f in facts), default=0)

    print(f"updates.jsonl : {len(facts)} facts ({n_dev} dev, {n_test} test = "
          f"{(n_test / len(facts) if facts else 0):.0%} held out), {n_docs} docs, {n_probes} probes, "
          f"{len(salient)} salient strings")
    print(f"stable.jsonl  : {len(stable)} facts")
    print(f"drift general : {len(general)} paragraphs")
    print(f"replay general: {len(replay_paras)} paragraphs, {shared_sent} sentences shared with data/drift/")
    print(f"summary       : {len(facts)} facts ({n_dev} dev, {n_test} test), {len(stable)} stable; "
          f"per fact at least {min_docs} docs and {min_probes} probes "
          f"(required: >= {MIN_FACTS} facts, >= {MIN_TEST} test, >= {MIN_DOCS} docs, "
          f">= {MIN_PROBES} probes, >= {MIN_STABLE} stable)")
    for w in rep.warnings:
        print(f"warning: {w}")
    for e in rep.errors:
        print(f"error: {e}")
    if rep.errors:
        print(f"FAIL: {len(rep.errors)} error(s), {len(rep.warnings)} warning(s)")
        return 1
    print(f"OK: all checks passed ({len(rep.warnings)} warning(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
