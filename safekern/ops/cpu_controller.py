"""The ESS controller of a CPU decode step as two fused C++ calls (issue 11).

``plan_step(state, ess)`` and ``update(state, ess, p_unsafe)`` do what
``safekern.reference.controller``'s ``plan_step`` and ``update_state`` + ``forced_tokens`` do
(the reference stays the oracle: ``tests/test_cpu_controller.py`` compares every state field
after every step, every schedule x policy), as one pass over the batch each instead of ~60
small torch ops. CPU tensors only; built into the ``cpu_linear`` extension, so
``unavailable_reason()`` is that extension's (the engine then runs the reference).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..spec import EssConfig, EssState
from . import cpu_linear

SCHEDULE_IDS = {"first": 0, "each": 1, "periodic": 2, "annealing": 3}
POLICY_IDS = {"low": 0, "medium": 1, "high": 2}
_FIELDS = ("prompt_len", "query_start", "query_end", "seq_len", "mode", "flags", "switch_step",
           "next_eval", "interval", "forced_idx", "trigger_step", "evaluating", "finished")


def unavailable_reason() -> Optional[str]:
    """None when the fused controller can run, else why not."""
    return cpu_linear.unavailable_reason()


def _check(state, ess):
    if not isinstance(state, EssState):
        raise TypeError(f"state must be an EssState, got {type(state).__name__}")
    if not isinstance(ess, EssConfig):
        raise TypeError(f"ess must be an EssConfig, got {type(ess).__name__}")
    if state.mode.device.type != "cpu":
        raise ValueError(f"state must be on the CPU, got {state.mode.device}")


def _tensors(state: EssState):
    return [getattr(state, f) for f in _FIELDS]


def plan_step(state: EssState, ess: EssConfig) -> torch.Tensor:
    """``reference.controller.plan_step``: sets ``state.evaluating`` and returns the ``(B, 2, 2)``
    int32 [CLS] windows. Shapes and dtypes are checked in C++ (errors name the field)."""
    _check(state, ess)
    return torch.ops.safekern_cpu.ess_plan(_tensors(state), ess.first_at, ess.r1, ess.r2,
                                           ess.r3)


def update(state: EssState, ess: EssConfig,
           p_unsafe: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``reference.controller.update_state`` then ``forced_tokens``, in place.

    Args:
        p_unsafe: ``(B,)`` float32; only entries of evaluating rows are read.
    Returns:
        ``(forced (B,) bool, tokens (B,) int64)`` as ``forced_tokens`` returns them.
    """
    _check(state, ess)
    if not isinstance(p_unsafe, torch.Tensor):
        raise TypeError(f"p_unsafe must be a tensor, got {type(p_unsafe).__name__}")
    return torch.ops.safekern_cpu.ess_update(
        _tensors(state), p_unsafe, state.refusal_ids, state.refusal_skip, ess.threshold,
        ess.tau, SCHEDULE_IDS[ess.schedule], POLICY_IDS[ess.policy], ess.period,
        ess.anneal_growth, ess.anneal_stop)
