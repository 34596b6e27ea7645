"""Reference ESS attention (docs/DESIGN.md §3): the oracle every attention kernel is tested on.

Dense and simple on purpose: it materialises the (Lq, Lk) visibility mask per batch row, so it
is for tests, benchmarks baselines and CPU inference, not for long contexts.
"""
from __future__ import annotations

from typing import Optional

import torch


def default_q_pos(seqlens_k: torch.Tensor, Lq: int) -> torch.Tensor:
    """Bottom-right alignment: row ``i`` of sequence ``b`` sits at ``seqlens_k[b] - Lq + i``.

    Rows that would fall before position 0 are padding (-1).
    """
    i = torch.arange(Lq, device=seqlens_k.device, dtype=torch.int32)
    pos = seqlens_k.to(torch.int32)[:, None] - Lq + i[None, :]
    return torch.where(pos >= 0, pos, torch.full_like(pos, -1))


def resolve_positions(q_pos: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor],
                      batch: int, Lq: int, Lk: int, device):
    """``(q_pos, seqlens_k)`` with the contract's defaults filled in: every key valid, rows
    bottom-right aligned (``default_q_pos``)."""
    if seqlens_k is None:
        seqlens_k = torch.full((batch,), Lk, dtype=torch.int32, device=device)
    if q_pos is None:
        q_pos = default_q_pos(seqlens_k, Lq)
    return q_pos, seqlens_k


def ess_visibility(
    q_pos: torch.Tensor,
    seqlens_k: torch.Tensor,
    Lk: int,
    *,
    causal: bool = True,
    response_start: Optional[torch.Tensor] = None,
    cls_windows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean ``(B, Lq, Lk)`` mask: ``mask[b, r, j]`` is True iff query row ``r`` sees key ``j``.

    Args:
        q_pos: ``(B, Lq)`` int, absolute positions; ``-1`` = padding row (sees nothing).
        seqlens_k: ``(B,)`` int, valid keys per sequence.
        Lk: padded key length.
        causal: normal rows see keys ``j <= q_pos``.
        response_start: ``(B,)`` int; given => ESS mode ([CLS] row and key-0 rule).
        cls_windows: ``(B, W, 2)`` int ``[start, end)`` windows of the [CLS] row (ESS mode only).
    """
    dev = q_pos.device
    j = torch.arange(Lk, device=dev)[None, None, :]                      # (1, 1, Lk)
    pos = q_pos.long()[:, :, None]                                       # (B, Lq, 1)
    in_seq = j < seqlens_k.long()[:, None, None]                         # (B, 1, Lk)
    valid_row = pos >= 0
    vis = in_seq & valid_row
    if causal:
        vis = vis & (j <= pos)
    if response_start is None:
        return vis.expand(q_pos.shape[0], q_pos.shape[1], Lk).clone()
    # Normal rows see key 0 only once they are response tokens.
    normal = vis & ((j > 0) | (pos >= response_start.long()[:, None, None]))
    # The [CLS] row (q_pos == 0) sees key 0 plus its windows, ignoring causality.
    cls_keys = j == 0
    if cls_windows is not None:
        s = cls_windows[..., 0].long()[:, :, None]                      # (B, W, 1)
        e = cls_windows[..., 1].long()[:, :, None]
        jj = torch.arange(Lk, device=dev)[None, None, :]
        cls_keys = cls_keys | ((jj >= s) & (jj < e)).any(dim=1, keepdim=True)  # (B, 1, Lk)
    cls_vis = cls_keys & in_seq
    is_cls = pos == 0
    return torch.where(is_cls, cls_vis, normal)


def ess_attention_ref(
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
    compute_dtype: Optional[torch.dtype] = None,
    softmax_dtype: Optional[torch.dtype] = None,
):
    """ESS attention, the definition (docs/DESIGN.md §3). Inputs are assumed valid.

    Args:
        q: ``(B, Lq, Hq, D)``; k, v: ``(B, Lk, Hkv, D)`` with ``Hq % Hkv == 0``. Query head
            ``h`` reads KV head ``h // (Hq // Hkv)``; K/V are never repeated in memory.
        key_bias: ``(B, Hq or 1, Lk)`` added to the scaled logits of visible keys.
        compute_dtype: dtype of the math; default float64 for float64 inputs, else float32.
            Pass the input dtype to measure "the reference in the input dtype" error.
        softmax_dtype: dtype of the key bias, mask and softmax (default ``compute_dtype``).
            ``compute_dtype=torch.bfloat16, softmax_dtype=torch.float32`` is transformers'
            eager attention: half-precision matmuls, the scores upcast for the softmax, ``p``
            rounded back for ``p @ v``.
    Returns:
        ``o (B, Lq, Hq, D)`` in ``q.dtype``; with ``return_lse`` also ``lse (B, Hq, Lq)``
        float32 (``-inf`` for rows that see no key). Rows that see no key output 0.
    Non-finite input: hidden keys are never read (whatever their k, v, key_bias hold); a row
    whose visible keys all have a ``-inf`` logit sees no key; NaN in a visible logit (``q``,
    ``k``, ``key_bias``) makes the row's output and lse NaN; a non-finite ``v`` at a visible
    key makes that output element NaN.
    Supports autograd (used by the training recipe).
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if softmax_dtype is None:
        softmax_dtype = compute_dtype
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    q_pos, seqlens_k = resolve_positions(q_pos, seqlens_k, B, Lq, Lk, q.device)
    vis = ess_visibility(q_pos, seqlens_k, Lk, causal=causal, response_start=response_start,
                         cls_windows=cls_windows)                        # (B, Lq, Lk)

    qc = q.to(compute_dtype).reshape(B, Lq, Hkv, G, D)
    kc, vc = k.to(compute_dtype), v.to(compute_dtype)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qc, kc) * scale                # (B, Hkv, G, Lq, Lk)
    s = s.to(softmax_dtype)
    if key_bias is not None:
        kb = key_bias.to(softmax_dtype)
        kb = kb.expand(B, Hq, Lk).reshape(B, Hkv, G, 1, Lk)
        s = s + kb
    mask = vis[:, None, None, :, :]
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                     # (B, Hkv, G, Lq)
    # A +inf logit has no softmax: NaN, like a NaN logit. A row sees a key iff one of its
    # visible logits is > -inf (a -inf key_bias removes a key); NaN compares != -inf.
    lse = lse.masked_fill(lse == float("inf"), float("nan"))
    sees = lse != float("-inf")
    p = torch.exp(s - torch.where(sees, lse, torch.zeros_like(lse))[..., None])
    p = torch.where(mask, p, torch.zeros_like(p))
    # p = 0 at a hidden key times a NaN/inf value there would be NaN: values are read finite,
    # and a non-finite value at a key the row sees makes that output element NaN.
    bad = ~torch.isfinite(vc)                                            # (B, Lk, Hkv, D)
    o = torch.einsum("bhgqk,bkhd->bqhgd", p.to(compute_dtype), vc.masked_fill(bad, 0))
    hit = torch.einsum("bqk,bkhd->bqhd", vis.to(compute_dtype), bad.to(compute_dtype)) > 0
    hit = hit[:, :, :, None, :] & sees.permute(0, 3, 1, 2)[..., None]    # (B, Lq, Hkv, G, D)
    o = o.masked_fill(hit, float("nan")).reshape(B, Lq, Hq, D).to(q.dtype)
    if not return_lse:
        return o
    return o, lse.reshape(B, Hq, Lq).float()
