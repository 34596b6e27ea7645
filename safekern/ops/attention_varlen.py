"""``ess_attention`` on packed variable-length sequences (flash-attn's ``*_varlen_func`` layout).

The kernels read right-padded ``(B, S, H, D)`` batches with per-sequence lengths
(``seqlens_k``, ``q_pos = -1`` padding rows), so the varlen form is a launcher around them:
scatter the packed tokens into a padded batch (one indexed copy per tensor), run
``ess_attention``, gather the valid rows back. The math is ``ess_attention``'s; the cost is
those copies plus the padded rows, which read nothing. A kernel that reads the packed layout in
place (per-sequence base offsets) is future work.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import FLOAT_DTYPES, INT_DTYPES, check_int_range, check_tensor
from .attention import ess_attention


def _lengths(name: str, cu: torch.Tensor, total: int, dev) -> torch.Tensor:
    check_tensor(name, cu, dims=1, dtypes=INT_DTYPES, device=dev)
    if cu.numel() < 2:
        raise ValueError(f"{name} must hold batch + 1 >= 2 offsets, got {cu.numel()}")
    lens = cu[1:] - cu[:-1]
    check_int_range(f"{name} differences (sequence lengths)", lens, 0, None)
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"{name} must start at 0 and end at the number of packed tokens "
                         f"({total}), got {int(cu[0])} ... {int(cu[-1])}")
    return lens


def _pad(x: torch.Tensor, b_of: torch.Tensor, pos: torch.Tensor, B: int, L: int):
    out = x.new_zeros(B, L, *x.shape[1:])
    out[b_of, pos] = x
    return out


def _token_index(cu: torch.Tensor, lens: torch.Tensor, total: int):
    """(sequence, position in it) of every packed token, without a host sync."""
    b_of = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens.long(),
                                   output_size=total)
    pos = torch.arange(total, device=cu.device) - cu.long()[b_of]
    return b_of, pos


def ess_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    response_start: Optional[torch.Tensor] = None,
    cls_windows: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """``ess_attention`` over packed sequences, as flash-attn's ``flash_attn_varlen_func``.

    Args:
        q: ``(total_q, nheads_q, headdim)``: the query tokens of every sequence, concatenated.
        k, v: ``(total_k, nheads_kv, headdim)``, same dtype and device; GQA as ``ess_attention``.
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` int32 offsets: sequence ``b`` owns rows
            ``[cu[b], cu[b + 1])``.
        max_seqlen_q, max_seqlen_k: the longest sequence of each (read from the offsets, one
            host sync, when None).
        causal: bottom-right aligned as flash-attn: query row ``i`` of sequence ``b`` sits at
            position ``len_k[b] - len_q[b] + i``. ``len_q[b] <= len_k[b]`` is required.
        response_start, cls_windows: ESS mode as ``ess_attention``, ``(B,)`` and ``(B, W, 2)``
            int32 in positions *within* each sequence (the [CLS] token at position 0).
        return_lse: also return the fp32 log-sum-exp ``(nheads_q, total_q)`` (flash-attn's
            varlen layout).

    Returns:
        ``o`` of shape ``(total_q, nheads_q, headdim)`` in ``q.dtype`` (and ``lse``).

    >>> q = torch.randn(7, 4, 64); k = v = torch.randn(7, 2, 64)
    >>> cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    >>> ess_attention_varlen(q, k, v, cu, cu).shape
    torch.Size([7, 4, 64])
    """
    check_tensor("q", q, dims=3, dtypes=FLOAT_DTYPES)
    dev = q.device
    check_tensor("k", k, dims=3, dtypes=(q.dtype,), device=dev)
    check_tensor("v", v, dims=3, dtypes=(q.dtype,), device=dev, shape=tuple(k.shape))
    lens_q = _lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], dev)
    lens_k = _lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], dev)
    B = lens_q.numel()
    if lens_k.numel() != B:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got {B} and {lens_k.numel()}")
    check_int_range("len_k - len_q (keys minus queries per sequence)", lens_k - lens_q, 0, None)
    Lq = int(lens_q.max()) if max_seqlen_q is None else max_seqlen_q
    Lk = int(lens_k.max()) if max_seqlen_k is None else max_seqlen_k
    for name, val, lens in (("max_seqlen_q", Lq, lens_q), ("max_seqlen_k", Lk, lens_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be an int >= 0, got {val!r}")
        check_int_range(f"sequence lengths (<= {name})", lens, None, val)
    bq, pq = _token_index(cu_seqlens_q, lens_q, q.shape[0])
    bk, pk = _token_index(cu_seqlens_k, lens_k, k.shape[0])
    i = torch.arange(max(Lq, 1), device=dev, dtype=torch.int32)[None]
    valid = i < lens_q[:, None]
    q_pos = torch.where(valid, (lens_k - lens_q).int()[:, None] + i, torch.full_like(i, -1))
    res = ess_attention(_pad(q, bq, pq, B, max(Lq, 1)), _pad(k, bk, pk, B, max(Lk, 1)),
                        _pad(v, bk, pk, B, max(Lk, 1)), softmax_scale=softmax_scale,
                        causal=causal, q_pos=q_pos, seqlens_k=lens_k.int(),
                        response_start=response_start, cls_windows=cls_windows,
                        return_lse=return_lse, backend=backend)
    if not return_lse:
        return res[bq, pq]
    o, lse = res
    return o[bq, pq], lse[bq, :, pq].transpose(0, 1).contiguous()


__all__ = ["ess_attention_varlen"]
