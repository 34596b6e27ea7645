"""What a generate call returns (``GenerationResult``, ``Trace``, ``TokenLogprob``) and the
host-side reads that build it from the engine's device buffers: the results, traces and
logprobs at the end, the stream callback and the stop-string check during decoding; the output
columns they read (``allocate``) and the EOS ids. Functions of the ``Engine`` (bound as its
``_results`` / ``_traces`` / ``_logprobs`` / ``_emit_stream`` / ``_all_stopped`` / ``_eos_ids``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..ops.head_sample import raise_non_finite
from ..spec import REFUSING

_ACTIONS = {"low": "record", "medium": "refusal_prefix", "high": "refusal_stop"}


@dataclass
class Trace:
    """What the safety controller did for one sequence.

    Attributes:
        eval_steps: generation steps at which the [CLS] row was evaluated; a verdict at step
            ``s`` decides generated token ``s`` (step 0 = prefill).
        eval_lengths: response length ``n = t - P`` at each evaluation (prefilled tokens count).
        p_unsafe: ``p_unsafe`` at each evaluation.
        trigger_step: the step whose verdict triggered the policy (None = never).
        action: ``"refusal_prefix"`` (medium), ``"refusal_stop"`` (high), ``"record"`` (low) or
            None when nothing triggered.
    """

    eval_steps: List[int] = field(default_factory=list)
    eval_lengths: List[int] = field(default_factory=list)
    p_unsafe: List[float] = field(default_factory=list)
    trigger_step: Optional[int] = None
    action: Optional[str] = None


@dataclass
class TokenLogprob:
    """The log-probability of one generated token (``SamplingParams(logprobs=k)``).

    Attributes:
        token_id: the generated token (a forced refusal token included).
        logprob: its ``log_softmax(logits / T)`` (T = 0: of the raw logits), before
            top-k/top-p/min-p filtering, as vLLM reports by default.
        top: the ``k`` most likely ``(token_id, logprob)`` pairs, most likely first (empty for
            ``logprobs=0``).
    """

    token_id: int
    logprob: float
    top: List[Tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One sequence's output.

    Attributes:
        text: the generated text (after the prefill, if any; cut at a stop string).
        token_ids: the generated token ids (EOS included when it ended the sequence).
        prefill_ids: the forced response start (part of the response, not generated).
        finish_reason: ``"eos"``, ``"stop"`` (stop string), ``"refusal"`` (high policy) or
            ``"length"``.
        trace: the safety trace (None when decoding without safety).
        logprobs: one ``TokenLogprob`` per entry of ``token_ids`` when
            ``SamplingParams.logprobs`` is set, else None.
    """

    text: str
    token_ids: List[int]
    prefill_ids: List[int]
    finish_reason: str
    trace: Optional[Trace]
    logprobs: Optional[List[TokenLogprob]] = None


def eos_ids(eng) -> List[int]:
    """The token ids that end a sequence (none with ``ignore_eos``)."""
    ids = set()
    if eng.ignore_eos:
        return []
    if eng.tokenizer.eos_token_id is not None:
        ids.add(int(eng.tokenizer.eos_token_id))
    gen = getattr(eng.model, "generation_config", None)
    e = getattr(gen, "eos_token_id", None)
    ids.update([e] if isinstance(e, int) else (e or []))
    return sorted(ids)


def allocate(eng, B: int, max_new_tokens: int, sampling):
    """A generate call's output columns, one per step: tokens, emitted flags, logprobs."""
    dev = eng.device
    eng._out_tok = torch.full((B, max_new_tokens), -1, dtype=torch.int64, device=dev)
    eng._out_emit = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=dev)
    if sampling.logprobs is not None:
        k = sampling.logprobs
        eng._out_lp = torch.full((B, max_new_tokens), float("nan"), device=dev)
        eng._out_top_ids = torch.zeros(B, max_new_tokens, k, dtype=torch.int64, device=dev)
        eng._out_top_lp = torch.zeros(B, max_new_tokens, k, device=dev)


def emit_stream(eng, stream, step):
    emit = eng._out_emit[:, step].tolist()
    toks = eng._out_tok[:, step].tolist()
    p = eng._out_p[:, step].tolist() if eng._ess is not None else [math.nan] * eng.B
    stream(step, [t if e else None for t, e in zip(toks, emit)], p)


def all_stopped(eng, stop, steps, sync_every) -> bool:
    """Host check, every ``sync_every`` steps: has every row ended or written a stop string?

    Only the tail that can hold a new occurrence is decoded (every token is >= 1 byte;
    a few spare tokens cover characters split across tokens)."""
    tail = sync_every + max(len(s.encode()) for s in stop) + 4
    lo = max(0, steps - tail)
    toks = eng._out_tok[:, lo:steps].tolist()
    emit = eng._out_emit[:, lo:steps].tolist()
    for b, (d, row, em) in enumerate(zip(eng._done.tolist(), toks, emit)):
        if not (d or eng._stopped[b]):
            text = eng.tokenizer.decode([t for t, e in zip(row, em) if e])
            eng._stopped[b] = any(s in text for s in stop)
    return all(d or st for d, st in zip(eng._done.tolist(), eng._stopped))


def results(eng, enc, stop, steps) -> List[GenerationResult]:
    raise_non_finite(eng._nonfinite)
    toks = eng._out_tok[:, :steps].tolist()
    emit = eng._out_emit[:, :steps].tolist()
    done = eng._done.tolist()
    refused = eng._reason_refusal.tolist()
    eos = set(eng._eos.tolist())
    traces = collect_traces(eng, enc, steps) if eng._ess is not None else [None] * eng.B
    logprobs = collect_logprobs(eng, steps, emit)
    out = []
    for b in range(eng.B):
        row = [t for t, e in zip(toks[b], emit[b]) if e]
        reason = ("refusal" if refused[b] else "eos" if done[b] and row and row[-1] in eos
                  else "length")
        text = eng.tokenizer.decode(row, skip_special_tokens=True)
        for s in stop or ():
            cut = text.find(s)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                row = _ids_covering(eng.tokenizer, row, text)
        prefill_ids = enc.ids[b][enc.prompt_len[b]:]
        lp = None if logprobs is None else logprobs[b][:len(row)]
        out.append(GenerationResult(text, row, prefill_ids, reason, traces[b], lp))
    return out


def collect_logprobs(eng, steps, emit) -> Optional[List[List[TokenLogprob]]]:
    if eng._sampling.logprobs is None:
        return None
    toks = eng._out_tok[:, :steps].tolist()
    lp = eng._out_lp[:, :steps].tolist()
    top_ids = eng._out_top_ids[:, :steps].tolist()
    top_lp = eng._out_top_lp[:, :steps].tolist()
    return [[TokenLogprob(toks[b][s], lp[b][s], list(zip(top_ids[b][s], top_lp[b][s])))
             for s in range(steps) if emit[b][s]] for b in range(eng.B)]


def collect_traces(eng, enc, steps) -> List[Trace]:
    ev = eng._out_ev[:, :steps].tolist()
    p = eng._out_p[:, :steps].tolist()
    t = eng._out_t[:, :steps].tolist()
    trig = eng.state.trigger_step.tolist()
    mode = eng.state.mode.tolist()
    lengths = eng._lengths.tolist()
    out = []
    for b in range(eng.B):
        tr = Trace()
        for s in range(steps):
            if ev[b][s]:
                tr.eval_steps.append(s)
                tr.eval_lengths.append(t[b][s] - enc.prompt_len[b])
                tr.p_unsafe.append(p[b][s])
        if mode[b] == REFUSING and trig[b] >= 0 and trig[b] - lengths[b] in tr.eval_steps:
            tr.trigger_step = trig[b] - lengths[b]
            tr.action = _ACTIONS[eng._ess.policy]
        out.append(tr)
    return out


def _ids_covering(tokenizer, ids: List[int], text: str) -> List[int]:
    """The shortest prefix of ``ids`` whose decoding starts with ``text``."""
    for k in range(len(ids) + 1):
        if tokenizer.decode(ids[:k], skip_special_tokens=True).startswith(text):
            return ids[:k]
    return ids


__all__ = ["GenerationResult", "TokenLogprob", "Trace", "results", "collect_traces",
           "collect_logprobs", "eos_ids", "allocate", "emit_stream", "all_stopped"]
