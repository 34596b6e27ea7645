"""ESS attention (DESIGN.md §3): validation, backend dispatch and the public function.

The math is defined by ``safekern.reference.ess_attention_ref``; fast kernels register
themselves as backends of the ``"ess_attention"`` op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._checks import FLOAT_DTYPES, INT_DTYPES, check_int_range, check_tensor
from ..reference.attention import default_q_pos, ess_attention_ref
from . import dispatch

OP = "ess_attention"


def _torch_backend(q, k, v, *, softmax_scale, causal, q_pos, seqlens_k, response_start,
                   cls_windows, key_bias, return_lse):
    return ess_attention_ref(q, k, v, softmax_scale=softmax_scale, causal=causal, q_pos=q_pos,
                             seqlens_k=seqlens_k, response_start=response_start,
                             cls_windows=cls_windows, key_bias=key_bias, return_lse=return_lse)


dispatch.register(OP, "torch", _torch_backend, lambda **ctx: None)


def _validate(q, k, v, softmax_scale, causal, q_pos, seqlens_k, response_start, cls_windows,
              key_bias):
    check_tensor("q", q, dims=4, dtypes=FLOAT_DTYPES)
    dev = q.device
    B, Lq, Hq, D = q.shape
    check_tensor("k", k, dims=4, dtypes=(q.dtype,), device=dev)
    Lk, Hkv = k.shape[1], k.shape[2]
    check_tensor("k", k, shape=(B, None, None, D))
    check_tensor("v", v, dims=4, dtypes=(q.dtype,), device=dev, shape=(B, Lk, Hkv, D))
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"number of query heads ({Hq}) must be a multiple of the number of "
                         f"key/value heads ({Hkv})")
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
    return None if x is None else x.to(torch.int32)


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

    Returns:
        ``o`` of shape ``(B, Lq, nheads_q, headdim)`` in ``q.dtype`` (and ``lse``). Rows that
        see no key output 0.

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
