"""The embedded ESS dataset (written by this project, no downloads).

Each example is a dict::

    {"kind": "benign" | "malicious" | "prefill", "prompt": str, "prefill": str,
     "response": str, "label": 0 | 1, "topic": str}

``prompt`` is the user message; ``prefill`` is assistant text forced before the response (a
prefill attack, empty otherwise; it is part of the response span but never an LM target);
``response`` is the target continuation; ``label`` 1 = malicious. Splits: ``"train"`` and
``"heldout"`` (disjoint topics and phrasing templates). Regenerate with
``python -m safekern.data._generate``. Data files and the scripts that build them import nothing
else of safekern (the bottom layer, docs/DESIGN.md §6).

>>> from safekern.data import load_split
>>> len(load_split("heldout", kinds=("prefill",))) > 0
True
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Dict, List, Sequence

SPLITS = ("train", "heldout")
KINDS = ("benign", "malicious", "prefill")
REFUSAL_MARKER = "sorry, i cannot"


def load_split(split: str = "train", kinds: Sequence[str] = KINDS) -> List[Dict]:
    """Examples of one split, in file order, filtered to ``kinds``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(kinds, str) or not set(kinds) <= set(KINDS):
        raise ValueError(f"kinds must be a sequence of {KINDS}, got {kinds!r}")
    text = resources.files(__name__).joinpath(f"ess_{split}.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in rows if r["kind"] in kinds]


def is_refusal(text: str) -> bool:
    """True iff ``text`` contains the refusal marker "Sorry, I cannot" (case-insensitive)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return REFUSAL_MARKER in text.lower()


def corpus(split: str = "train") -> List[str]:
    """Every string of a split (prompts, prefills, responses): tokenizer training text."""
    return [s for r in load_split(split) for s in (r["prompt"], r["prefill"], r["response"]) if s]
