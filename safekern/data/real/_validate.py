"""The checks of ``_build.py --check`` (``validate``, run by ``tests/test_real_data.py``): no
duplicate within a file, no prompt, topic, pattern or source in both splits, no near-duplicate
across the splits, jailbreak templates, completion prefills and model responses on the right
side of the split, minimum counts (README.md "Split rules")."""

from __future__ import annotations

import json
import os
from collections import Counter

from ._dedup import near_dups, template_similarity
from ._files import HERE, _load_group, _read_jsonl, norm
from ._sources import DNA_BENIGN_TOPIC


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
    benign = _load_group("benign")
    border = _load_group("borderline")
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
    # the same behaviour reworded: no train harmful request near a held-out one
    split = lambda rows, s: [r["prompt"] for r in rows if r["split"] == s]  # noqa: E731
    errs += [f"harmful: train prompt {a!r} near held-out {b!r}"
             for a, b in near_dups(split(harmful, "train"), split(harmful, "heldout"))]
    # no generated benign/borderline train prompt near a held-out benign/borderline one
    more = [r["prompt"] for r in benign + border if r.get("origin") in ("template", "imperative")
            or r.get("topic") == "freshqa"]
    errs += [f"benign/borderline: train prompt {a!r} near held-out {b!r}"
             for a, b in near_dups(more, split(benign, "heldout") + split(border, "heldout"),
                                   short_single=False)]
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
    errs += _check_jailbreaks()
    errs += _check_completions(harmful)
    errs += _check_responses(harmful, benign, border)

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
        print("benign    :", bc, "topics", bg, "+ dna_chatbox_benign", len(benign) - len(hb),
              "| of which freshqa", sum(r["topic"] == "freshqa" for r in benign),
              "templated", sum(r.get("origin") == "template" for r in benign))
        print("borderline:", oc, "patterns", og, "| templated",
              sum(r.get("origin") == "template" for r in border))
        print("prefills  :", dict(pc))
        jb = _read_jsonl(os.path.join(HERE, "jailbreaks.jsonl"))
        print("jailbreaks:", dict(Counter((r["source"], r["split"]) for r in jb)))
        print("heldout benign topics    :", sorted({r["topic"] for r in benign if r["split"] == "heldout"}))
        print("heldout borderline patterns:", sorted({r["pattern"] for r in border if r["split"] == "heldout"}))
    for e in errs:
        print("ERROR:", e)
    print("OK" if not errs else f"{len(errs)} error(s)")
    return not errs


def _check_jailbreaks():
    errs = []
    path = os.path.join(HERE, "jailbreaks.jsonl")
    if not os.path.exists(path):
        return ["jailbreaks.jsonl missing"]
    rows = _read_jsonl(path)
    errs += [f"jailbreaks: bad row {r.get('id')!r}" for r in rows
             if r.get("split") not in ("train", "heldout") or r["template"].count("{request}") != 1]
    c = Counter(norm(r["template"]) for r in rows)
    errs += [f"jailbreaks: duplicate template {k[:60]!r}" for k, n in c.items() if n > 1]
    held = [r for r in rows if r["split"] == "heldout"]
    for r in rows:
        if r["split"] == "train":
            for h in held:
                if template_similarity(r["template"], h["template"]) >= 0.3:
                    errs.append(f"jailbreaks: train {r['id']} near held-out {h['id']}")
    n = Counter(r["split"] for r in rows)
    if n["train"] < 40 or n["heldout"] < 15:
        errs.append(f"jailbreaks: too few templates {dict(n)}")
    return errs


def _check_completions(harmful):
    path = os.path.join(HERE, "completions.jsonl")
    if not os.path.exists(path):
        return ["completions.jsonl missing"]
    held = {r["prompt"] for r in harmful if r["split"] == "heldout"}
    errs = []
    for r in _read_jsonl(path):
        if r.get("split") != "heldout" or r["prompt"] not in held:
            errs.append(f"completions: {r['prompt'][:60]!r} is not a held-out harmful request")
        if not r.get("prefill", "").strip():
            errs.append(f"completions: empty prefill for {r['prompt'][:60]!r}")
    return errs


def _check_responses(harmful, benign, border):
    """Every generated training row stands on a TRAIN request (and a train template/prefill)."""
    errs = []
    train = {r["prompt"] for rows in (harmful, benign, border) for r in rows
             if r["split"] == "train"}
    held = {r["prompt"] for rows in (harmful, benign, border) for r in rows
            if r["split"] == "heldout"}
    jb_path = os.path.join(HERE, "jailbreaks.jsonl")
    held_tpl = {r["id"] for r in _read_jsonl(jb_path) if r["split"] == "heldout"} \
        if os.path.exists(jb_path) else set()
    with open(os.path.join(HERE, "prefills.json"), encoding="utf-8") as f:
        held_pre = {p["text"] for p in json.load(f) if p["split"] == "heldout"}
    for name in ("responses.jsonl", "responses_v2.jsonl"):
        path = os.path.join(HERE, name)
        if not os.path.exists(path):
            continue
        for r in _read_jsonl(path):
            src = r.get("request", r["prompt"])
            if src in held or r["prompt"] in held:
                errs.append(f"{name}: held-out request {src[:60]!r}")
            elif name == "responses_v2.jsonl" and src not in train:
                errs.append(f"{name}: request not in train {src[:60]!r}")
            if r.get("template") in held_tpl:
                errs.append(f"{name}: held-out jailbreak template {r['template']}")
            if any(h in r.get("prefill", "") for h in held_pre):
                errs.append(f"{name}: held-out prefill in {r['key'][:60]!r}")
    return errs
