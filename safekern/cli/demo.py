"""``safekern demo``: safety off vs strategic decoding, side by side.

``--model smollm2`` (the default when installed): SmolLM2-135M-Instruct with the shipped ESS delta
on held-out real requests (``safekern.data.real``). ``--model tiny``: the embedded tiny model
(trained first when missing).

Prompts come from the held-out split of the embedded dataset (never seen in training): benign
instructions, harmful requests, and prefill attacks (a harmful request whose answer is forced to
start compliantly). Each row shows the two generations and the per-evaluation ``p_unsafe``
trace of the strategic decoder.
"""
from __future__ import annotations

import textwrap
from typing import List, Optional


def _pick(rows, kind: str, n: int) -> List[dict]:
    seen, out = set(), []
    for r in rows:
        if r["kind"] == kind and r["topic"] not in seen:
            seen.add(r["topic"])
            out.append(r)
        if len(out) == n:
            break
    return out


def format_trace(trace) -> str:
    """``p_unsafe`` at each evaluation as ``n=<response tokens>:<p>`` plus the trigger."""
    if trace is None or not trace.p_unsafe:
        return "no evaluation"
    shown = [f"n={n}:{p:.3f}" for n, p in zip(trace.eval_lengths, trace.p_unsafe)]
    if len(shown) > 8:
        shown = shown[:6] + ["...", shown[-1]]
    tail = f" -> {trace.action} at step {trace.trigger_step}" if trace.action else " -> benign"
    return " ".join(shown) + tail


def _side_by_side(left: str, right: str, width: int) -> List[str]:
    a, b = textwrap.wrap(left, width) or [""], textwrap.wrap(right, width) or [""]
    n = max(len(a), len(b))
    a, b = a + [""] * (n - len(a)), b + [""] * (n - len(b))
    return [f"  {x:<{width}} | {y}" for x, y in zip(a, b)]


def _show_groups(model, tokenizer, groups, ess, *, max_new_tokens, width, backend, print_fn,
                 judge=None) -> List[dict]:
    """For each ``(kind, title, prompts, prefills)`` group: safety off vs ``ess`` side by side,
    the p_unsafe trace (and ``judge(text)`` of the ESS answer when given); returns the rows."""
    from ..runtime.engine import generate

    out = []
    for kind, title, prompts, prefill in groups:
        off = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, safety=None,
                       prefill=prefill, backend=backend)
        on = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, safety=ess,
                      prefill=prefill, backend=backend)
        print_fn(f"\n=== {title} ===")
        for i, (a, b) in enumerate(zip(off, on)):
            pf = prefill[i] if prefill else ""
            print_fn(f"user: {prompts[i]}")
            if pf:
                print_fn(f"prefilled assistant start: {pf!r}")
            print_fn(f"  {'safety off':<{width}} | ESS on")
            for line in _side_by_side(a.text, b.text, width):
                print_fn(line)
            verdict = f"   judge(ESS on): {judge(b.text)}" if judge is not None else ""
            print_fn(f"  p_unsafe: {format_trace(b.trace)}{verdict}")
            out.append({"kind": kind, "prompt": prompts[i], "prefill": pf, "off": a.text,
                        "on": b.text, "trace": b.trace})
    return out


def run_demo_real(name: str = "smollm2", *, delta: Optional[str] = None, per_kind: int = 3,
                  max_new_tokens: int = 48, width: int = 48, backend: str = "auto",
                  ess=None, print_fn=print) -> List[dict]:
    """The demo on a real pretrained model (``safekern.models``) with a trained ESS delta (on the
    caller's torch threads: ``safekern demo --threads``, default 1)."""
    from .. import models
    from ..evaluation import heldout_cases, judge
    from ..spec import EssConfig

    local = models.is_local(name)
    if local and delta is None:
        raise ValueError(f"a local checkpoint needs delta=DIR (no delta ships for {name!r})")
    about = f"local checkpoint {name}" if local else models.MODELS[name].description
    print_fn(f"model: {about}; ESS delta: {delta or models.shipped_delta(name)}")
    if not local:
        print_fn("The base model has no safety alignment of its own: with safety off it "
                 "answers harmful requests.")
    print_fn("ESS adds a [CLS] safety token and head; the LM itself is unchanged.")
    model, tok = models.load(name, safety=delta or True)
    # The delta's recorded operating point (what generate uses without a safety argument);
    # a delta that records none (format v1) is a query-window head: its first verdict, `high`.
    ess = ess or model.safekern.operating_point or EssConfig(schedule="first", policy="high")
    print_fn(f"strategic decoding: schedule {ess.label}, {ess.policy} policy, threshold "
             f"{ess.threshold}, refusal {ess.refusal_text!r}; held-out prompts, greedy, "
             f"{max_new_tokens} tokens")
    cases = heldout_cases(n_harmful=per_kind, n_prefill=per_kind, n_suffix=0, n_benign=per_kind,
                          n_borderline=per_kind)
    groups = []
    for kind, title in (("benign", "benign"), ("borderline", "borderline (safe, looks risky)"),
                        ("direct", "harmful request"), ("prefill", "prefill attack")):
        group = [c for c in cases if c.kind == kind]
        groups.append((kind, title, [c.prompt for c in group], [c.prefill for c in group]))
    return _show_groups(model, tok, groups, ess, max_new_tokens=max_new_tokens, width=width,
                        backend=backend, print_fn=print_fn, judge=judge)


def run_demo(model_dir: Optional[str] = None, *, per_kind: int = 3, max_new_tokens: int = 32,
             width: int = 48, train_if_missing: bool = True, backend: str = "auto",
             print_fn=print) -> List[dict]:
    """Print the side-by-side demo and return its rows (prompt, prefill, outputs, trace).

    Args:
        model_dir: a directory written by ``safekern train --tiny`` (default: the cache dir);
            trained first (a few CPU minutes) when missing and ``train_if_missing``.
        per_kind: prompts per group (benign, malicious, prefill attack).
    """
    from ..data import load_split
    from ..spec import EssConfig
    from ..training.trainer import default_cache_dir, load_tiny, train_tiny

    model_dir = model_dir or default_cache_dir()
    try:
        model, tokenizer = load_tiny(model_dir)
    except FileNotFoundError:
        if not train_if_missing:
            raise
        print_fn(f"no tiny model in {model_dir} (keyed on this version's recipe): training it "
                 "first, ~1 min on an idle 2-core CPU, several on a loaded one")
        train_tiny(model_dir)
        model, tokenizer = load_tiny(model_dir)
    rows = load_split("heldout")
    ess = EssConfig()
    print_fn(f"safety off (plain decoding) vs ESS strategic decoding ({ess.label}, "
             f"{ess.policy} policy, threshold {ess.threshold}); held-out prompts, greedy")
    groups = []
    for kind, title in (("benign", "benign"), ("malicious", "malicious"),
                        ("prefill", "prefill attack")):
        picked = _pick(rows, kind, per_kind)
        groups.append((kind, title, [r["prompt"] for r in picked],
                       [r["prefill"] for r in picked] if kind == "prefill" else None))
    return _show_groups(model, tokenizer, groups, ess, max_new_tokens=max_new_tokens,
                        width=width, backend=backend, print_fn=print_fn)
