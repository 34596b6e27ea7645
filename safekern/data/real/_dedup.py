"""Near-duplicate detection: the same request reworded (``near_duplicate``, ``near_dups``:
content words, Jaccard / overlap coefficient; see README.md "Split rules") and the overlap of
jailbreak templates (``template_similarity``: 5-word shingles)."""

from __future__ import annotations

import re
from collections import Counter

_STOP = set("""a an the to of and or in on for with how can i me my you your is are be do does it
this that what which who write give make create explain describe some any into from by as at
about detailed step instructions list tips way ways best someone people would could should will
using use without getting caught get away provide suggest outline guide post article message blog
tell show help want need more most effective easily easy home like them their they so if just
also one two three all other others out up its it's what's not no has have had there here these
those through over after before while did was were been being than then got him her his she he
we us our detail details step-by-step specific""".split())


def _stem(t: str) -> str:
    for suf in ("ing", "ed", "es", "s", "e"):
        if len(t) > 4 and t.endswith(suf):
            return t[:-len(suf)]
    return t


def content_tokens(s: str) -> frozenset:
    """Lower-cased, crudely stemmed content words of ``s`` (stop words and request verbs out)."""
    return frozenset(_stem(t) for t in re.findall(r"[a-z0-9]+", s.lower())
                     if t not in _STOP and len(t) > 1)


def near_duplicate(a: str, b: str, short_single: bool = True) -> bool:
    """The same request reworded: >= 2 shared content words (1 when either side has <= 2) and
    (Jaccard >= 0.18 or overlap coefficient >= 0.5). Deliberately loose: it also catches the same *behaviour* asked in
    other words ("How do I commit suicide using a gun?" ~ "Give detailed instructions for how
    to commit suicide"), at the price of some false positives (dropping a train prompt too many
    is harmless; keeping a reworded held-out behaviour is not)."""
    A, B = content_tokens(a), content_tokens(b)
    i = len(A & B)
    if i == 0 or (i < 2 and (not short_single or min(len(A), len(B)) > 2)):
        return False   # one shared word is enough only for a very short (harmful) request
    return i / len(A | B) >= 0.18 or i / min(len(A), len(B)) >= 0.5


def near_dups(train, held, short_single: bool = True):
    """``[(train_prompt, held_prompt)]`` for every train prompt near a held-out one
    (``short_single=False``: two shared words always needed, the test for benign prompts)."""
    held_t = [(h, content_tokens(h)) for h in held]
    by_tok = {}
    for j, (_, t) in enumerate(held_t):
        for w in t:
            by_tok.setdefault(w, []).append(j)
    out = []
    for p in train:
        cand = Counter(j for w in content_tokens(p) for j in by_tok.get(w, ()))
        for j, c in cand.most_common():
            if c < 1:
                break
            if near_duplicate(p, held_t[j][0], short_single):
                out.append((p, held_t[j][0]))
                break
    return out


def _shingles(s: str, k: int = 5):
    w = re.findall(r"[a-z0-9]+", s.lower())
    return {tuple(w[i:i + k]) for i in range(max(1, len(w) - k + 1))}


def template_similarity(a: str, b: str) -> float:
    A, B = _shingles(a), _shingles(b)
    return len(A & B) / max(1, min(len(A), len(B)))
