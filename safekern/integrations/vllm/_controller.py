"""The controller glue of the ESS step in a vLLM worker: ``plan`` (before the forward: which
requests evaluate at this step, over which windows), ``commit`` (after it: the verdicts, the
forced tokens, the traces) and the cascade's ``escalate``.

The requests' state (``_batch.Request``) is packed into one batched ``EssState`` per
``EssConfig`` and run through the reference controller (``safekern.reference.controller``:
windows, verdict, forced tokens — the same code ``safekern.generate`` runs). Nothing here
imports vLLM.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ...reference.controller import forced_tokens, plan_step, update_state
from ...spec import BENIGN, PENDING, REFUSING, SUSPECT, EssState
from ._batch import BATCH, Request

# Fields of EssState kept per request as Python ints between steps.
_STATE_FIELDS = ("mode", "flags", "switch_step", "next_eval", "interval", "forced_idx",
                 "trigger_step")
_ACTIONS = {"low": "record", "medium": "refusal_prefix", "high": "refusal_stop"}


def _log():
    import logging

    return logging.getLogger("safekern.vllm")


def _pack(reqs: List[Request], seq_len: List[int]) -> EssState:
    """A batched EssState over requests that share one EssConfig (and refusal ids)."""
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    r0 = reqs[0]
    kw = {f: i32([getattr(r, f) for r in reqs]) for f in _STATE_FIELDS}
    return EssState(prompt_len=i32([r.layout.prompt_len for r in reqs]),
                    query_start=i32([r.layout.query_start for r in reqs]),
                    query_end=i32([r.layout.query_end for r in reqs]),
                    seq_len=i32(seq_len), evaluating=torch.zeros(len(reqs), dtype=torch.bool),
                    finished=torch.tensor([r.finished for r in reqs]),
                    refusal_ids=torch.tensor(r0.refusal_ids, dtype=torch.int64),
                    refusal_skip=r0.refusal_skip, **kw)


def _unpack(reqs: List[Request], st: EssState):
    cols = {f: getattr(st, f).tolist() for f in _STATE_FIELDS}
    fin = st.finished.tolist()
    for i, r in enumerate(reqs):
        for f in _STATE_FIELDS:
            setattr(r, f, cols[f][i])
        r.finished = bool(fin[i])


def _due(req: Request, t: int) -> bool:
    """Whether ``plan_step`` would evaluate ``req`` at length ``t`` (its ``evaluating`` rule,
    on Python ints)."""
    n = t - req.layout.prompt_len
    return (req.mode == SUSPECT or (req.mode == PENDING and n >= req.ess.first_at)
            or (req.mode == BENIGN and n >= req.next_eval))


class Plan:
    """One step's controller work: per EssConfig group the packed state and windows, and the
    evaluating rows ``(row, t, windows)`` in the order the [CLS] rows are computed."""

    def __init__(self):
        self.groups = []          # (items [(row, req)], st, t, ev, windows)
        self.cascade = []         # (row, req, t) of planned cascade rows (escalate)
        self.rows: List[int] = []
        self.t: List[int] = []
        self.windows: List[torch.Tensor] = []

    def __bool__(self):
        return bool(self.rows)


def plan(rows: Dict[int, Request], seq_lens: List[int]) -> Plan:
    """Which ESS rows evaluate at this step, over which windows (before the forward).

    A row whose tokens are all computed after this step (``seq_lens[r] == n_prompt + outputs``)
    samples for real: it is planned, evaluated when due, and takes its forced token. Rows in a
    partial (chunked or recomputed) prefill are left untouched: vLLM discards their sample.
    """
    pl = Plan()
    groups: Dict[int, list] = {}
    for r, req in rows.items():
        req.force = None
        if r >= len(seq_lens) or seq_lens[r] != req.n_prompt + len(req.output):
            continue
        if req.finished:                      # high policy: the refusal is out, end it
            req.force = req.eos_id
            continue
        if req.mode == REFUSING and req.forced_idx < 0:
            continue                          # triggered, refusal emitted: nothing to do
        if req.forced_idx < 0 and not _due(req, seq_lens[r] + 1):
            # Idle: update_state and forced_tokens would leave it exactly as it is, so it is
            # not packed (the per-step host cost of a sparse schedule is the due rows only).
            if req.ess.schedule == "cascade":
                pl.cascade.append((r, req, seq_lens[r] + 1))
            continue
        groups.setdefault(id(req.ess), []).append((r, req))
    for items in groups.values():
        t = [seq_lens[r] + 1 for r, _ in items]       # safekern t counts the [CLS]
        st = _pack([q for _, q in items], t)
        windows = plan_step(st, items[0][1].ess)
        ev = st.evaluating.tolist()
        pl.groups.append((items, st, t, ev, windows))
        for i, e in enumerate(ev):
            if e:
                pl.rows.append(items[i][0])
                pl.t.append(t[i])
                pl.windows.append(windows[i])
    return pl


def commit(pl: Plan, p_unsafe: Optional[torch.Tensor]):
    """Apply this step's verdicts (``p_unsafe`` in ``pl.rows`` order) and pick forced tokens."""
    p_of = {} if p_unsafe is None else dict(zip(pl.rows, p_unsafe.tolist()))
    bad = [r for r, v in p_of.items() if v != v]
    if bad:
        # A NaN score (e.g. a NaN weight) must not read as benign, and must not take the
        # server down with every other request: fail closed, say so in the trace and the log.
        _log().error("safekern: non-finite p_unsafe for batch rows %s: counted as unsafe", bad)
        for r in bad:
            p_of[r] = 1.0
    for items, st, t, ev, _ in pl.groups:
        reqs = [q for _, q in items]
        ess = reqs[0].ess
        if ess.schedule == "cascade":
            pl.cascade += [(r, q, t[i]) for i, (r, q) in enumerate(items)]
        p = torch.tensor([p_of.get(r, float("nan")) for r, _ in items])
        for r, q in items:
            if r in bad:
                q.trace["nonfinite"] = True
        trig = update_state(st, ess, p).tolist()
        forced, toks = forced_tokens(st, ess)
        forced, toks = forced.tolist(), toks.tolist()
        _unpack(reqs, st)
        for i, req in enumerate(reqs):
            tr = req.trace
            if ev[i]:
                tr["eval_steps"].append(len(req.output))
                tr["eval_lengths"].append(t[i] - req.layout.prompt_len)
                tr["p_unsafe"].append(float(p[i]))
            if trig[i]:
                tr["trigger_step"], tr["action"] = len(req.output), _ACTIONS[ess.policy]
            if forced[i]:
                req.force = int(toks[i])
            if ev[i] or trig[i]:
                BATCH.record(req)


def escalate(pl: Plan, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             threshold: float):
    """The cascade's screening step (``safekern.reference.controller.escalate``) after
    ``commit``: ``hidden`` holds the sampled token rows (``compute_logits``' input, one per
    batch row); a cascade request that is BENIGN and whose probe score ``sigmoid(w . h + b)``
    (fp32, as ``probe_score_ref``) is ``>= threshold`` is evaluated at its next step."""
    if not pl.cascade:
        return
    rows = torch.tensor([r for r, _, _ in pl.cascade], device=hidden.device)
    q = torch.sigmoid(hidden.index_select(0, rows).float() @ weight + bias).tolist()
    thr = torch.tensor(threshold, dtype=torch.float32).item()   # compared in float32
    for (_, req, t), qi in zip(pl.cascade, q):
        if req.mode == BENIGN and qi >= thr:
            req.next_eval = min(req.next_eval, t - req.layout.prompt_len + 1)
    pl.cascade = []


__all__ = ["Plan", "commit", "escalate", "plan"]
