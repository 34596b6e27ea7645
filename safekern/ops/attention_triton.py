"""ESS attention's Triton forward (docs/DESIGN.md §3): jit kernels -> launcher -> custom ops.

A FlashAttention-2-style forward (online softmax over key tiles, no (Lq, Lk) matrix): a prefill
kernel that skips the tiles the mask empties and masks only the boundary tiles, a separate pass
for the [CLS] row over key 0 and its windows, and a split-KV (flash-decoding) kernel plus a
combine kernel for decode steps (Lq <= 2). Inputs that require grad go through the
``safekern::ess_attention_fwd`` custom op, whose backward is the FlashAttention-2-style kernels
of ``_attention_bwd.py`` (recomputed from the saved LSE). The row and visibility helpers both
directions share live in ``_attention_common.py``; ``attention.py`` validates, dispatches and
registers ``_triton_backend`` as the ``triton`` backend of ``ess_attention``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import dispatch
from ._attention_bwd import attention_bwd_triton
from ._attention_common import _LOG2E

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; can_run reports the missing package
    triton = None

# --------------------------------------------------------------------------------------------
# Triton kernels (the visibility rules: ``_attention_common.py``)
# --------------------------------------------------------------------------------------------
if triton is not None:
    from ._attention_common import (_cls_key_end, _cls_keys, _mma, _narrow, _row_key_end,
                                    _row_kinds, _row_positions)

    @triton.jit
    def _attn_tile(acc, l_i, m_i, q, pos, normal, is_cls, start_n, seqlen, rs,
                   k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                   kb_base, stride_kbn, cw_ptr, W, qk_scale, offs_n0, offs_d,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, IS_ESS: tl.constexpr,
                   HAS_CLS: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_2D: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                   INTERP_BF16: tl.constexpr):
        """One key tile of the online softmax. ``MASKED=False`` tiles are fully visible to
        every ``normal`` row (rows that are not are discarded by the caller), so they skip
        the mask and the key bound."""
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED or BLOCK_D != HEAD_DIM:
            kv_mask = (offs_n < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = _mma(q, tl.trans(k), DOT_PREC, INTERP_BF16) * qk_scale
        if HAS_BIAS:
            if BIAS_2D:
                kb = tl.load(kb_base[:, None] + offs_n[None, :] * stride_kbn,
                             mask=(offs_n < seqlen)[None, :], other=0.0)
            else:
                kb = tl.load(kb_base + offs_n * stride_kbn, mask=offs_n < seqlen,
                             other=0.0)[None, :]
            qk += kb * 1.4426950408889634
        if MASKED:
            j = offs_n[None, :]
            p_ = pos[:, None]
            vis = normal[:, None] & (j < seqlen)
            if CAUSAL:
                vis = vis & (j <= p_)
            if IS_ESS:
                vis = vis & ((j > 0) | (p_ >= rs))
                if HAS_CLS:
                    cls_vis = _cls_keys(offs_n, cw_ptr, W) & (offs_n < seqlen)
                    vis = vis | (is_cls[:, None] & cls_vis[None, :])
            qk = tl.where(vis, qk, float("-inf"))
            # p = 0 at a hidden key times a NaN/inf value there would be NaN: the values are
            # read finite, and a non-finite value at a key a row sees makes its element NaN.
            v_bad = (v != v) | (tl.abs(v) == float("inf"))
            v = tl.where(v_bad, 0.0, v)
            hit = _mma(vis.to(v.dtype), v_bad.to(v.dtype), DOT_PREC, INTERP_BF16) > 0
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # rows that have seen nothing yet keep m = -inf; subtract 0 instead to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mma(_narrow(p, v.dtype, INTERP_BF16), v, DOT_PREC,
                                           INTERP_BF16)
        if MASKED:
            acc = tl.where(hit, float("nan"), acc)
        return acc, l_i, m_new

    @triton.jit
    def _finish(acc, l_i, m_i, keep):
        """``(o, lse)`` of finished rows; rows not kept or that saw no key give (0, -inf).
        A NaN logit makes ``l_i`` NaN (!= 0), so the row stays NaN; a non-finite value that
        reached ``acc`` through an unmasked tile gives NaN too (inf -> NaN), as the reference."""
        ok = keep & (l_i != 0)
        o = tl.where(ok[:, None], acc / tl.where(ok, l_i, 1.0)[:, None], 0.0)
        o = tl.where(tl.abs(o) == float("inf"), float("nan"), o)
        lse = tl.where(ok, (m_i + tl.math.log2(tl.where(ok, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        return o, lse

    @triton.jit
    def _ess_attn_fwd(
        Q, K, V, O, LSE, QPOS, SEQLENS, RSTART, CW, KB,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_kbb, stride_kbh, stride_kbn,
        Lq, Lk, Hq, G, W, qk_scale,
        HAS_QPOS: tl.constexpr, HAS_SEQLENS: tl.constexpr,
        CAUSAL: tl.constexpr, IS_ESS: tl.constexpr, HAS_BIAS: tl.constexpr,
        STORE_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
        INTERP_BF16: tl.constexpr,
    ):
        """Prefill / chunked prefill: one program per (query tile, batch * query head)."""
        # causal work grows with the tile index: launch the longest tiles first
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
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
        q_ptrs = (Q + b * stride_qb + offs_m[:, None] * stride_qm + h * stride_qh
                  + offs_d[None, :] * stride_qd)
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        k_base = K + b * stride_kb + hkv * stride_kh
        v_base = V + b * stride_vb + hkv * stride_vh
        kb_base = KB + b * stride_kbb + h * stride_kbh
        cw_ptr = CW + b * 2 * W

        # Key range of the normal rows: [0, hi) is touched at all, [0, full_hi) is visible to
        # every normal row, so only the tiles around the diagonal (and, in ESS mode, the tile
        # holding key 0 while some row is still in the prompt) need the per-element mask.
        row_hi = _row_key_end(pos, seqlen, CAUSAL)
        hi = tl.max(tl.where(normal, row_hi, 0))
        full_hi = tl.minimum(tl.min(tl.where(normal, row_hi, 2147483647)), hi)
        full_end = (full_hi // BLOCK_N) * BLOCK_N
        first_masked = False
        if IS_ESS:
            first_masked = (tl.min(tl.where(normal, pos, 2147483647)) < rs) & (full_end > 0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        start_full = 0
        if first_masked:
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q, pos, normal, is_cls, 0, seqlen, rs,
                k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                kb_base, stride_kbn, cw_ptr, W, qk_scale, offs_n0, offs_d,
                True, CAUSAL, IS_ESS, False, HAS_BIAS, False, HEAD_DIM, BLOCK_D, DOT_PREC,
                INTERP_BF16)
            start_full = BLOCK_N
        for start_n in range(start_full, full_end, BLOCK_N):
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q, pos, normal, is_cls, start_n, seqlen, rs,
                k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                kb_base, stride_kbn, cw_ptr, W, qk_scale, offs_n0, offs_d,
                False, CAUSAL, IS_ESS, False, HAS_BIAS, False, HEAD_DIM, BLOCK_D, DOT_PREC,
                INTERP_BF16)
        for start_n in range(full_end, hi, BLOCK_N):
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q, pos, normal, is_cls, start_n, seqlen, rs,
                k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                kb_base, stride_kbn, cw_ptr, W, qk_scale, offs_n0, offs_d,
                True, CAUSAL, IS_ESS, False, HAS_BIAS, False, HEAD_DIM, BLOCK_D, DOT_PREC,
                INTERP_BF16)
        o, lse = _finish(acc, l_i, m_i, normal)

        o_ptrs = (O + b * stride_ob + offs_m[:, None] * stride_om + h * stride_oh
                  + offs_d[None, :] * stride_od)
        d_ok = (offs_d < HEAD_DIM)[None, :]
        lse_ptrs = LSE + (b * Hq + h) * Lq + offs_m
        # [CLS] rows are written by their own pass below; everything else (normal and padding
        # rows) is written here.
        keep_rows = row_ok & ~is_cls
        tl.store(o_ptrs, _narrow(o, O.dtype.element_ty, INTERP_BF16),
                 mask=keep_rows[:, None] & d_ok)
        if STORE_LSE:
            tl.store(lse_ptrs, lse, mask=keep_rows)

        if IS_ESS:
            if tl.max(is_cls.to(tl.int32)) > 0:
                # The [CLS] row's own pass: key 0 plus its windows, ignoring causality. It
                # visits only tiles that hold one of its keys, so normal rows never scan them.
                cls_hi = _cls_key_end(cw_ptr, W, seqlen)
                m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_i = tl.zeros([BLOCK_M], tl.float32)
                acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                none = pos < -1
                for start_n in range(0, cls_hi, BLOCK_N):
                    hit = start_n == 0
                    for w in range(W):
                        ws = tl.load(cw_ptr + 2 * w)
                        we = tl.minimum(tl.load(cw_ptr + 2 * w + 1), seqlen)
                        hit = hit | ((ws < we) & (ws < start_n + BLOCK_N) & (we > start_n))
                    if hit:
                        acc, l_i, m_i = _attn_tile(
                            acc, l_i, m_i, q, pos, none, is_cls, start_n, seqlen, rs,
                            k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                            kb_base, stride_kbn, cw_ptr, W, qk_scale, offs_n0, offs_d,
                            True, CAUSAL, IS_ESS, True, HAS_BIAS, False, HEAD_DIM, BLOCK_D,
                            DOT_PREC, INTERP_BF16)
                o, lse = _finish(acc, l_i, m_i, is_cls)
                tl.store(o_ptrs, _narrow(o, O.dtype.element_ty, INTERP_BF16),
                         mask=(row_ok & is_cls)[:, None] & d_ok)
                if STORE_LSE:
                    tl.store(lse_ptrs, lse, mask=row_ok & is_cls)

    @triton.jit
    def _ess_attn_decode_split(
        Q, K, V, OPART, LPART, QPOS, SEQLENS, RSTART, CW, KB,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_kbb, stride_kbh, stride_kbn,
        Lq, Lk, Hq, Hkv, G, W, qk_scale, split_len, num_splits,
        HAS_QPOS: tl.constexpr, HAS_SEQLENS: tl.constexpr,
        CAUSAL: tl.constexpr, IS_ESS: tl.constexpr, HAS_BIAS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
        INTERP_BF16: tl.constexpr,
    ):
        """Decode (flash-decoding): one program per (KV split, batch * KV head). Its rows are
        the G query heads x Lq rows that share the KV head, so each K/V tile is read once."""
        split = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hkv = pid_bh % Hkv
        offs_i = tl.arange(0, BLOCK_M)
        row_ok = offs_i < G * Lq
        # clamp so that padded rows still form in-bounds addresses; they are masked by pos
        g = tl.minimum(offs_i // Lq, G - 1)
        r = offs_i % Lq
        h = hkv * G + g
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        pos, seqlen = _row_positions(QPOS, SEQLENS, b, r, row_ok, Lq, Lk, HAS_QPOS,
                                     HAS_SEQLENS)
        rs, normal, is_cls = _row_kinds(RSTART, b, pos, IS_ESS)
        q = tl.load(Q + b * stride_qb + r[:, None] * stride_qm + h[:, None] * stride_qh
                    + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        k_base = K + b * stride_kb + hkv * stride_kh
        v_base = V + b * stride_vb + hkv * stride_vh
        kb_base = KB + b * stride_kbb + h * stride_kbh
        cw_ptr = CW + b * 2 * W

        row_hi = _row_key_end(pos, seqlen, CAUSAL)
        hi = tl.max(tl.where(normal, row_hi, 0))
        if IS_ESS:
            if tl.max(is_cls.to(tl.int32)) > 0:
                hi = tl.maximum(hi, _cls_key_end(cw_ptr, W, seqlen))
        lo = split * split_len
        end = tl.minimum(lo + split_len, hi)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(lo, end, BLOCK_N):
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q, pos, normal, is_cls, start_n, seqlen, rs,
                k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                kb_base, stride_kbn, cw_ptr, W, qk_scale, offs_n0, offs_d,
                True, CAUSAL, IS_ESS, IS_ESS, HAS_BIAS, True, HEAD_DIM, BLOCK_D, DOT_PREC,
                INTERP_BF16)
        o, lse = _finish(acc, l_i, m_i, normal | is_cls)
        # partials: (B, Hq, Lq, num_splits, D) and (B, Hq, Lq, num_splits), always written
        row = (b * Hq + h) * Lq + r
        tl.store(OPART + (row * num_splits + split)[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
        tl.store(LPART + row * num_splits + split, lse, mask=row_ok)

    @triton.jit
    def _ess_attn_decode_combine(
        OPART, LPART, O, LSE, Lq, Hq, num_splits,
        stride_ob, stride_om, stride_oh, stride_od,
        STORE_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """Merge the split partials of one output row with their log-sum-exps."""
        row = tl.program_id(0)  # (b * Hq + h) * Lq + r
        r = row % Lq
        bh = row // Lq
        b = bh // Hq
        h = bh % Hq
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < num_splits
        d_ok = offs_d < HEAD_DIM
        lse = tl.load(LPART + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp(lse - m_safe)
        total = tl.sum(w, 0)
        o = tl.load(OPART + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        o = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(O + b * stride_ob + r * stride_om + h * stride_oh + offs_d * stride_od,
                 _narrow(o, O.dtype.element_ty, INTERP_BF16), mask=d_ok)
        if STORE_LSE:  # a NaN total (a NaN row) keeps a NaN lse
            safe_total = tl.where(total != 0, total, 1.0)
            tl.store(LSE + row, tl.where(total != 0, m_safe + tl.log(safe_total), float("-inf")))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
# the decode kernel keeps G * Lq rows of one KV head in a single program
_DECODE_MAX_ROWS = 64


def _prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device):
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``. The interpreter gets small tiles so the
    odd test shapes cross several tiles; the GPU values follow the Triton tutorial's H100
    choices (not autotuned: a lookup keeps the first call cheap and CUDA-graph friendly)."""
    if device.type != "cuda":
        return 32, 32, 4, 1
    wide = dtype == torch.float32
    if head_dim <= 64:
        return (64, 64, 4, 3) if wide else (128, 64, 4, 3)
    if head_dim <= 128:
        return (64, 32, 4, 3) if wide else (128, 64, 8, 3)
    return (32, 32, 4, 2) if wide else (64, 32, 4, 2)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_splits(B: int, Hkv: int, Lk: int, block_n: int, device: torch.device):
    """``(num_splits, split_len)``: enough (batch, KV head, split) programs to fill the GPU
    about twice, each split a whole number of key tiles."""
    tiles = max(1, triton.cdiv(Lk, block_n))
    splits = max(1, min(tiles, triton.cdiv(2 * _num_sms(device), B * Hkv)))
    split_len = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(max(Lk, 1), split_len), split_len


def _attention_triton(q, k, v, *, softmax_scale=None, causal=True, q_pos=None, seqlens_k=None,
                      response_start=None, cls_windows=None, key_bias=None, return_lse=False,
                      out=None, lse_out=None, path="auto", num_splits=None):
    """Launch the Triton kernels; inputs are assumed validated by ``ess_attention``.

    Internal arguments (tests, benchmarks, the engine): ``out`` / ``lse_out`` preallocated
    outputs (``(B, Lq, Hq, D)`` in ``q.dtype``, ``(B, Hq, Lq)`` fp32); ``path`` "auto" |
    "prefill" | "decode" (auto takes split-KV decode when ``Lq <= 2``); ``num_splits``
    overrides the decode split count.
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dev = q.device
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    o = torch.empty(B, Lq, Hq, D, dtype=q.dtype, device=dev) if out is None else out
    # absent optional tensors: the kernels never read the pointer they get (a constexpr says so)
    dummy = o

    def i32(x):
        return dummy if x is None else x.to(torch.int32).contiguous()

    seqlens_t, q_pos_t, rstart = i32(seqlens_k), i32(q_pos), i32(response_start)
    is_ess = response_start is not None
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
    if return_lse:
        lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev) if lse_out is None \
            else lse_out
    else:
        lse = dummy
    flags = dict(HAS_QPOS=q_pos is not None, HAS_SEQLENS=seqlens_k is not None, CAUSAL=causal,
                 IS_ESS=is_ess, HAS_BIAS=has_bias)
    if B * Lq * Hq == 0:
        o.zero_()
        if return_lse:
            lse.fill_(float("-inf"))
        return (o, lse) if return_lse else o
    block_d = max(16, triton.next_power_of_2(D))
    # fp32 inputs get full-precision dots (tf32 would miss the reference tolerance)
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    interp_bf16 = dev.type != "cuda" and q.dtype == torch.bfloat16
    qk_scale = scale * _LOG2E
    use_decode = path == "decode" or (path == "auto" and Lq <= 2 and G * Lq <= _DECODE_MAX_ROWS)

    if use_decode:
        block_m = max(16, triton.next_power_of_2(G * Lq))
        block_n = 32 if dev.type != "cuda" else (64 if D <= 128 else 32)
        splits, split_len = _decode_splits(B, Hkv, Lk, block_n, dev)
        if num_splits is not None:
            split_len = triton.cdiv(triton.cdiv(max(Lk, 1), num_splits), block_n) * block_n
            splits = triton.cdiv(max(Lk, 1), split_len)
        o_part = torch.empty(B, Hq, Lq, splits, D, dtype=torch.float32, device=dev)
        l_part = torch.empty(B, Hq, Lq, splits, dtype=torch.float32, device=dev)
        _ess_attn_decode_split[(splits, B * Hkv)](
            q, k, v, o_part, l_part, q_pos_t, seqlens_t, rstart, cw, kb,
            *q.stride(), *k.stride(), *v.stride(), *kb_strides,
            Lq, Lk, Hq, Hkv, G, W, qk_scale, split_len, splits, **flags,
            HEAD_DIM=D, BLOCK_D=block_d,
            BLOCK_M=block_m, BLOCK_N=block_n, DOT_PREC=dot_prec, INTERP_BF16=interp_bf16,
            num_warps=4, num_stages=(2 if q.dtype == torch.float32 else 3) if dev.type == "cuda"
            else 1)
        _ess_attn_decode_combine[(B * Hq * Lq,)](
            o_part, l_part, o, lse, Lq, Hq, splits, *o.stride(),
            STORE_LSE=return_lse, HEAD_DIM=D, BLOCK_D=block_d,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), INTERP_BF16=interp_bf16,
            num_warps=4)
    else:
        block_m, block_n, warps, stages = _prefill_config(D, q.dtype, dev)
        _ess_attn_fwd[(triton.cdiv(Lq, block_m), B * Hq)](
            q, k, v, o, lse, q_pos_t, seqlens_t, rstart, cw, kb,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *kb_strides,
            Lq, Lk, Hq, G, W, qk_scale, **flags, STORE_LSE=return_lse,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PREC=dot_prec,
            INTERP_BF16=interp_bf16,
            num_warps=warps, num_stages=stages)
    return (o, lse) if return_lse else o


# --------------------------------------------------------------------------------------------
# Autograd: custom ops (torch.compile traces them without a graph break)
# --------------------------------------------------------------------------------------------
# Training calls go through ``safekern::ess_attention_fwd`` (o and the fp32 LSE the backward
# recomputes from) and ``safekern::ess_attention_bwd`` (the kernels of ``_attention_bwd.py``);
# calls without grad take the launcher directly (no dispatcher overhead in the decode loop).

@torch.library.custom_op("safekern::ess_attention_fwd", mutates_args=())
def _ess_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_pos: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor],
                          response_start: Optional[torch.Tensor],
                          cls_windows: Optional[torch.Tensor], key_bias: Optional[torch.Tensor],
                          softmax_scale: float, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _attention_triton(q, k, v, softmax_scale=softmax_scale, causal=causal, q_pos=q_pos,
                             seqlens_k=seqlens_k, response_start=response_start,
                             cls_windows=cls_windows, key_bias=key_bias, return_lse=True)


@_ess_attention_fwd_op.register_fake
def _ess_attention_fwd_fake(q, k, v, q_pos, seqlens_k, response_start, cls_windows, key_bias,
                            softmax_scale, causal):
    B, Lq, Hq, D = q.shape
    return q.new_empty(B, Lq, Hq, D), q.new_empty(B, Hq, Lq, dtype=torch.float32)


@torch.library.custom_op("safekern::ess_attention_bwd", mutates_args=())
def _ess_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor,
                          q_pos: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor],
                          response_start: Optional[torch.Tensor],
                          cls_windows: Optional[torch.Tensor], key_bias: Optional[torch.Tensor],
                          softmax_scale: float, causal: bool, bias_grad: bool
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dkb = attention_bwd_triton(
        do, q, k, v, o, lse, dlse, softmax_scale=softmax_scale, causal=causal, q_pos=q_pos,
        seqlens_k=seqlens_k, response_start=response_start, cls_windows=cls_windows,
        key_bias=key_bias, bias_grad=bias_grad)
    # a custom op returns tensors only: an empty one stands for "no key_bias gradient"
    return dq, dk, dv, dkb if dkb is not None else q.new_empty(0, dtype=torch.float32)


@_ess_attention_bwd_op.register_fake
def _ess_attention_bwd_fake(do, q, k, v, o, lse, dlse, q_pos, seqlens_k, response_start,
                            cls_windows, key_bias, softmax_scale, causal, bias_grad):
    # contiguous, as the launcher allocates them (whatever the strides of q, k, v)
    dkb = key_bias.new_empty(key_bias.shape) if bias_grad else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dkb


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, q_pos, seqlens_k, response_start, cls_windows, key_bias, softmax_scale, causal = \
        inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, q_pos, seqlens_k, response_start, cls_windows,
                          key_bias)
    ctx.softmax_scale, ctx.causal = softmax_scale, causal


def _fwd_backward(ctx, do, dlse):
    q, k, v, o, lse, q_pos, seqlens_k, response_start, cls_windows, key_bias = \
        ctx.saved_tensors
    bias_grad = key_bias is not None and ctx.needs_input_grad[7]
    dq, dk, dv, dkb = _ess_attention_bwd_op(
        do, q, k, v, o, lse, dlse, q_pos, seqlens_k, response_start, cls_windows, key_bias,
        ctx.softmax_scale, ctx.causal, bias_grad)
    return dq, dk, dv, None, None, None, None, dkb if bias_grad else None, None, None


_ess_attention_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _triton_backend(q, k, v, *, softmax_scale, causal, q_pos, seqlens_k, response_start,
                    cls_windows, key_bias, return_lse):
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, key_bias))
    if not needs_grad:
        return _attention_triton(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                 q_pos=q_pos, seqlens_k=seqlens_k,
                                 response_start=response_start, cls_windows=cls_windows,
                                 key_bias=key_bias, return_lse=return_lse)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    o, lse = _ess_attention_fwd_op(q, k, v, q_pos, seqlens_k, response_start, cls_windows,
                                   key_bias, scale, causal)
    return (o, lse) if return_lse else o


def _triton_can_run(*, device, dtype, head_dim, **ctx):
    why = dispatch.triton_can_run(device, **ctx)
    if why is not None:
        return why
    if dtype not in _SUPPORTED:
        return f"dtype {dtype} is not supported by the Triton kernels (fp16, bf16, fp32)"
    if head_dim > _MAX_HEAD_DIM:
        return f"head dim {head_dim} > {_MAX_HEAD_DIM} is not supported by the Triton kernels"
    return None
