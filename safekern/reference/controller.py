"""Reference batched ESS controller (docs/DESIGN.md §4): which sequences evaluate, over which
windows, and how a verdict updates the state. Pure tensor code, no host synchronisation, any device.

One decode step, as the engine runs it:
  1. ``windows = plan_step(state, ess)``: sets ``state.evaluating``; the [CLS] row of each
     evaluating sequence attends to key 0 plus ``windows`` (rows 1-4).
  2. the forward pass computes ``p_unsafe`` for the evaluating rows.
  3. ``update_state(state, ess, p_unsafe)`` counts flags and triggers the policy.
  4. ``forced_tokens(state, ess)`` says which rows take a refusal-prefix token this step.
  5. ``escalate(state, ess, probe, threshold)`` (schedule ``"cascade"``): BENIGN rows whose
     token-row probe flags are evaluated at the next step.
Steps 2-5 are what ``head_sample`` fuses.
"""
from __future__ import annotations

import torch

from ..spec import BENIGN, NEVER, PENDING, REFUSING, SUSPECT, EssConfig, EssState

NUM_WINDOWS = 2  # rule 1 needs two windows (query span + response head); others use one


def plan_step(state: EssState, ess: EssConfig) -> torch.Tensor:
    """Decide which rows evaluate this step and return their [CLS] windows.

    Reads ``state.seq_len`` (``t``) and sets ``state.evaluating`` in place.

    Returns:
        ``(B, 2, 2)`` int32 ``[start, end)`` windows; rows that do not evaluate get empty ones.
    """
    t, P = state.seq_len, state.prompt_len
    n = t - P
    zero = torch.zeros_like(t)
    pending = (state.mode == PENDING) & (n >= ess.first_at)
    benign = (state.mode == BENIGN) & (n >= state.next_eval)
    suspect = state.mode == SUSPECT
    state.evaluating.copy_(pending | benign | suspect)

    # Rule 1: Q ∪ [P, P + min(n, r1)).
    w0s = torch.where(pending, state.query_start, zero)
    w0e = torch.where(pending, state.query_end, zero)
    w1s_first, w1e_first = P, P + torch.clamp(n, max=ess.r1)
    # Rule 2: the latest r2 tokens.
    w1s_benign, w1e_benign = torch.maximum(P, t - ess.r2), t
    # Rule 3: around the flagged step S.
    S = state.switch_step
    w1s_susp, w1e_susp = torch.maximum(P, S - ess.r2), torch.minimum(S + ess.r3, t)
    w1s = torch.where(pending, w1s_first, torch.where(benign, w1s_benign,
                      torch.where(suspect, w1s_susp, zero)))
    w1e = torch.where(pending, w1e_first, torch.where(benign, w1e_benign,
                      torch.where(suspect, w1e_susp, zero)))
    return torch.stack([torch.stack([w0s, w0e], -1), torch.stack([w1s, w1e], -1)], 1).int()


def _schedule_next(state: EssState, ess: EssConfig, n: torch.Tensor):
    """Next evaluation point and annealing interval after a benign verdict at ``n``."""
    never = torch.full_like(n, NEVER)
    if ess.schedule == "first":
        return never, state.interval
    if ess.schedule == "each":
        return n + 1, state.interval
    if ess.schedule == "periodic":
        return n + ess.period, state.interval
    if ess.schedule == "cascade" and not ess.cascade_net:
        return never, state.interval          # only the probe brings the next evaluation
    nxt = n + state.interval
    # Clamp in float64 before the cast: interval * growth can exceed int32 (e.g. growth 1e6).
    scaled = torch.clamp((state.interval.double() * ess.anneal_growth).floor(), max=NEVER // 4)
    grown = torch.clamp(torch.maximum(state.interval + 1, scaled.int()), max=NEVER // 4)
    return torch.where(nxt > ess.anneal_stop, never, nxt), grown


def update_state(state: EssState, ess: EssConfig, p_unsafe: torch.Tensor) -> torch.Tensor:
    """Apply this step's verdicts to the rows in ``state.evaluating`` (in place).

    Args:
        p_unsafe: ``(B,)`` float; only entries of evaluating rows are read.
    Returns:
        ``(B,)`` bool: rows whose policy triggered at this step.
    """
    ev = state.evaluating
    t, n = state.seq_len, state.seq_len - state.prompt_len
    flag = ev & (p_unsafe >= ess.threshold)
    benign_verdict = ev & ~flag
    mode = state.mode
    was_pending, was_suspect = mode == PENDING, mode == SUSPECT

    flags = torch.where(flag, state.flags + 1, torch.zeros_like(state.flags))
    flags = torch.where(ev, flags, state.flags)
    trigger = flag & (was_pending | (flags >= ess.tau))
    to_suspect = flag & ~trigger & ~was_suspect

    nxt, interval = _schedule_next(state, ess, n)
    state.next_eval.copy_(torch.where(benign_verdict, nxt, state.next_eval))
    state.interval.copy_(torch.where(benign_verdict, interval, state.interval))
    state.switch_step.copy_(torch.where(to_suspect, t, torch.where(benign_verdict,
                                        torch.full_like(t, -1), state.switch_step)))
    new_mode = torch.where(benign_verdict, torch.full_like(mode, BENIGN), mode)
    new_mode = torch.where(to_suspect, torch.full_like(mode, SUSPECT), new_mode)
    new_mode = torch.where(trigger, torch.full_like(mode, REFUSING), new_mode)
    state.mode.copy_(new_mode)
    state.flags.copy_(flags)
    state.trigger_step.copy_(torch.where(trigger, t, state.trigger_step))
    if ess.policy != "low":
        # Mid-response (n > 0) the refusal starts on a new line: force every refusal id; a
        # refusal that opens the response skips the leading newline ids (docs/DESIGN.md §4).
        start = torch.where(n > 0, torch.zeros_like(t), torch.full_like(t, state.refusal_skip))
        state.forced_idx.copy_(torch.where(trigger, start, state.forced_idx))
    return trigger


def escalate(state: EssState, ess: EssConfig, probe: torch.Tensor, threshold: float) -> None:
    """The cascade's screening step (schedule ``"cascade"``, docs/DESIGN.md §4), in place after
    ``update_state``: a BENIGN row whose token-row probe score is ``>= threshold`` is evaluated
    at the next step (``next_eval = min(next_eval, n + 1)``), also when it evaluated at this
    one (while the probe keeps flagging, the [CLS] is evaluated at every step, as ``each``
    would). Other schedules ignore the probe.

    Args:
        probe: ``(B,)`` float32 probe scores of the token rows (``probe_score_ref``).
        threshold: the screening threshold (the delta's ``SafetyProbe.threshold``).
    """
    if ess.schedule != "cascade":
        return
    n = state.seq_len - state.prompt_len
    # float32 comparison with the threshold rounded to float32, like a scalar in torch
    up = (state.mode == BENIGN) & (probe.float() >= threshold)
    state.next_eval.copy_(torch.where(up, torch.minimum(state.next_eval, n + 1),
                                      state.next_eval))


def forced_tokens(state: EssState, ess: EssConfig):
    """Rows that take a refusal-prefix token this step, and that token (advances the index).

    Returns:
        ``(forced (B,) bool, tokens (B,) int64)``; ``tokens`` is only meaningful where forced.
        When a ``high``-policy row emits its last prefix token, ``state.finished`` is set.
    """
    R = state.refusal_ids.numel()
    forced = state.forced_idx >= 0
    idx = torch.clamp(state.forced_idx, 0, R - 1).long()
    tokens = state.refusal_ids[idx]
    nxt = torch.where(forced, state.forced_idx + 1, state.forced_idx)
    done = forced & (nxt >= R)
    state.forced_idx.copy_(torch.where(done, torch.full_like(nxt, -1), nxt))
    if ess.policy == "high":
        state.finished.copy_(state.finished | done)
    return forced, tokens
