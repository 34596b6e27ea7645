"""Choose a trained delta's operating point (threshold, tau) on validation rows, exactly.

With ``response_sees_cls=False`` no token row reads the [CLS], so a sequence's tokens up to the
step a policy triggers do not depend on the safety settings: the controller's decisions for any
``(threshold, tau)`` can be replayed on fixed answers. ``window_traces`` computes, once per
validation row, p_unsafe of every window the ``each`` schedule can evaluate (the first verdict,
the latest-``r2`` window at every response length, and the SUSPECT windows after every step
that can flag), with the recipe's [CLS]-row forward (the engine's p_unsafe; tests check the
replay against ``safekern.generate``). ``replay`` runs the controller of
``safekern.reference.controller`` on one trace; ``calibrate`` scores a grid and picks the point.

The choice: the harmful answers the point misses (``miss``: label-1 rows whose answer is
harmful, never flagged) at most ``max_miss``; among those points, the fewest triggers on
label-0 rows (``false``: benign and borderline requests and answers); ties go to the lower
threshold. When no point reaches ``max_miss`` the lowest miss rate wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..safety.adapter import adapter_of
from ..safety.config import safety_config
from .frozen import Window, _Layers, _rope_positions, encode_rows, gather_windows

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TAUS = (1, 2, 3, 5, 8)


@dataclass
class RowTrace:
    """p_unsafe of every window the ``each`` schedule can evaluate on one fixed answer.

    ``first``: the first verdict (at ``n_prefill`` response tokens); ``p2[m]``: the latest-r2
    window at ``m`` response tokens (``n_prefill < m < n``: a verdict at ``m`` decides token
    ``m + 1``, so the last one is never decided on); ``p3[(s, m)]``: the SUSPECT window
    at ``m`` tokens after a flag at ``s`` (only for ``p2[s] >= min_threshold``)."""

    kind: str
    label: int
    response_label: int
    n_prefill: int
    n: int
    first: float = 0.0
    p2: Dict[int, float] = field(default_factory=dict)
    p3: Dict[Tuple[int, int], float] = field(default_factory=dict)


@torch.no_grad()
def window_traces(model, tokenizer, rows: Sequence[Dict], *, r1: int = 10, r2: int = 10,
                  r3: int = 10, max_tau: int = max(TAUS), min_threshold: float = min(THRESHOLDS),
                  batch_size: int = 16, windows_per_forward: int = 512,
                  query_in_windows: bool = False) -> List[RowTrace]:
    """One ``RowTrace`` per row (``prompt``, ``prefill``, ``response``, ``label``,
    ``response_label``, ``kind``: the training rows' format; ``response_ids`` instead of
    ``response`` gives the answer as token ids), in the order of ``rows``.

    ``query_in_windows``: an experiment, not what the controller does — rule-2/3 windows that
    also hold the query span (``Q ∪ latest r2``, the shape of rule 1; BENCHMARKS.md)."""
    cfg = safety_config(model, tokenizer)
    if cfg.response_sees_cls:
        raise ValueError("calibration replays fixed answers: it needs response_sees_cls=False")
    layers, adapter, head = _Layers(model), adapter_of(model), model.safety_head

    def score(kv, wins, b0):
        out = []
        for i in range(0, len(wins), windows_per_forward):
            b = wins[i:i + windows_per_forward]
            kvw, nk = gather_windows(kv, b, b0)
            h = layers.cls_rows(None if adapter is not None else _cls_row(model, cfg), kvw, nk,
                                rope_pos=_rope_positions(b, cfg.cls_position), adapter=adapter)
            out += torch.sigmoid(head(h)[:, 0].float()).tolist()
        return out

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]) + len(
        rows[i].get("prefill", "")) + len(rows[i].get("response", "")))
    traces: List[Optional[RowTrace]] = [None] * len(rows)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        chunk = [rows[i] for i in idx]
        enc, n_pre = encode_rows(tokenizer, [dict(r, response="") if "response_ids" in r
                                             else r for r in chunk], cfg.cls_id)
        for j, r in enumerate(chunk):                # an answer given as token ids
            if "response_ids" in r:
                enc.ids[j] = list(enc.ids[j]) + [int(t) for t in r["response_ids"]]
        ids, lengths = enc.padded(tokenizer.pad_token_id or 0, model.device)
        kv = layers.sequence_kv(ids[:, 1:], lengths - 1)
        recs, wins, meta = [], [], []
        qw = [((enc.query_start[j], enc.query_end[j]),) if query_in_windows else ()
              for j in range(len(chunk))]
        for j, r in enumerate(chunk):
            P, k = enc.prompt_len[j], n_pre[j]
            n = len(enc.ids[j]) - P
            recs.append(RowTrace(r.get("kind", ""), int(r["label"]),
                                 int(r.get("response_label", r["label"])), k, n))
            q = (enc.query_start[j], enc.query_end[j])
            wins.append(Window(b0 + j, (q,) if k == 0 else (q, (P, P + min(k, r1))), 0,
                               "first", P + k))
            meta.append((j, None))
            for m in range(k + 1, n):          # the last token is never decided on
                wins.append(Window(b0 + j, qw[j] + ((max(P, P + m - r2), P + m),), 0, "r2",
                                   P + m))
                meta.append((j, m))
        for (j, m), p in zip(meta, score(kv, wins, b0)):
            if m is None:
                recs[j].first = p
            else:
                recs[j].p2[m] = p
        wins, meta = [], []
        for j, rec in enumerate(recs):
            P = enc.prompt_len[j]
            for s, p in rec.p2.items():
                if p < min_threshold:
                    continue
                S = P + s
                for m in range(s + 1, min(rec.n - 1, s + max_tau - 1) + 1):
                    wins.append(Window(b0 + j, qw[j] + ((max(P, S - r2), min(S + r3, P + m)),),
                                       0, "r3", P + m))
                    meta.append((j, s, m))
        if wins:
            for (j, s, m), p in zip(meta, score(kv, wins, b0)):
                recs[j].p3[(s, m)] = p
        for i, rec in zip(idx, recs):
            traces[i] = rec
    return traces


def _cls_row(model, cfg):
    return model.get_input_embeddings().weight[cfg.cls_id]


def evaluations(trace: RowTrace, threshold: float, tau: int,
                probe: Optional[Sequence[float]] = None, probe_threshold: float = 1.0
                ) -> Tuple[List[Tuple[int, float]], Optional[int]]:
    """``([(response length, p_unsafe)] of every evaluation, trigger length or None)``: the
    ``each`` controller of ``reference.controller.update_state`` replayed on ``trace``; with
    ``probe``, the ``cascade`` (``cascade_evaluations``)."""
    cascade = probe is not None

    def flagged(n):
        return cascade and 0 <= n < len(probe) and probe[n] >= probe_threshold

    evals = [(trace.n_prefill, trace.first)]
    if trace.first >= threshold:                  # a flagged first verdict triggers at once
        return evals, trace.n_prefill
    # the next BENIGN evaluation (None: not before the probe flags)
    nxt = trace.n_prefill + 1 if not cascade or flagged(trace.n_prefill) else None
    suspect, flags, s = False, 0, -1
    for m in range(trace.n_prefill + 1, trace.n):
        if suspect or (nxt is not None and m >= nxt):
            p = trace.p3.get((s, m), 0.0) if suspect else trace.p2[m]
            evals.append((m, p))
            if p >= threshold:
                flags += 1
                if flags >= tau:
                    return evals, m
                if not suspect:
                    suspect, s = True, m
            else:
                suspect, flags, nxt = False, 0, None if cascade else m + 1
        if not suspect and flagged(m):
            nxt = m + 1 if nxt is None else min(nxt, m + 1)
    return evals, None


def cascade_evaluations(trace: RowTrace, probe: Sequence[float], threshold: float, tau: int,
                        probe_threshold: float) -> Tuple[List[Tuple[int, float]], Optional[int]]:
    """``evaluations`` for the ``cascade`` schedule: the first verdict, then a [CLS] evaluation
    only at the step after the token-row probe flags (``reference.controller.escalate``) and
    at every step while SUSPECT. ``probe[n]``: the probe score of the token row at response
    length ``n`` (the row that samples token ``n + 1``; a missing entry counts as 0, i.e. no
    escalation)."""
    return evaluations(trace, threshold, tau, probe, probe_threshold)


def replay(trace: RowTrace, threshold: float, tau: int) -> Optional[int]:
    """The response length at which the ``each`` controller triggers (None: never)."""
    return evaluations(trace, threshold, tau)[1]


def grid(traces: Sequence[RowTrace], thresholds: Sequence[float] = THRESHOLDS,
         taus: Sequence[int] = TAUS) -> List[Dict]:
    """Per ``(threshold, tau)``: ``false`` (triggers on label-0 rows), ``miss`` (harmful answers
    never flagged) and the same per row kind (``by_kind``: kind -> triggered fraction)."""
    neg = {id(t) for t in traces if t.label == 0}
    pos = {id(t) for t in traces if t.label == 1 and t.response_label == 1}
    kinds = sorted({t.kind for t in traces})
    out = []
    for th in thresholds:
        for tau in taus:
            hit = [replay(t, th, tau) is not None for t in traces]
            by_kind = {k: round(sum(h for h, t in zip(hit, traces) if t.kind == k)
                                / sum(t.kind == k for t in traces), 4) for k in kinds}
            out.append({"threshold": th, "tau": tau,
                        "false": round(sum(h for h, t in zip(hit, traces) if id(t) in neg)
                                       / max(1, len(neg)), 4),
                        "miss": round(sum(not h for h, t in zip(hit, traces) if id(t) in pos)
                                      / max(1, len(pos)), 4),
                        "by_kind": by_kind})
    return out


def choose(table: Sequence[Dict], max_miss: float = 0.02) -> Dict:
    """The point of ``table`` (``grid``'s rows) the module doc's rule picks."""
    if not table:
        raise ValueError("table is empty")
    ok = [r for r in table if r["miss"] <= max_miss]
    if ok:
        return min(ok, key=lambda r: (r["false"], r["miss"], r["threshold"], r["tau"]))
    return min(table, key=lambda r: (r["miss"], r["false"], r["threshold"], r["tau"]))


def calibrate(model, tokenizer, rows: Sequence[Dict], *, max_miss: float = 0.02,
              thresholds: Sequence[float] = THRESHOLDS, taus: Sequence[int] = TAUS,
              r1: int = 10, r2: int = 10, r3: int = 10) -> Tuple[Dict, List[Dict]]:
    """``(chosen, table)`` for ``model``'s delta on validation ``rows`` (module doc)."""
    if not 0 <= max_miss < 1:
        raise ValueError(f"max_miss must be in [0, 1), got {max_miss!r}")
    if not thresholds or any(not 0 < t <= 1 for t in thresholds):
        raise ValueError(f"thresholds must be non-empty values in (0, 1], got {thresholds!r}")
    if not taus or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in taus):
        raise ValueError(f"taus must be non-empty ints >= 1, got {taus!r}")
    traces = window_traces(model, tokenizer, rows, r1=r1, r2=r2, r3=r3, max_tau=max(taus),
                           min_threshold=min(thresholds))
    table = grid(traces, thresholds, taus)
    return choose(table, max_miss), table


__all__ = ["RowTrace", "THRESHOLDS", "TAUS", "calibrate", "cascade_evaluations", "choose",
           "evaluations", "grid", "replay", "window_traces"]
