"""The ESS controller of a CPU decode step as a few fused C++ calls (issue 11).

``plan(state, ess)`` does what ``safekern.reference.controller.plan_step`` does (and counts
the evaluating rows); ``update(state, ess, scores, drawn)`` what ``head_sample_ref`` does after
the scores and the draw (mask the scores to evaluating rows, raise on a NaN verdict,
``update_state``, ``forced_tokens``, override the drawn tokens). The reference stays the oracle
(``tests/test_cpu_controller.py`` compares every state field after every step, every
schedule x policy); each is one pass over the batch instead of ~60 small torch ops.
``cls_layout`` and ``record`` fuse the engine's per-step [CLS] row placement and trace record
(their references are ``cls_layout_ref`` / ``record_ref`` in ``safekern.runtime.controller``);
``step_begin`` and ``step_end`` are what the engine calls: everything the controller does
before a step's forward (seq_len, plan, layout, cache rows) and after its draw (score, update,
record), one call each (``step_begin_ref`` / ``step_end_ref``); ``decode_rows`` is
``step_begin`` for a step without ESS (``decode_rows_ref``).
CPU tensors only; built into the ``cpu_linear`` extension, so ``unavailable_reason()`` is that
extension's (the engine then runs the reference path).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...spec import EssConfig, EssState
from . import linear as cpu_linear

SCHEDULE_IDS = {"first": 0, "each": 1, "periodic": 2, "annealing": 3, "cascade": 4}
_CASCADE_NET = 5        # cascade with annealing's points as a safety net (cpu_controller.cpp)
POLICY_IDS = {"low": 0, "medium": 1, "high": 2}
_FIELDS = ("prompt_len", "query_start", "query_end", "seq_len", "mode", "flags", "switch_step",
           "next_eval", "interval", "forced_idx", "trigger_step", "evaluating", "finished")


def schedule_id(ess: EssConfig) -> int:
    """The C++ controller's schedule id of ``ess`` (cascade with its net is an id of its own)."""
    return _CASCADE_NET if ess.schedule == "cascade" and ess.cascade_net else \
        SCHEDULE_IDS[ess.schedule]


def unavailable_reason() -> Optional[str]:
    """None when the fused controller can run, else why not."""
    return cpu_linear.unavailable_reason()


def _check(state, ess):
    if not cpu_linear._loaded:
        why = unavailable_reason()                     # builds/loads on first use
        if why is not None:
            raise RuntimeError(f"the fused CPU controller cannot run: {why}")
    if not isinstance(state, EssState):
        raise TypeError(f"state must be an EssState, got {type(state).__name__}")
    if not isinstance(ess, EssConfig):
        raise TypeError(f"ess must be an EssConfig, got {type(ess).__name__}")
    if state.mode.device.type != "cpu":
        raise ValueError(f"state must be on the CPU, got {state.mode.device}")


def _tensors(state: EssState):
    return [getattr(state, f) for f in _FIELDS]


def plan(state: EssState, ess: EssConfig) -> Tuple[torch.Tensor, int]:
    """``reference.controller.plan_step``: sets ``state.evaluating``; returns the ``(B, 2, 2)``
    int32 [CLS] windows and the number of evaluating rows (a Python int). Shapes and dtypes
    are checked in C++ (errors name the field)."""
    _check(state, ess)
    return torch.ops.safekern_cpu.ess_plan(_tensors(state), ess.first_at, ess.r1, ess.r2,
                                           ess.r3)


def plan_step(state: EssState, ess: EssConfig) -> torch.Tensor:
    """``reference.controller.plan_step`` exactly: the windows only."""
    return plan(state, ess)[0]


def update(state: EssState, ess: EssConfig, scores: torch.Tensor,
           drawn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The controller part of ``reference.sampling.head_sample_ref``, in place: ``p_unsafe``
    is ``scores`` on evaluating rows (NaN elsewhere), then ``update_state``, ``forced_tokens``
    and the forced-token override of the drawn tokens.

    Args:
        scores: ``(B,)`` float32 safety scores (``safety_score_ref``); read for evaluating rows.
        drawn: ``(B,)`` int64 tokens sampled from the logits.
    Returns:
        ``(tokens (B,) int64, p_unsafe (B,) float32, forced (B,) bool)``.
    Raises:
        ValueError (the reference's message) when an evaluating row's score is NaN; the state
        is then unchanged.
    """
    _check(state, ess)
    for name, x in (("scores", scores), ("drawn", drawn)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    return torch.ops.safekern_cpu.ess_update(
        _tensors(state), scores, drawn, state.refusal_ids, state.refusal_skip, ess.threshold,
        ess.tau, schedule_id(ess), POLICY_IDS[ess.policy], ess.period,
        ess.anneal_growth, ess.anneal_stop)


def escalate(state: EssState, ess: EssConfig, h_tok: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor, threshold: float) -> torch.Tensor:
    """``reference.controller.escalate`` with the probe score ``sigmoid(h_tok.to(weight.dtype)
    @ weight + bias).float()`` (``probe_score_ref``'s ops with a ``(hidden,)`` weight and a 0-d
    bias), in place; a no-op unless ``ess.schedule == "cascade"``. Returns the ``(B,)``
    float32 probe scores."""
    _check(state, ess)
    for name, x in (("h_tok", h_tok), ("weight", weight), ("bias", bias)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    out = torch.empty(state.batch_size, dtype=torch.float32)
    if ess.schedule != "cascade":
        return out.copy_(torch.sigmoid(h_tok.to(weight.dtype) @ weight + bias).float())
    torch.ops.safekern_cpu.ess_escalate(_tensors(state), h_tok, weight, bias, float(threshold),
                                        out)
    return out


def cls_layout(t_prev: torch.Tensor, evaluating: torch.Tensor, cls_last: bool,
               spare_slot: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a decode step with [CLS] rows puts its two rows per sequence, in one call (the
    engine's ``safekern.runtime.controller.cls_layout_ref`` is the reference).

    Args:
        t_prev: ``(B,)`` int32, the token row's position ``t - 1``.
        evaluating: ``(B,)`` bool, rows whose [CLS] row is evaluated this step.
        cls_last: the [CLS] row's RoPE position is ``t - 1`` (else 0).
        spare_slot: the cache slot non-evaluating [CLS] rows write to (never read).
    Returns:
        ``pos (B, 2) int64, q_pos (B, 2) int32, slots (B, 2) int64``.
    """
    if not cpu_linear._loaded and unavailable_reason() is not None:
        raise RuntimeError(f"the fused CPU controller cannot run: {unavailable_reason()}")
    for name, x in (("t_prev", t_prev), ("evaluating", evaluating)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if isinstance(spare_slot, bool) or not isinstance(spare_slot, int) or spare_slot < 0:
        raise ValueError(f"spare_slot must be an int >= 0, got {spare_slot!r}")
    return torch.ops.safekern_cpu.ess_cls_layout(t_prev, evaluating, bool(cls_last), spare_slot)


def record(state: EssState, p: torch.Tensor, emit: torch.Tensor, col: torch.Tensor,
           out_p: torch.Tensor, out_ev: torch.Tensor, out_t: torch.Tensor,
           reason_refusal: torch.Tensor) -> None:
    """The engine's per-step trace record in one call (``runtime.controller.record_ref`` is the
    reference): at column ``col`` (one-element int64 tensor) of the ``(B, T)`` buffers,
    ``out_p = p``, ``out_ev = state.evaluating & emit``, ``out_t = state.seq_len``; and
    ``reason_refusal |= emit & state.finished`` (all in place)."""
    if not isinstance(state, EssState):
        raise TypeError(f"state must be an EssState, got {type(state).__name__}")
    torch.ops.safekern_cpu.ess_record(state.evaluating, state.seq_len, state.finished, p, emit,
                                      col, out_p, out_ev, out_t, reason_refusal)


def step_begin(state: EssState, ess: EssConfig, lengths: torch.Tensor, step_idx: torch.Tensor,
               row_base: torch.Tensor, cls_last: bool, spare_slot: int, skip_idle: bool):
    """A CPU decode step's controller prologue in one call (``runtime.controller.step_begin_ref``
    is the reference): ``state.seq_len = lengths + step_idx``, ``plan``, the token and [CLS] rows'
    RoPE positions, query positions and flat cache rows (``row_base + slot``).

    Args:
        lengths: ``(B,)`` int32 prompt lengths; ``step_idx``: one-element int64 step index;
        row_base: ``(B,)`` int64 first cache row of each sequence in the flattened cache;
        cls_last / spare_slot: as in ``cls_layout``; skip_idle: when no row evaluates, lay out
        the token rows alone.
    Returns:
        ``(windows (B, 2, 2) int32, n_ev int, pos int64, q_pos int32, flat int64)``, the last
        three ``(B, 2), (B, 2), (2B,)``, or ``(B, 1), (B, 1), (B,)`` when skip_idle applies.
    """
    _check(state, ess)
    for name, x in (("lengths", lengths), ("step_idx", step_idx), ("row_base", row_base)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if isinstance(spare_slot, bool) or not isinstance(spare_slot, int) or spare_slot < 0:
        raise ValueError(f"spare_slot must be an int >= 0, got {spare_slot!r}")
    return torch.ops.safekern_cpu.ess_step_begin(
        _tensors(state), lengths, step_idx, row_base, ess.first_at, ess.r1, ess.r2, ess.r3,
        bool(cls_last), spare_slot, bool(skip_idle))


def decode_rows(lengths: torch.Tensor, step_idx: torch.Tensor, row_base: torch.Tensor):
    """The rows of a decode step without ESS in one call (``runtime.controller.decode_rows_ref``
    is the reference): ``t_prev = lengths + step_idx - 1``; returns ``pos (B, 1) int64, q_pos (B, 1)
    int32, flat (B,) int64 = row_base + t_prev, seqlens_k (B,) int32 = t_prev + 1``."""
    if not cpu_linear._loaded and unavailable_reason() is not None:
        raise RuntimeError(f"the fused CPU controller cannot run: {unavailable_reason()}")
    for name, x in (("lengths", lengths), ("step_idx", step_idx), ("row_base", row_base)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    return torch.ops.safekern_cpu.decode_rows(lengths, step_idx, row_base)


def step_end(state: EssState, ess: EssConfig, h_cls: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor, drawn: torch.Tensor, emit: torch.Tensor, col: torch.Tensor,
             out_p: torch.Tensor, out_ev: torch.Tensor, out_t: torch.Tensor,
             reason_refusal: torch.Tensor, done: torch.Tensor, probe=None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A CPU decode step's controller epilogue in one call: the safety score
    ``sigmoid(h_cls.to(weight.dtype) @ weight + bias).float()`` (``safety_score_ref``'s ops
    with a ``(hidden,)`` weight and a 0-d bias; ``h_cls`` ``(B, hidden)``, or ``(B, L,
    hidden)`` whose last row per sequence is the [CLS] row), then ``update``, ``record`` and
    ``done |= state.finished`` (in place). ``probe = (h_tok, weight, bias, threshold)``: the
    cascade's ``escalate`` after the update (``ess.schedule == "cascade"`` requires it).

    Returns ``(tokens (B,) int64, p_unsafe (B,) float32)``; raises ValueError like ``update``
    on a NaN verdict (the state and the trace buffers are then unchanged)."""
    _check(state, ess)
    for name, x in (("h_cls", h_cls), ("weight", weight), ("bias", bias), ("drawn", drawn),
                    ("emit", emit), ("col", col), ("done", done)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    return torch.ops.safekern_cpu.ess_step_end(
        _tensors(state), h_cls, weight, bias, drawn, state.refusal_ids, state.refusal_skip,
        ess.threshold, ess.tau, schedule_id(ess), POLICY_IDS[ess.policy], ess.period,
        ess.anneal_growth, ess.anneal_stop, emit, col, out_p, out_ev, out_t, reason_refusal, done,
        *_probe_args(ess, probe))


def _probe_args(ess: EssConfig, probe) -> tuple:
    """``step_end``'s trailing probe arguments: ``(h_tok, w, b, threshold)`` or none."""
    if probe is None:
        if ess.schedule == "cascade":
            raise ValueError("ess.schedule='cascade' needs probe=(h_tok, weight, bias, "
                             "threshold): the delta's screening probe")
        return (None, None, None, 1.0)
    if not isinstance(probe, tuple) or len(probe) != 4:
        raise TypeError("probe must be a tuple (h_tok, weight, bias, threshold)")
    h_tok, w, b, thr = probe
    for name, x in (("probe h_tok", h_tok), ("probe weight", w), ("probe bias", b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if isinstance(thr, bool) or not isinstance(thr, (int, float)):
        raise TypeError(f"probe threshold must be a float, got {type(thr).__name__}")
    return (h_tok, w, b, float(thr)) if ess.schedule == "cascade" else (None, None, None, 1.0)


class Bound:
    """The engine's per-step controller calls (``plan`` for the prefill, ``step_begin`` and
    ``step_end`` per decode step) bound to one generate's state and config: the argument checks
    and the state's tensor list are made once here instead of at every step (same C++ ops,
    same results). The state's tensors must not be replaced while bound (they are updated in
    place, as the ops do)."""

    def __init__(self, state: EssState, ess: EssConfig, probe=None):
        """``probe = (weight, bias, threshold)``: the cascade's screening probe (prepared
        operands, as ``step_end`` takes them; required with schedule ``"cascade"``)."""
        _check(state, ess)
        if ess.schedule == "cascade" and probe is None:
            raise ValueError("ess.schedule='cascade' needs probe=(weight, bias, threshold)")
        self._probe = None if ess.schedule != "cascade" else (probe[0], probe[1],
                                                                float(probe[2]))
        self.state, self.ess = state, ess
        self._tensors = _tensors(state)
        self._plan_args = (ess.first_at, ess.r1, ess.r2, ess.r3)
        self._update_args = (state.refusal_ids, state.refusal_skip, ess.threshold, ess.tau,
                             schedule_id(ess), POLICY_IDS[ess.policy], ess.period,
                             ess.anneal_growth, ess.anneal_stop)
        ops = torch.ops.safekern_cpu
        self._ess_plan, self._ess_step_begin, self._ess_step_end = \
            ops.ess_plan, ops.ess_step_begin, ops.ess_step_end

    def plan(self) -> Tuple[torch.Tensor, int]:
        """``plan(state, ess)``."""
        return self._ess_plan(self._tensors, *self._plan_args)

    def step_begin(self, lengths, step_idx, row_base, cls_last: bool, spare_slot: int,
                   skip_idle: bool):
        """``step_begin(state, ess, ...)`` (checked in C++)."""
        return self._ess_step_begin(self._tensors, lengths, step_idx, row_base,
                                    *self._plan_args, cls_last, spare_slot, skip_idle)

    def step_end(self, h_cls, weight, bias, drawn, emit, col, out_p, out_ev, out_t,
                 reason_refusal, done, h_tok=None):
        """``step_end(state, ess, ...)`` (checked in C++); ``h_tok``: the token rows the
        cascade's probe reads."""
        if self._probe is None:
            return self._ess_step_end(self._tensors, h_cls, weight, bias, drawn,
                                      *self._update_args, emit, col, out_p, out_ev, out_t,
                                      reason_refusal, done)
        return self._ess_step_end(self._tensors, h_cls, weight, bias, drawn,
                                  *self._update_args, emit, col, out_p, out_ev, out_t,
                                  reason_refusal, done, h_tok, *self._probe)
