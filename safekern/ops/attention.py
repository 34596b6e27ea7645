"""ESS attention (docs/DESIGN.md §3): validation, dispatch, the torch backend, public function.

The math is defined by ``safekern.reference.ess_attention_ref``. The ``torch`` backend runs the
reference, except for fp32 inference calls with a finite result: on CPU, calls with at most
``cpu_attention.MAX_ROWS`` query rows (decode steps) take the C++ op of
``safekern.ops.cpu.attention`` (visibility as key ranges, no dense mask, one call per layer),
the others SDPA over the reference's own visibility mask (same result, ~2.5x faster than the
reference on a CPU decode step). The ``triton`` backend is the FlashAttention-2-style forward
of ``attention_triton.py`` (kernels, launcher, the autograd custom ops), whose backward is
``_attention_bwd.py``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from .._checks import FLOAT_DTYPES, INT_DTYPES, check_int_range, check_tensor
from ..reference.attention import (default_q_pos, ess_attention_ref, ess_visibility,
                                   resolve_positions)
from .cpu import attention as cpu_attention
from . import attention_triton
from . import dispatch

OP = "ess_attention"


class _MaskMemo:
    """Inside ``reuse_masks()``: the last SDPA mask, keyed on the identity of its inputs."""

    active = 0
    inputs: tuple = ()
    value: tuple = ()


@contextlib.contextmanager
def reuse_masks():
    """Within this block the ``torch`` backend builds each distinct visibility mask once.

    For callers that run many layers over the same position tensors (the engine's forward):
    a call whose ``q_pos``, ``seqlens_k``, ``response_start``, ``cls_windows`` and ``key_bias``
    are the *same objects* as the previous call's, with the same ``Lk`` and ``causal``, reuses
    its mask instead of rebuilding it per layer. The caller promises not to modify those
    tensors in place inside the block."""
    _MaskMemo.active += 1
    try:
        yield
    finally:
        _MaskMemo.active -= 1
        if not _MaskMemo.active:
            _MaskMemo.inputs, _MaskMemo.value = (), ()


def _sdpa_mask(q_pos, seqlens_k, Lk, causal, response_start, cls_windows, key_bias):
    """``(attn_mask (B, 1|H, Lq, Lk), row_sees_a_key (B, Lq, 1, 1))`` for SDPA."""
    inputs = (q_pos, seqlens_k, response_start, cls_windows, key_bias, Lk, causal)
    if _MaskMemo.active and len(_MaskMemo.inputs) == len(inputs) and all(
            a is b for a, b in zip(_MaskMemo.inputs, inputs)):
        return _MaskMemo.value
    vis = ess_visibility(q_pos, seqlens_k, Lk, causal=causal, response_start=response_start,
                         cls_windows=cls_windows)                        # (B, Lq, Lk)
    mask = vis[:, None]
    if key_bias is not None:
        mask = key_bias[:, :, None, :].masked_fill(~mask, float("-inf"))
    value = (mask, vis.any(-1)[:, :, None, None])
    if _MaskMemo.active:
        _MaskMemo.inputs, _MaskMemo.value = inputs, value
    return value


def _sdpa_masked(q, k, v, *, softmax_scale, causal, q_pos, seqlens_k, response_start,
                 cls_windows, key_bias):
    """SDPA over the reference's dense visibility mask (inference; no LSE, no autograd)."""
    B, Lq, Hq, _ = q.shape
    Lk = k.shape[1]
    q_pos, seqlens_k = resolve_positions(q_pos, seqlens_k, B, Lq, Lk, q.device)
    mask, sees = _sdpa_mask(q_pos, seqlens_k, Lk, causal, response_start, cls_windows, key_bias)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        scale=softmax_scale, enable_gqa=Hq != k.shape[2]).transpose(1, 2)
    # SDPA leaves NaN in rows that see no key; the contract says 0.
    return torch.where(sees, o, torch.zeros((), dtype=o.dtype))


def _torch_backend(q, k, v, *, softmax_scale, causal, q_pos, seqlens_k, response_start,
                   cls_windows, key_bias, return_lse):
    meta = dict(softmax_scale=softmax_scale, causal=causal, q_pos=q_pos, seqlens_k=seqlens_k,
                response_start=response_start, cls_windows=cls_windows, key_bias=key_bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, key_bias))
    if not needs_grad and cpu_attention.can_take(q):
        # Decode steps on CPU: one C++ call, visibility read as key ranges (no dense mask).
        B, Lq, _, D = q.shape
        q_pos, seqlens_k = resolve_positions(q_pos, seqlens_k, B, Lq, k.shape[1], q.device)
        o, lse, bad = cpu_attention.decode_attention(
            q, k, v, softmax_scale=D ** -0.5 if softmax_scale is None else softmax_scale,
            causal=causal, q_pos=_as_i32(q_pos), seqlens_k=_as_i32(seqlens_k),
            response_start=_as_i32(response_start), cls_windows=_as_i32(cls_windows),
            key_bias=key_bias)
        if not bad:          # a non-finite logit or output: the reference decides
            return (o, lse) if return_lse else o
    elif q.dtype == torch.float32 and not return_lse and not needs_grad:
        o = _sdpa_masked(q, k, v, **meta)
        # SDPA multiplies the zero probabilities of hidden keys by their values (0 * NaN = NaN)
        # and turns a row whose logits are all -inf into NaN. Any non-finite input that touches
        # a kept row's arithmetic leaves a NaN/inf in o, so a finite o (one small reduction, one
        # host read) is the reference's result; otherwise the reference decides.
        if math.isfinite(float(o.sum())):
            return o
    return ess_attention_ref(q, k, v, return_lse=return_lse, **meta)


dispatch.register(OP, "torch", _torch_backend, lambda **ctx: None)

if attention_triton.triton is not None:
    dispatch.register(OP, "triton", attention_triton._triton_backend,
                      attention_triton._triton_can_run)


def _consistent(q_shape, k_shape, v_shape) -> bool:
    """Do the shapes fit q (B, Lq, Hq, D), k = v (B, Lk, Hkv, D) with Hq % Hkv == 0?"""
    return (tuple(k_shape) == tuple(v_shape) and q_shape[0] == k_shape[0]
            and q_shape[3] == k_shape[3] and k_shape[2] > 0 and q_shape[2] % k_shape[2] == 0)


def _layout_hint(q, k, v) -> str:
    """Which tensors look like (B, H, S, D) when the others are (B, S, H, D), or ''.

    Only a mix is detectable: when *all* three are (B, H, S, D) the shapes are self-consistent
    (``Hq % Hkv`` is then ``Lq % Lk``), so pass (B, S, H, D) views, e.g. ``x.transpose(1, 2)``.
    """
    shapes = {"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape)}
    swap = lambda s: (s[0], s[2], s[1], s[3])  # noqa: E731
    fixes = []
    for names in (("q",), ("k",), ("v",), ("k", "v"), ("q", "k"), ("q", "v")):
        fixed = {n: swap(s) if n in names else s for n, s in shapes.items()}
        if _consistent(fixed["q"], fixed["k"], fixed["v"]):
            fixes.append(", ".join(n + ".transpose(1, 2)" for n in names))
    if not fixes:
        return ""
    return (f"; ess_attention takes (batch, seqlen, nheads, headdim) tensors and these shapes "
            f"(q {shapes['q']}, k {shapes['k']}, v {shapes['v']}) look like a mix with "
            f"(batch, nheads, seqlen, headdim): they fit with {' or with '.join(fixes)} "
            "(a view, no copy)")


def _validate(q, k, v, softmax_scale, causal, q_pos, seqlens_k, response_start, cls_windows,
              key_bias):
    check_tensor("q", q, dims=4, dtypes=FLOAT_DTYPES)
    dev = q.device
    B, Lq, Hq, D = q.shape
    check_tensor("k", k, dims=4, dtypes=(q.dtype,), device=dev)
    check_tensor("v", v, dims=4, dtypes=(q.dtype,), device=dev)
    Lk, Hkv = k.shape[1], k.shape[2]
    hint = "" if _consistent(q.shape, k.shape, v.shape) else _layout_hint(q, k, v)
    try:
        check_tensor("k", k, shape=(B, None, None, D))
        check_tensor("v", v, dims=4, dtypes=(q.dtype,), device=dev, shape=(B, Lk, Hkv, D))
    except ValueError as e:
        raise ValueError(f"{e}{hint}") from None
    if D == 0:
        raise ValueError(f"q, k and v must have a head dim (last axis) >= 1, got shape "
                         f"{tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"number of query heads ({Hq}) must be a multiple of the number of "
                         f"key/value heads ({Hkv}){hint}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(
            softmax_scale, (int, float)) or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if q_pos is not None:
        check_tensor("q_pos", q_pos, dtypes=INT_DTYPES, device=dev, shape=(B, Lq))
        check_int_range("q_pos", q_pos, -1, None)
    if seqlens_k is not None:
        check_tensor("seqlens_k", seqlens_k, dtypes=INT_DTYPES, device=dev, shape=(B,))
        check_int_range("seqlens_k", seqlens_k, 0, Lk)
    if response_start is not None:
        check_tensor("response_start", response_start, dtypes=INT_DTYPES, device=dev, shape=(B,))
        check_int_range("response_start", response_start, 0, None)
    if cls_windows is not None:
        if response_start is None:
            raise ValueError("cls_windows requires response_start (ESS mode is on iff "
                             "response_start is given)")
        check_tensor("cls_windows", cls_windows, dtypes=INT_DTYPES, device=dev,
                     shape=(B, None, 2))
        check_int_range("cls_windows", cls_windows, 0, Lk)
    if key_bias is not None:
        check_tensor("key_bias", key_bias, dims=3, dtypes=(torch.float32,), device=dev)
        if key_bias.shape[0] != B or key_bias.shape[1] not in (1, Hq) or key_bias.shape[2] != Lk:
            raise ValueError(f"key_bias must have shape ({B}, {Hq} or 1, {Lk}), got "
                             f"{tuple(key_bias.shape)}")


def _as_i32(x):
    return x if x is None or x.dtype == torch.int32 else x.to(torch.int32)


def ess_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    q_pos: Optional[torch.Tensor] = None,
    seqlens_k: Optional[torch.Tensor] = None,
    response_start: Optional[torch.Tensor] = None,
    cls_windows: Optional[torch.Tensor] = None,
    key_bias: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention with the ESS masks and an additive safety-signal key bias.

    Args:
        q: ``(batch, seqlen_q, nheads_q, headdim)``, fp16/bf16/fp32 (fp64: torch backend only).
        k, v: ``(batch, seqlen_k, nheads_kv, headdim)``, same dtype and device as ``q``.
            ``nheads_q % nheads_kv == 0``: with 6 query and 2 KV heads, query heads 0, 1, 2
            read KV head 0 (GQA/MQA without repeating K/V). Strided views, e.g. a
            ``(B, H, S, D)`` tensor transposed to ``(B, S, H, D)``, are accepted.
        softmax_scale: default ``headdim ** -0.5``.
        causal: a normal row at position ``i`` sees keys ``j <= i``.
        q_pos: ``(B, Lq)`` int32 absolute positions; default bottom-right aligned to
            ``seqlens_k`` (row ``i`` at ``seqlens_k[b] - Lq + i``). ``-1`` = padding row:
            output 0, reads nothing. Right-padded prefill passes ``q_pos`` explicitly.
        seqlens_k: ``(B,)`` int32 valid keys per sequence (default ``seqlen_k``).
        response_start: ``(B,)`` int32. Given => ESS mode: normal rows see key 0 (the [CLS])
            only when ``q_pos >= response_start``; the row at ``q_pos == 0`` is the [CLS] row.
        cls_windows: ``(B, W, 2)`` int32 ``[start, end)`` key windows of the [CLS] row (which
            also sees key 0 and ignores causality); ESS mode only.
        key_bias: ``(B, nheads_q or 1, seqlen_k)`` float32 added to the scaled logits.
        return_lse: also return the log-sum-exp ``(B, nheads_q, Lq)`` float32.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"cuda"`` (env ``SAFEKERN_BACKEND``
            overrides ``auto``). An explicit backend that cannot run raises ``RuntimeError``.
            ``triton`` supports autograd (dq, dk, dv, d``key_bias``; a returned ``lse`` is
            differentiable too); it takes the split-KV decode kernel when ``seqlen_q <= 2``.
            ``auto`` picks the kernels on a GPU and the reference on a CPU.

    Returns:
        ``o`` of shape ``(B, Lq, nheads_q, headdim)`` in ``q.dtype`` (and ``lse``). Rows that
        see no key output 0.

    Non-finite inputs (the same on every backend; NaN propagates like flash-attn and SDPA):
        * keys a row cannot see (causality, the ESS rules, ``seqlens_k``) contribute nothing,
          whatever their ``k``, ``v`` and ``key_bias`` hold;
        * NaN in the row's ``q`` or in a visible ``k`` / ``key_bias`` (or a ``+inf`` logit)
          makes the row's output and lse NaN;
        * NaN/inf in ``v`` at a visible key makes that output element NaN;
        * a ``-inf`` ``key_bias`` removes a key; a row whose visible keys all have a ``-inf``
          logit sees no key: output 0, lse ``-inf``.

    >>> q = torch.randn(1, 5, 4, 64); k = v = torch.randn(1, 5, 2, 64)
    >>> ess_attention(q, k, v, response_start=torch.tensor([3], dtype=torch.int32)).shape
    torch.Size([1, 5, 4, 64])
    """
    _validate(q, k, v, softmax_scale, causal, q_pos, seqlens_k, response_start, cls_windows,
              key_bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, key_bias))
    _, fn = dispatch.choose(OP, backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1],
                            seqlen_q=q.shape[1], seqlen_k=k.shape[1], requires_grad=needs_grad)
    return fn(q, k, v, softmax_scale=softmax_scale, causal=causal, q_pos=_as_i32(q_pos),
              seqlens_k=_as_i32(seqlens_k), response_start=_as_i32(response_start),
              cls_windows=_as_i32(cls_windows), key_bias=key_bias, return_lse=return_lse)


__all__ = ["ess_attention", "default_q_pos"]
