"""ESS attention backward (FlashAttention-2 style): dq, dk, dv and the key-bias gradient.

The math, for one query row ``i`` and the keys ``j`` it sees (``safekern.reference.ess_visibility``
defines "sees"; ``p`` is the forward's softmax, rebuilt from the saved log-sum-exp)::

    s_ij   = scale * q_i . k_j + key_bias[h, j]          p_ij = exp(s_ij - lse_i)
    delta_i = sum_d dO_id * O_id  -  dlse_i               (dlse: the gradient of a returned lse)
            = sum_j p_ij dO_i . v_j  -  dlse_i             (the same, without O's rounding)
    ds_ij  = p_ij * (dO_i . v_j - delta_i)
    dq_i = scale * sum_j ds_ij k_j    dk_j = scale * sum_i ds_ij q_i    dv_j = sum_i p_ij dO_i
    dkey_bias[h, j] = sum_i ds_ij     (summed over heads too for a broadcast (B, 1, Lk) bias)

Rows that see nothing (padding rows, ``lse = -inf``) have ``p = 0``: zero gradients, and they
contribute nothing. No ``(Lq, Lk)`` tensor exists: two kernels recompute ``p`` tile by tile.

* ``_ess_attn_bwd_dq`` runs first: one program per (query tile, batch * query head), the
  forward's key loop: the causal range of its normal rows, plus the key tiles of its [CLS]
  rows' windows. It uses ``delta`` from the stored O and also writes ``sum_j p_ij dp_ij``,
  the delta the second kernel uses (in fp16/bf16 the stored O is rounded; see the launcher).
* ``_ess_attn_bwd_dkdv``: one program per (key tile, batch * KV head). It loops over the G
  query heads of its KV head (GQA/MQA: dk/dv accumulate over the group in registers, K/V are
  never repeated, no atomics) and over the query tiles that reach its key tile: normal rows
  whose causal range covers the tile, and the tiles holding a [CLS] row when the key tile
  holds key 0 or a key of a [CLS] window (the [CLS] row ignores causality, so its window keys
  get its contribution even from above the diagonal). It writes dkey_bias per query head.

Tiles every row sees entirely skip the per-element mask (``MASKED=False``), as in the forward.
"""
from __future__ import annotations

import torch

from ._attention_common import _LOG2E

try:
    import triton
    import triton.language as tl
except ImportError:  # attention_triton.py never routes a backward here without triton
    triton = None

if triton is not None:
    from ._attention_common import (_cls_key_end, _cls_keys, _mma, _narrow, _row_key_end,
                                    _row_kinds, _row_positions)

    @triton.jit
    def _visible(pos, normal, is_cls, offs_n, seqlen, rs, cw_ptr, W,
                 CAUSAL: tl.constexpr, IS_ESS: tl.constexpr):
        """``(BLOCK_M, BLOCK_N)`` visibility of keys ``offs_n`` for rows at ``pos``."""
        j = offs_n[None, :]
        p_ = pos[:, None]
        vis = normal[:, None] & (j < seqlen)
        if CAUSAL:
            vis = vis & (j <= p_)
        if IS_ESS:
            vis = vis & ((j > 0) | (p_ >= rs))
            cls_vis = _cls_keys(offs_n, cw_ptr, W) & (offs_n < seqlen)
            vis = vis | (is_cls[:, None] & cls_vis[None, :])
        return vis

    @triton.jit
    def _tile_grads(q, do, lse2, delta, k, v, kb, pos, normal, is_cls, offs_n, seqlen, rs,
                    cw_ptr, W, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, IS_ESS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
        """``(p, dp, ds)`` of one (query tile, key tile) pair, recomputed from the log2-domain
        LSE."""
        qk = _mma(q, tl.trans(k), DOT_PREC, INTERP_BF16) * qk_scale
        if HAS_BIAS:
            qk += kb[None, :] * 1.4426950408889634
        if MASKED:
            vis = _visible(pos, normal, is_cls, offs_n, seqlen, rs, cw_ptr, W, CAUSAL, IS_ESS)
            qk = tl.where(vis, qk, float("-inf"))
        p = tl.math.exp2(qk - lse2[:, None])
        dp = _mma(do, tl.trans(v), DOT_PREC, INTERP_BF16)
        ds = p * (dp - delta[:, None])
        return p, dp, ds

    @triton.jit
    def _tile_is_full(pos, normal, start_n, seqlen, rs, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, IS_ESS: tl.constexpr):
        """Every row of the query tile is a normal row that sees every key of the key tile."""
        full = (tl.min(normal.to(tl.int32)) == 1) & (start_n + BLOCK_N <= seqlen)
        if CAUSAL:
            full = full & (tl.min(pos) >= start_n + BLOCK_N - 1)
        if IS_ESS:
            full = full & ((start_n > 0) | (tl.min(pos) >= rs))
        return full

    @triton.jit
    def _cls_tile_hit(cw_ptr, W, start_n, seqlen, BLOCK_N: tl.constexpr):
        """The key tile at ``start_n`` holds key 0 or a key of a [CLS] window."""
        hit = start_n == 0
        for w in range(W):
            ws = tl.load(cw_ptr + 2 * w)
            we = tl.minimum(tl.load(cw_ptr + 2 * w + 1), seqlen)
            hit = hit | ((ws < we) & (ws < start_n + BLOCK_N) & (we > start_n))
        return hit & (start_n < seqlen)

    @triton.jit
    def _load_rows(Q, DO, LSE, DELTA, b, h, offs_m, row_ok, pos, offs_d, Lq, Hq,
                   stride_qb, stride_qm, stride_qh, stride_qd,
                   stride_dob, stride_dom, stride_doh, stride_dod, HEAD_DIM: tl.constexpr):
        """q, dO, log2-domain LSE and delta of a query tile. Padding rows load zeros, so
        whatever their q or dO (hence delta) holds, NaN included, never reaches a gradient."""
        live = (pos >= 0)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(Q + b * stride_qb + offs_m[:, None] * stride_qm + h * stride_qh
                    + offs_d[None, :] * stride_qd, mask=live, other=0.0)
        do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_dom + h * stride_doh
                     + offs_d[None, :] * stride_dod, mask=live, other=0.0)
        row = (b * Hq + h) * Lq + offs_m
        lse = tl.load(LSE + row, mask=row_ok, other=0.0)
        # rows that saw no key (lse = -inf) have no visible key here either: any finite value
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        delta = tl.load(DELTA + row, mask=pos >= 0, other=0.0)
        return q, do, lse2, delta

    @triton.jit
    def _ess_attn_bwd_dkdv(
        Q, K, V, DO, LSE, DELTA, DK, DV, DKB, QPOS, SEQLENS, RSTART, CW, KB,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_dob, stride_dom, stride_doh, stride_dod,
        stride_dkb, stride_dkn, stride_dkh, stride_dkd,
        stride_dvb, stride_dvn, stride_dvh, stride_dvd,
        stride_kbb, stride_kbh, stride_kbn,
        Lq, Lk, Hq, Hkv, G, W, qk_scale, sm_scale,
        HAS_QPOS: tl.constexpr, HAS_SEQLENS: tl.constexpr,
        CAUSAL: tl.constexpr, IS_ESS: tl.constexpr, HAS_BIAS: tl.constexpr,
        BIAS_GRAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
        INTERP_BF16: tl.constexpr,
    ):
        """dk, dv (and dkey_bias) of one key tile of one KV head, over its query-head group."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hkv = pid_bh % Hkv
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_m0 = tl.arange(0, BLOCK_M)
        if HAS_SEQLENS:
            seqlen = tl.load(SEQLENS + b)
        else:
            seqlen = Lk
        kv_mask = (offs_n < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(K + b * stride_kb + offs_n[:, None] * stride_kn + hkv * stride_kh
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * stride_vb + offs_n[:, None] * stride_vn + hkv * stride_vh
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        cw_ptr = CW + b * 2 * W
        cls_hit = False
        if IS_ESS:
            cls_hit = _cls_tile_hit(cw_ptr, W, start_n, seqlen, BLOCK_N)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for g in range(G):
            h = hkv * G + g
            kb = tl.zeros([BLOCK_N], tl.float32)
            if HAS_BIAS:
                kb = tl.load(KB + b * stride_kbb + h * stride_kbh + offs_n * stride_kbn,
                             mask=offs_n < seqlen, other=0.0)
            dkb = tl.zeros([BLOCK_N], tl.float32)
            for start_m in range(0, Lq, BLOCK_M):
                offs_m = start_m + offs_m0
                row_ok = offs_m < Lq
                pos, _ = _row_positions(QPOS, SEQLENS, b, offs_m, row_ok, Lq, Lk, HAS_QPOS,
                                        HAS_SEQLENS)
                rs, normal, is_cls = _row_kinds(RSTART, b, pos, IS_ESS)
                if CAUSAL:
                    hit = tl.max(tl.where(normal, pos, -1)) >= start_n
                else:
                    hit = tl.max(normal.to(tl.int32)) > 0
                hit = hit & (start_n < seqlen)
                if IS_ESS:
                    hit = hit | (cls_hit & (tl.max(is_cls.to(tl.int32)) > 0))
                if hit:
                    q, do, lse2, delta = _load_rows(
                        Q, DO, LSE, DELTA, b, h, offs_m, row_ok, pos, offs_d, Lq, Hq,
                        stride_qb, stride_qm, stride_qh, stride_qd,
                        stride_dob, stride_dom, stride_doh, stride_dod, HEAD_DIM)
                    if _tile_is_full(pos, normal, start_n, seqlen, rs, BLOCK_N, CAUSAL, IS_ESS):
                        p, dp, ds = _tile_grads(q, do, lse2, delta, k, v, kb, pos, normal,
                                                is_cls, offs_n, seqlen, rs, cw_ptr, W, qk_scale,
                                                False, CAUSAL, IS_ESS, HAS_BIAS, DOT_PREC,
                                                INTERP_BF16)
                    else:
                        p, dp, ds = _tile_grads(q, do, lse2, delta, k, v, kb, pos, normal,
                                                is_cls, offs_n, seqlen, rs, cw_ptr, W, qk_scale,
                                                True, CAUSAL, IS_ESS, HAS_BIAS, DOT_PREC,
                                                INTERP_BF16)
                    dv += _mma(tl.trans(_narrow(p, do.dtype, INTERP_BF16)), do, DOT_PREC,
                               INTERP_BF16)
                    dk += _mma(tl.trans(_narrow(ds, q.dtype, INTERP_BF16)), q, DOT_PREC,
                               INTERP_BF16)
                    if BIAS_GRAD:
                        dkb += tl.sum(ds, 0)
            if BIAS_GRAD:
                # (B, Hq, Lk) fp32, contiguous; keys no row sees get 0
                tl.store(DKB + (b * Hq + h) * Lk + offs_n, dkb, mask=offs_n < Lk)
        d_ok = (offs_n < Lk)[:, None] & (offs_d < HEAD_DIM)[None, :]
        tl.store(DK + b * stride_dkb + offs_n[:, None] * stride_dkn + hkv * stride_dkh
                 + offs_d[None, :] * stride_dkd,
                 _narrow(dk * sm_scale, DK.dtype.element_ty, INTERP_BF16), mask=d_ok)
        tl.store(DV + b * stride_dvb + offs_n[:, None] * stride_dvn + hkv * stride_dvh
                 + offs_d[None, :] * stride_dvd, _narrow(dv, DV.dtype.element_ty, INTERP_BF16),
                 mask=d_ok)

    @triton.jit
    def _ess_attn_bwd_dq(
        Q, K, V, DO, LSE, DELTA, DQ, PDP, QPOS, SEQLENS, RSTART, CW, KB,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_dob, stride_dom, stride_doh, stride_dod,
        stride_dqb, stride_dqm, stride_dqh, stride_dqd,
        stride_kbb, stride_kbh, stride_kbn,
        Lq, Lk, Hq, G, W, qk_scale, sm_scale,
        HAS_QPOS: tl.constexpr, HAS_SEQLENS: tl.constexpr,
        CAUSAL: tl.constexpr, IS_ESS: tl.constexpr, HAS_BIAS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
        INTERP_BF16: tl.constexpr,
    ):
        """dq of one query tile of one query head, and its rows' ``sum_j p_ij dp_ij``."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hkv = h // G
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < Lq
        pos, seqlen = _row_positions(QPOS, SEQLENS, b, offs_m, row_ok, Lq, Lk, HAS_QPOS,
                                     HAS_SEQLENS)
        rs, normal, is_cls = _row_kinds(RSTART, b, pos, IS_ESS)
        q, do, lse2, delta = _load_rows(Q, DO, LSE, DELTA, b, h, offs_m, row_ok, pos, offs_d,
                                        Lq, Hq, stride_qb, stride_qm, stride_qh, stride_qd,
                                        stride_dob, stride_dom, stride_doh, stride_dod,
                                        HEAD_DIM)
        k_base = K + b * stride_kb + hkv * stride_kh
        v_base = V + b * stride_vb + hkv * stride_vh
        kb_base = KB + b * stride_kbb + h * stride_kbh
        cw_ptr = CW + b * 2 * W
        hi = tl.max(tl.where(normal, _row_key_end(pos, seqlen, CAUSAL), 0))
        end = hi
        has_cls = False
        if IS_ESS:
            has_cls = tl.max(is_cls.to(tl.int32)) > 0
            if has_cls:
                end = tl.maximum(end, _cls_key_end(cw_ptr, W, seqlen))
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        pdp = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, end, BLOCK_N):
            hit = start_n < hi
            if IS_ESS:
                hit = hit | (has_cls & _cls_tile_hit(cw_ptr, W, start_n, seqlen, BLOCK_N))
            if hit:
                offs_n = start_n + offs_n0
                kv_mask = (offs_n < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=kv_mask, other=0.0)
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                            mask=kv_mask, other=0.0)
                kb = tl.zeros([BLOCK_N], tl.float32)
                if HAS_BIAS:
                    kb = tl.load(kb_base + offs_n * stride_kbn, mask=offs_n < seqlen, other=0.0)
                if _tile_is_full(pos, normal, start_n, seqlen, rs, BLOCK_N, CAUSAL, IS_ESS):
                    p, dp, ds = _tile_grads(q, do, lse2, delta, k, v, kb, pos, normal,
                                            is_cls, offs_n, seqlen, rs, cw_ptr, W, qk_scale,
                                            False, CAUSAL, IS_ESS, HAS_BIAS, DOT_PREC,
                                            INTERP_BF16)
                else:
                    p, dp, ds = _tile_grads(q, do, lse2, delta, k, v, kb, pos, normal,
                                            is_cls, offs_n, seqlen, rs, cw_ptr, W, qk_scale,
                                            True, CAUSAL, IS_ESS, HAS_BIAS, DOT_PREC,
                                            INTERP_BF16)
                dq += _mma(_narrow(ds, k.dtype, INTERP_BF16), k, DOT_PREC, INTERP_BF16)
                pdp += tl.sum(p * dp, 1)
        tl.store(DQ + b * stride_dqb + offs_m[:, None] * stride_dqm + h * stride_dqh
                 + offs_d[None, :] * stride_dqd,
                 _narrow(dq * sm_scale, DQ.dtype.element_ty, INTERP_BF16),
                 mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
        tl.store(PDP + (b * Hq + h) * Lq + offs_m, pdp, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def _bwd_config(head_dim: int, dtype: torch.dtype, device: torch.device):
    """``(dkdv (BLOCK_M, BLOCK_N), dq (BLOCK_M, BLOCK_N), num_warps, num_stages)``.

    The dk/dv kernel keeps a key tile (and its dk, dv accumulators) resident and streams query
    tiles, the dq kernel the other way round: each gets the long side on its resident operand,
    as in the Triton tutorial's backward. The interpreter gets small tiles so the odd test
    shapes cross several tiles. GPU values are a first choice, not tuned."""
    if device.type != "cuda":
        return (16, 32), (32, 16), 4, 1
    if head_dim <= 64:
        return ((32, 128), (128, 32), 8, 2) if dtype != torch.float32 else \
            ((32, 64), (64, 32), 4, 2)
    if head_dim <= 128:
        return ((32, 64), (64, 32), 4, 2) if dtype != torch.float32 else \
            ((16, 64), (64, 16), 4, 1)
    return (16, 32), (32, 16), 4, 1


def attention_bwd_triton(do, q, k, v, o, lse, dlse=None, *, softmax_scale=None, causal=True,
                         q_pos=None, seqlens_k=None, response_start=None, cls_windows=None,
                         key_bias=None, bias_grad=False):
    """Gradients of ``ess_attention``'s Triton forward: ``(dq, dk, dv, dkey_bias)``.

    Args:
        do: ``(B, Lq, Hq, D)`` gradient of ``o``; ``q, k, v, o``: the forward's inputs and
            output (any strides); ``lse``: the forward's ``(B, Hq, Lq)`` fp32 log-sum-exp.
        dlse: optional ``(B, Hq, Lq)`` gradient of a returned ``lse``.
        softmax_scale ... key_bias: the forward's arguments (int tensors as int32).
        bias_grad: also return ``dkey_bias`` (shaped like ``key_bias``, fp32); else None.
    Returns:
        ``dq`` like ``q``, ``dk``/``dv`` like ``k``/``v`` (dtype of the inputs), ``dkey_bias``.
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dev = q.device
    if do.shape != q.shape:
        raise ValueError(f"do must have the shape of the output {tuple(q.shape)}, got "
                         f"{tuple(do.shape)}")
    if lse.shape != (B, Hq, Lq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be ({B}, {Hq}, {Lq}) float32, got {tuple(lse.shape)} "
                         f"{lse.dtype}")
    if bias_grad and key_bias is None:
        raise ValueError("bias_grad=True needs key_bias")
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    dq = torch.empty(B, Lq, Hq, D, dtype=q.dtype, device=dev)
    dk = torch.empty(B, Lk, Hkv, D, dtype=k.dtype, device=dev)
    dv = torch.empty(B, Lk, Hkv, D, dtype=v.dtype, device=dev)
    # delta_i = rowsum(dO * O) (the softmax's Jacobian term), linear in L
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse
    delta = delta.contiguous()
    if B * Lq * Hq == 0 or Lk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, torch.zeros_like(key_bias) if bias_grad else None

    dkb = torch.empty(B, Hq, Lk, dtype=torch.float32, device=dev) if bias_grad else None
    dummy = dq

    def i32(x):
        return dummy if x is None else x.to(torch.int32).contiguous()

    seqlens_t, q_pos_t, rstart = i32(seqlens_k), i32(q_pos), i32(response_start)
    if cls_windows is not None and cls_windows.shape[1] > 0:
        cw, W = i32(cls_windows), cls_windows.shape[1]
    else:
        cw, W = dummy, 0
    has_bias = key_bias is not None
    if has_bias:
        kb = key_bias
        kb_strides = (kb.stride(0), kb.stride(1) if kb.shape[1] > 1 else 0, kb.stride(2))
    else:
        kb, kb_strides = dummy, (0, 0, 0)
    flags = dict(HAS_QPOS=q_pos is not None, HAS_SEQLENS=seqlens_k is not None, CAUSAL=causal,
                 IS_ESS=response_start is not None, HAS_BIAS=has_bias)
    block_d = max(16, triton.next_power_of_2(D))
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    interp_bf16 = dev.type != "cuda" and q.dtype == torch.bfloat16
    (m1, n1), (m2, n2), warps, stages = _bwd_config(D, q.dtype, dev)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, DOT_PREC=dot_prec, INTERP_BF16=interp_bf16,
                  num_warps=warps, num_stages=stages, **flags)
    pdp = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev)
    _ess_attn_bwd_dq[(triton.cdiv(Lq, m2), B * Hq)](
        q, k, v, do, lse, delta, dq, pdp, q_pos_t, seqlens_t, rstart, cw, kb,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *kb_strides,
        Lq, Lk, Hq, G, W, scale * _LOG2E, scale, BLOCK_M=m2, BLOCK_N=n2, **common)
    # In fp16/bf16, rowsum(dO * O) reads O rounded to the input dtype: an error per row that
    # every ds_ij of the row shares, so dkey_bias (a sum of ds over rows and heads) and dk pile
    # it up (up to 3.3x eager attention's dkey_bias error, issue 26). The dq pass has p and dp
    # of every key of its rows anyway, so it hands dk/dv delta = sum_j p_ij dp_ij in fp32 at
    # the cost of one multiply-add per score; dq itself keeps the O-based delta (it needs delta
    # before its loop), as FlashAttention-2 does, and stays within the 2x rule with it.
    if dlse is not None:
        pdp -= dlse
    _ess_attn_bwd_dkdv[(triton.cdiv(Lk, n1), B * Hkv)](
        q, k, v, do, lse, pdp, dk, dv, dkb if bias_grad else dummy, q_pos_t, seqlens_t,
        rstart, cw, kb, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        *dv.stride(), *kb_strides, Lq, Lk, Hq, Hkv, G, W, scale * _LOG2E, scale,
        BIAS_GRAD=bias_grad, BLOCK_M=m1, BLOCK_N=n1, **common)
    if bias_grad and key_bias.shape[1] == 1:
        dkb = dkb.sum(1, keepdim=True)
    return dq, dk, dv, dkb
