"""The engine's glue to the safety controller (docs/DESIGN.md §4): per generate call, the
safety head, screening probe, refusal tokens and controller state; per step, ``head_sample``
and the bookkeeping in device tensors (``sample``), with the fused CPU controller
(``safekern.ops.cpu.controller``) where it runs. Functions of the ``Engine`` (bound as its
``_sample`` / ``_sample_fused``; the references as its static ``_*_ref``).

The ``*_ref`` functions are the references of the fused C++ controller's calls, written as the
small torch ops it replaces (``tests/test_cpu_controller.py`` compares them field by field):
``decode_rows_ref``, ``step_begin_ref`` (with ``cls_layout_ref``), ``record_ref`` and
``step_end_ref``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..ops import head_sample
from ..ops.cpu import controller as fused_controller
from ..reference.controller import escalate, plan_step
from ..safety.adapter import adapter_of, with_adapter
from ..safety.config import safety_head_params
from ..safety.probe import probe_params
from ..safety.prompts import refusal_token_ids
from ..spec import NEVER, EssConfig, EssState


def resolve_safety(model, safety) -> Optional[EssConfig]:
    """``generate``'s ``safety`` argument as an ``EssConfig`` (or None): ``"auto"`` takes the
    delta's measured operating point, else the paper's ``EssConfig()``."""
    if isinstance(safety, str):
        if safety != "auto":
            raise ValueError(f"safety must be an EssConfig, None or 'auto', got {safety!r}")
        cfg = getattr(model, "safekern", None)
        return getattr(cfg, "operating_point", None) or EssConfig()
    if safety is not None and not isinstance(safety, EssConfig):
        raise TypeError(f"safety must be an EssConfig, None or 'auto', got "
                        f"{type(safety).__name__}")
    return safety


def setup_safety(eng, enc, ess, lengths, max_new_tokens):
    """A generate call's safety side (``ess`` not None): the [CLS] adapter, the safety head and
    probe, the refusal tokens, the controller state and the trace buffers."""
    B, dev = eng.B, eng.device
    cfg = eng.model.safekern
    if adapter_of(eng.model) is not None:
        if ess.cls_bias_scale != 0:
            raise ValueError("this model's delta has a [CLS] adapter, which needs "
                             "cls_bias_scale=0 (the bias would carry the adapted "
                             "verdict into token rows)")
        eng._prefill_linears = with_adapter(eng.model, eng._modules, 0)
        eng._step_linears = with_adapter(eng.model, eng._decode_linears, 1)
    if cfg.windows is not None and (ess.r1, ess.r2, ess.r3) != tuple(cfg.windows):
        warnings.warn(f"the safety delta was trained for windows r1, r2, r3 = "
                      f"{tuple(cfg.windows)}; this EssConfig uses "
                      f"{(ess.r1, ess.r2, ess.r3)}: its verdicts are out of the "
                      "distribution it was trained on", stacklevel=5)
    # The compact decode step (forward._compact_step; it runs where the step counts on the
    # host how many rows evaluate, ``host_skip``, i.e. off CUDA): [CLS] rows after the B token
    # rows, and buffers in the (B, 2) layout of its attention and controller.
    if dev.type != "cuda":
        a = eng.arch
        eng._compact_linears = with_adapter(eng.model, eng._decode_linears, 0, B)
        eng._qbuf = torch.zeros(B, 2, a.n_heads, a.head_dim, device=dev, dtype=eng.dtype)
        eng._h2 = torch.zeros(B, 2, eng._lm_w.shape[1], device=dev, dtype=eng.dtype)
    eng._sw, eng._sb = safety_head_params(eng.model)
    # The cascade's screening probe (docs/DESIGN.md §4): (w, b, threshold), or None.
    eng._probe = probe_params(eng.model, eng.dtype) \
        if ess.schedule == "cascade" else None
    # Forced after a mid-response trigger as "\n" + refusal (docs/DESIGN.md §4); a
    # trigger on an empty response skips the newline ids (chosen per row on device).
    key = (ess.refusal_text, len(eng.tokenizer))       # tokenised once per text
    if key not in eng._refusal_ids:
        rids, rskip = refusal_token_ids(eng.tokenizer, ess.refusal_text)
        eng._refusal_ids[key] = (tuple(rids), rskip)
    refusal, skip = eng._refusal_ids[key]
    refusal = list(refusal)
    eng.state = EssState.create(enc.prompt_len, enc.query_start, enc.query_end,
                                refusal, ess, device=dev, refusal_skip=skip)
    eng.state.seq_len.copy_(lengths)
    eng._out_p = torch.full((B, max_new_tokens), float("nan"), device=dev)
    eng._out_ev = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=dev)
    eng._out_t = torch.zeros(B, max_new_tokens, dtype=torch.int32, device=dev)
    eng._logit = torch.zeros(B, device=dev)
    eng._ids2[:, 1] = cfg.cls_id
    # Where rows start to see the [CLS] key: the response (the paper), or never (a
    # delta trained on a frozen LM, SafetyConfig.response_sees_cls=False).
    eng._cls_visible_from = (eng.state.prompt_len if cfg.response_sees_cls else
                             torch.full_like(eng.state.prompt_len, NEVER))


def bind_controller(eng, ess, sampling, head_backend):
    """Choose the step's controller once per generate call: the fused CPU controller bound to
    the state, or the reference (inside the torch ``head_sample``)."""
    dev = eng.device
    # The torch head_sample backend runs the reference controller as small ops; on CPU the
    # fused controller replaces it (same state trace). Logprobs stay on the reference path:
    # they are taken of the final (possibly forced) token inside head_sample.
    # Steps without ESS lay out their rows in one C++ call where the controller can run.
    eng._fused_rows = eng.cpu_controller_reason is None
    eng._fused_ctl = (ess is not None and head_backend == "torch" and
                      eng.cpu_controller_reason is None and sampling.logprobs is None)
    # Bound once per generate: the per-step calls skip the argument checks (issue 11).
    eng._ctl = fused_controller.Bound(eng.state, ess, eng._probe) if eng._fused_ctl \
        else None
    eng._plan = (lambda st, e: eng._ctl.plan()) if eng._fused_ctl else \
        (lambda st, e: (plan_step(st, e), None))
    if eng._fused_ctl:
        # safety_score_ref's operands, prepared once: the score is then sigmoid(h @ w + b),
        # the same ops on the same values as the reference (bit-identical verdicts).
        cd = torch.float64 if eng.dtype == torch.float64 else torch.float32
        w = eng._sw.to(cd)
        b = torch.zeros((), dtype=cd, device=dev) if eng._sb is None else \
            torch.as_tensor(eng._sb, device=dev).to(cd)
        if w.dim() == 2:
            w = w[1] - w[0]
            b = b[1] - b[0] if b.dim() == 1 else b
        eng._score_wb = (cd, w, b)


def sample(eng, h_tok, h_cls, checked: bool = False, controller: bool = True):
    """head_sample + per-step bookkeeping in device tensors (no host sync)."""
    ess = eng._ess
    kw = dict(h_cls=None, safety_weight=None, safety_bias=None, state=None, ess=None,
              sampling=eng._sampling, generator=eng._generator)
    fused = ess is not None and controller and eng._fused_ctl and not checked
    if ess is not None and controller and not fused:
        kw.update(h_cls=h_cls, safety_weight=eng._sw, safety_bias=eng._sb,
                  state=eng.state, ess=ess)
        if eng._probe is not None:
            kw.update(probe_weight=eng._probe[0], probe_bias=eng._probe[1],
                      probe_threshold=eng._probe[2])
    emit = ~eng._done
    col = eng._step_idx
    if checked:
        res = head_sample(h_tok, eng._lm_w, backend=eng.backend, **kw)
        tok, p = res[0], res[1]
    elif fused:
        tok, p = sample_fused(eng, h_tok, h_cls, kw, emit)      # and the trace record
    else:
        res = eng._head_fn(h_tok, eng._lm_w, **kw, **eng._head_kw)
        tok, p = res[0], res[1]
    if eng._sampling.logprobs is not None:
        lp = res[2]
        eng._out_lp.index_copy_(1, col, lp.token[:, None])
        eng._out_top_ids.index_copy_(1, col, lp.top_ids[:, None])
        eng._out_top_lp.index_copy_(1, col, lp.top[:, None])
    eng._out_tok.index_copy_(1, col, torch.where(emit, tok, eng._pad)[:, None])
    eng._out_emit.index_copy_(1, col, emit[:, None])
    done = eng._done | torch.isin(tok, eng._eos) | (eng._nonfinite != 0)
    # Without a controller update nothing below changes (outputs start as NaN/False).
    if ess is not None and controller:
        if not fused:
            record_ref(eng.state, p, emit, col, eng._out_p, eng._out_ev, eng._out_t,
                       eng._reason_refusal)
        if ess.cls_bias_scale != 0:
            ev = eng.state.evaluating & emit
            pc = p.clamp(1e-6, 1 - 1e-6)
            eng._logit.copy_(torch.where(ev, torch.log(pc) - torch.log1p(-pc), eng._logit))
        if not fused:                              # step_end or'd it into eng._done
            done = done | eng.state.finished
    eng._done.copy_(done)
    eng._tok.copy_(tok)
    eng._step_idx += 1


def sample_fused(eng, h_tok, h_cls, kw, emit):
    """``head_sample_ref``'s step with the fused CPU controller (the same score, NaN check,
    state update, forced tokens and draws; the draws do not depend on the state), and the
    step's trace record: ``step_end_ref`` is the reference of the one call after the
    draw."""
    drawn = eng._head_fn(h_tok, eng._lm_w, **kw, **eng._head_kw)[0]
    _, w, b = eng._score_wb
    return eng._ctl.step_end(h_cls, w, b, drawn, emit, eng._step_idx, eng._out_p,
                             eng._out_ev, eng._out_t, eng._reason_refusal, eng._done,
                             h_tok)


def decode_rows_ref(lengths, step_idx, row_base):
    """``ops.cpu.controller.decode_rows``'s reference: ``(pos, q_pos, flat, seqlens_k)`` of a
    decode step's token rows."""
    t_prev = lengths + (step_idx.int() - 1)                          # t - 1 per sequence
    pos = t_prev.long()[:, None]
    return pos, t_prev[:, None], row_base + pos[:, 0], t_prev + 1


def step_begin_ref(st, ess, lengths, step_idx, row_base, cls_last: bool, spare_slot: int,
                   skip_idle: bool):
    """``ops.cpu.controller.step_begin``'s reference: ``(windows, n_ev, pos, q_pos, flat)`` of a
    decode step (n_ev None when no host count is needed) and ``st.seq_len`` set."""
    t_prev = lengths + (step_idx.int() - 1)                          # t - 1 per sequence
    st.seq_len.copy_(t_prev + 1)
    windows = plan_step(st, ess)
    n_ev = int(st.evaluating.sum()) if skip_idle else None
    if skip_idle and n_ev == 0:
        pos = t_prev.long()[:, None]
        return windows, n_ev, pos, t_prev[:, None], (row_base[:, None] + pos).reshape(-1)
    pos, q_pos, slots = cls_layout_ref(t_prev, st.evaluating, cls_last, spare_slot)
    return windows, n_ev, pos, q_pos, (row_base[:, None] + slots).reshape(-1)


def cls_layout_ref(t_prev, ev, cls_last: bool, spare_slot: int):
    """``(pos, q_pos, slots)`` of a step's token and [CLS] rows, ``(B, 2)`` each: RoPE
    positions, query positions (-1: a [CLS] row that does not evaluate, a padding row) and
    cache slots. The [CLS] slot (0) is refreshed before each layer's attention, for
    evaluating rows only; the others write to the spare slot, never read."""
    cls_pos = t_prev if cls_last else torch.zeros_like(t_prev)
    pos = torch.stack([t_prev, cls_pos], 1).long()
    q_pos = torch.stack([t_prev, torch.where(ev, 0, -1).int()], 1)
    slots = torch.stack([pos[:, 0], torch.where(ev, 0, spare_slot)], 1)
    return pos, q_pos, slots


def record_ref(state, p, emit, col, out_p, out_ev, out_t, reason_refusal):
    """The step's trace columns and refusal flags (``ops.cpu.controller.record`` fuses it)."""
    out_p.index_copy_(1, col, p[:, None])
    out_ev.index_copy_(1, col, (state.evaluating & emit)[:, None])
    out_t.index_copy_(1, col, state.seq_len[:, None])
    reason_refusal |= emit & state.finished


def step_end_ref(st, ess, h_cls, w, b, drawn, emit, col, out_p, out_ev, out_t,
                 reason_refusal, done, probe=None):
    """``ops.cpu.controller.step_end``'s reference: ``safety_score_ref``'s score with the
    prepared head ``(w, b)``, the controller update, the cascade's ``escalate`` when
    ``probe = (h_tok, w, b, threshold)``, the trace record, ``done |= st.finished``."""
    h_cls = h_cls[:, -1] if h_cls.dim() == 3 else h_cls
    scores = torch.sigmoid(h_cls.to(w.dtype) @ w + b).float()      # safety_score_ref
    tok, p, _ = fused_controller.update(st, ess, scores, drawn)
    if probe is not None:
        h_tok, pw, pb, thr = probe
        escalate(st, ess, torch.sigmoid(h_tok.to(pw.dtype) @ pw + pb).float(), thr)
    record_ref(st, p, emit, col, out_p, out_ev, out_t, reason_refusal)
    done |= st.finished
    return tok, p


__all__ = ["resolve_safety", "setup_safety", "bind_controller", "sample", "sample_fused",
           "decode_rows_ref", "step_begin_ref", "cls_layout_ref", "record_ref", "step_end_ref"]
