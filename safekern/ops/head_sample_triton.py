"""The Triton backend of ``head_sample`` (docs/DESIGN.md §5): jit kernels -> launcher.

``head_sample_triton`` launches the LM-head / partial-maximum kernel and the finalize kernel
(safety score, ESS state update, filters, draw) described below; ``raise_non_finite`` reads
the flag buffer the Triton and CUDA kernels fill. ``head_sample.py`` validates, dispatches and
registers ``head_sample_triton`` as the ``triton`` backend.
"""
from __future__ import annotations

import struct
from typing import Tuple

import torch

from .._checks import value_checks_enabled
from ..reference.sampling import Logprobs, _raise_non_finite
from ..spec import SamplingParams
from . import dispatch

# --------------------------------------------------------------------------------------------
# Triton backend. Two launches per step (three when randomness comes from a torch.Generator):
#
#   1. _lm_head_partial_kernel, grid (cdiv(B, BLOCK_B), cdiv(V, BLOCK_V)): each program computes
#      a (BLOCK_B, BLOCK_V) tile of logits = h_tok @ W^T (the LM head is folded in: logits never
#      reach memory for greedy/temperature rows) and keeps, per row, the tile's maximum of
#        greedy rows:       logit
#        temperature rows:  logit / T + Gumbel noise     (Gumbel-max = a draw from softmax(logit/T))
#        filtered rows:     logit / T                     (the row max, for the second launch)
#      Filtered rows (top-k / top-p / min-p) also store their raw logits.
#      Batch blocks are the fastest grid axis so the programs sharing a weight tile run together
#      and the LM head is read from HBM about once.
#   2. _finalize_kernel, grid (cdiv(B, BLOCK_R),) with BLOCK_R = 1 on a GPU: reduces the
#      per-tile maxima (ties -> lowest index, as torch.argmax), computes the safety score,
#      applies update_state + forced_tokens to the state in place, and for filtered rows runs
#      temperature -> top-k -> top-p -> min-p -> sample over the stored logits. The top-k and
#      top-p thresholds are searched over the order-preserving int32 keys of the float logits
#      with 16 pivots per pass (<= 8 passes each: exact, no sort, no extra memory); min-p is a
#      closed form; the draw is Gumbel-max over the surviving tokens.
#   The (B, V) logits buffer exists only when a filter can be on; greedy / temperature batches
#   touch (B, cdiv(V, BLOCK_V)) partial maxima only.
#   The reduction is a tiny second launch rather than a last-block-done step inside launch 1:
#   no inter-CTA atomics, fences or counters to reset between CUDA-graph replays, and the ESS
#   decision (which overrides the token) runs once per row, not once per vocab tile.
#
# Randomness: counter-based Philox keyed by (seed, offset), counters (token, row): the same
# (seed, offset) gives the same tokens. Draws are equal to the reference's in distribution, not
# token for token (the reference uses torch.multinomial).
# NaN/inf: validated calls reject non-finite inputs up front; weights are checked once per
# version, so a weight changed through .data later is caught by the kernels themselves: a tile
# with a NaN/inf logit reports a NaN maximum, and the finalize ORs per-row flags (non-finite
# logits, NaN score of an evaluating row) into a (B,) int32 buffer. Cost: one elementwise test
# per logit tile, no extra memory pass. head_sample reads the buffer after the launch and raises
# like the reference; the engine passes its own buffer and reads it when it syncs anyway. With
# value checks off nothing is read on the host: tokens stay inside [0, V), and a NaN score is a
# benign verdict (NaN >= threshold is false).
# --------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; can_run reports the missing package
    triton = None

# cascade: 4; cascade with annealing's points as its net: 5 (the annealing arithmetic)
_SCHEDULE_IDS = {"first": 0, "each": 1, "periodic": 2, "annealing": 3, "cascade": 4}
_POLICY_IDS = {"low": 0, "medium": 1, "high": 2}

if triton is not None:

    @triton.jit
    def _row_param(ptr, scalar, rows, mask, PER_ROW: tl.constexpr, DTYPE: tl.constexpr):
        """A sampling parameter for ``rows``: from a (B,) tensor or one scalar for all rows."""
        if PER_ROW:
            return tl.load(ptr + rows, mask=mask, other=0).to(DTYPE)
        else:
            return tl.zeros(rows.shape, DTYPE) + scalar

    @triton.jit
    def _is_filtered(temp, top_k, top_p, min_p, V):
        return (temp > 0) & (((top_k > 0) & (top_k < V)) | (top_p < 1.0) | (min_p > 0.0))

    @triton.jit
    def _gumbel(seed, off_lo, off_hi, cols, rows):
        """Gumbel(0, 1) noise for (row, token) from Philox counters (token, row, offset)."""
        c0 = (cols + rows * 0).to(tl.uint32)  # both counters at the full broadcast shape
        c1 = (rows + cols * 0).to(tl.uint32)
        r, _, _, _ = tl.philox(seed, c0, c1, off_lo.to(tl.uint32), off_hi.to(tl.uint32))
        u = tl.uint_to_uniform_float(r)  # [0, 1): u = 0 gives -inf, which is never the max
        return -tl.log(-tl.log(u))

    @triton.jit
    def _rng(seed_ptr, seed, offset, SEED_FROM_PTR: tl.constexpr):
        if SEED_FROM_PTR:
            seed = tl.load(seed_ptr)
            offset = tl.load(seed_ptr + 1)
        # to_tensor: an int argument equal to 1 may arrive as a constexpr
        seed = tl.to_tensor(seed).to(tl.int64)
        offset = tl.to_tensor(offset).to(tl.int64)
        return seed, offset & 0xFFFFFFFF, (offset >> 32) & 0xFFFFFFFF

    @triton.jit
    def _lm_head_partial_kernel(
        h_ptr, w_ptr, part_val_ptr, part_idx_ptr, logits_ptr, part_m_ptr, part_s_ptr,
        temp_ptr, temp_val, topk_ptr, topk_val, topp_ptr, topp_val, minp_ptr, minp_val,
        seed_ptr, seed_val, offset_val,
        B, V, Dm, n_tiles, stride_hb, stride_wv,
        TEMP_PER_ROW: tl.constexpr, TOPK_PER_ROW: tl.constexpr, TOPP_PER_ROW: tl.constexpr,
        MINP_PER_ROW: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
        NOISE: tl.constexpr, FILTERS: tl.constexpr, DOT_FP32: tl.constexpr,
        LOGPROBS: tl.constexpr, STORE_LOGITS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < B
        col_ok = cols < V
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hb + offs_k[None, :]
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wv + offs_k[None, :]
        acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, Dm, BLOCK_K):
            k_ok = (k0 + offs_k) < Dm
            h = tl.load(h_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_FP32:  # bf16 x bf16 is exact in fp32, so this only changes the instruction
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")

        temp = _row_param(temp_ptr, temp_val, rows, row_ok, TEMP_PER_ROW, tl.float32)
        inv_t = tl.where(temp > 0, 1.0 / tl.where(temp > 0, temp, 1.0), 1.0)
        z = acc * inv_t[:, None]
        if LOGPROBS:  # the tile's share of logsumexp(logit / T), before noise and filters
            zl = tl.where(col_ok[None, :], z, float("-inf"))
            m_t = tl.max(zl, axis=1)
            s_t = tl.sum(tl.exp(zl - m_t[:, None]), axis=1)
            t_out = rows.to(tl.int64) * n_tiles + pid_v
            tl.store(part_m_ptr + t_out, m_t, mask=row_ok)
            tl.store(part_s_ptr + t_out, s_t, mask=row_ok)
        if STORE_LOGITS:  # every row: top-k logprobs read them (filtered rows too)
            tl.store(logits_ptr + rows[:, None].to(tl.int64) * V + cols[None, :], acc,
                     mask=row_ok[:, None] & col_ok[None, :])
        if NOISE:
            seed, off_lo, off_hi = _rng(seed_ptr, seed_val, offset_val, SEED_FROM_PTR)
            noisy = temp > 0
            if FILTERS:
                top_k = _row_param(topk_ptr, topk_val, rows, row_ok, TOPK_PER_ROW, tl.int64)
                top_p = _row_param(topp_ptr, topp_val, rows, row_ok, TOPP_PER_ROW, tl.float32)
                min_p = _row_param(minp_ptr, minp_val, rows, row_ok, MINP_PER_ROW, tl.float32)
                filtered = _is_filtered(temp, top_k, top_p, min_p, V)
                noisy = noisy & ~filtered
                if not STORE_LOGITS:
                    tl.store(logits_ptr + rows[:, None].to(tl.int64) * V + cols[None, :], acc,
                             mask=(row_ok & filtered)[:, None] & col_ok[None, :])
            g = _gumbel(seed, off_lo, off_hi, cols[None, :], rows[:, None])
            z = tl.where(noisy[:, None], z + g, z)
        z = tl.where(col_ok[None, :] & (z == z), z, float("-inf"))
        best, arg = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # A tile with a NaN/inf logit reports NaN as its maximum (the finalize flags the row).
        bad = ((acc != acc) | (tl.abs(acc) == float("inf"))) & col_ok[None, :]
        best = tl.where(tl.max(bad.to(tl.int32), axis=1) > 0, float("nan"), best)
        out = rows.to(tl.int64) * n_tiles + pid_v
        tl.store(part_val_ptr + out, best, mask=row_ok)
        tl.store(part_idx_ptr + out, pid_v * BLOCK_V + arg, mask=row_ok)

    @triton.jit
    def _sort_key(x):
        """Order-preserving int32 key of a float32 (-0.0 folded onto +0.0), widened to int64."""
        bits = (x + 0.0).to(tl.int32, bitcast=True)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)

    @triton.jit
    def _load_scaled(x_ptr, rows, row_ok, offs, V, inv_t):
        ok = row_ok[:, None] & (offs < V)[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * V + offs[None, :], mask=ok,
                    other=float("-inf"))
        # NaN logits (a flagged row) are never kept: the draw stays inside [0, V)
        x = tl.where(x == x, x, float("-inf"))
        return x * inv_t[:, None], ok

    @triton.jit
    def _count_at_least(x_ptr, rows, row_ok, V, inv_t, piv, BLOCK_F: tl.constexpr):
        """(R, NPIV): per row and pivot key, how many tokens have key >= pivot."""
        cnt = tl.zeros((piv.shape[0], BLOCK_F, piv.shape[1]), tl.int32)
        for v0 in range(0, V, BLOCK_F):
            x, ok = _load_scaled(x_ptr, rows, row_ok, v0 + tl.arange(0, BLOCK_F), V, inv_t)
            hit = (_sort_key(x)[:, :, None] >= piv[:, None, :]) & ok[:, :, None]
            cnt += hit.to(tl.int32)
        return tl.sum(cnt, axis=1)

    @triton.jit
    def _mass_above(x_ptr, rows, row_ok, V, inv_t, row_max, key_keep, piv,
                    BLOCK_F: tl.constexpr):
        """(R, NPIV): per row and pivot key, the unnormalised softmax mass of the tokens with
        key > pivot among those with key >= key_keep."""
        acc = tl.zeros((piv.shape[0], BLOCK_F, piv.shape[1]), tl.float32)
        for v0 in range(0, V, BLOCK_F):
            x, ok = _load_scaled(x_ptr, rows, row_ok, v0 + tl.arange(0, BLOCK_F), V, inv_t)
            key = _sort_key(x)
            e = tl.where(ok & (key >= key_keep[:, None]), tl.exp(x - row_max[:, None]), 0.0)
            acc += tl.where(key[:, :, None] > piv[:, None, :], e[:, :, None], 0.0)
        return tl.sum(acc, axis=1)

    @triton.jit
    def _filter_sample(x_ptr, rows, row_ok, V, inv_t, row_max, k_on, top_k, p_on, top_p, min_p,
                       seed, off_lo, off_hi, NPIV: tl.constexpr, BLOCK_F: tl.constexpr):
        """top-k -> top-p -> min-p over rows of logits * inv_t, then a Gumbel-max draw.

        Thresholds are searched over the int32 keys with NPIV pivots per pass over a row
        (log_NPIV(2^32) passes, 8 for NPIV = 16): exact, no sort, no extra memory. A row whose
        filter is off starts with lo == hi and does not move.
        """
        key_hi = _sort_key(row_max)
        key_lo = tl.zeros_like(key_hi) - 2139095041  # _sort_key(-inf)
        j = tl.arange(0, NPIV).to(tl.int64)[None, :]
        # top-k: the k-th largest key is the largest tau with count(key >= tau) >= k.
        lo = key_lo
        hi = tl.where(k_on, key_hi, key_lo)
        while tl.max(hi - lo, axis=0) > 0:
            step = (hi - lo + NPIV - 1) // NPIV
            piv = tl.minimum(lo[:, None] + (j + 1) * step[:, None], hi[:, None])
            ok = _count_at_least(x_ptr, rows, row_ok, V, inv_t, piv, BLOCK_F) >= top_k[:, None]
            lo = tl.max(tl.where(ok, piv, lo[:, None]), axis=1)
            hi = tl.min(tl.where(ok, hi[:, None], piv - 1), axis=1)
        kth = lo
        # top-p: keep a token iff the mass strictly above it is < top_p; the kept keys are those
        # >= the smallest tau whose mass above is < top_p * Z.
        total = tl.max(_mass_above(x_ptr, rows, row_ok, V, inv_t, row_max, kth,
                                   kth[:, None] + j * 0 - 1, BLOCK_F), axis=1)
        target = top_p * total
        lo = kth
        hi = tl.where(p_on, key_hi, kth)
        while tl.max(hi - lo, axis=0) > 0:
            step = (hi - lo + NPIV - 1) // NPIV
            piv = tl.minimum(lo[:, None] + j * step[:, None], hi[:, None])
            mass = _mass_above(x_ptr, rows, row_ok, V, inv_t, row_max, kth, piv, BLOCK_F)
            ok = mass < target[:, None]
            hi = tl.min(tl.where(ok, piv, hi[:, None]), axis=1)
            lo = tl.max(tl.where(ok, lo[:, None], piv + 1), axis=1)
        cut = hi
        # min-p: p >= min_p * p_max  <=>  exp(x - max) >= min_p (the max always survives).
        best = tl.full(row_max.shape, float("-inf"), tl.float32)
        best_idx = tl.zeros(row_max.shape, tl.int64)
        for v0 in range(0, V, BLOCK_F):
            offs = v0 + tl.arange(0, BLOCK_F)
            x, ok = _load_scaled(x_ptr, rows, row_ok, offs, V, inv_t)
            keep = ok & (_sort_key(x) >= cut[:, None]) & \
                (tl.exp(x - row_max[:, None]) >= min_p[:, None])
            g = _gumbel(seed, off_lo, off_hi, offs[None, :], rows[:, None])
            z = tl.where(keep, x + g, float("-inf"))
            m, a = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
            take = m > best
            best = tl.where(take, m, best)
            best_idx = tl.where(take, (v0 + a).to(tl.int64), best_idx)
        return best_idx

    @triton.jit
    def _finalize_kernel(
        part_val_ptr, part_idx_ptr, logits_ptr, tok_ptr, p_ptr, nonfinite_ptr,
        part_m_ptr, part_s_ptr, lp_ptr, lse_ptr, h_ptr, w_ptr, stride_hb, stride_wv,
        temp_ptr, temp_val, topk_ptr, topk_val, topp_ptr, topp_val, minp_ptr, minp_val,
        seed_ptr, seed_val, offset_val,
        hcls_ptr, stride_hcls, sw_ptr, stride_sw, sb_ptr, sb_val,
        seq_len_ptr, prompt_len_ptr, mode_ptr, flags_ptr, switch_ptr, next_eval_ptr,
        interval_ptr, forced_ptr, trigger_ptr, evaluating_ptr, finished_ptr, refusal_ptr, R,
        refusal_skip, threshold, tau, period, anneal_stop, growth_bits,
        pw_ptr, pb_ptr, probe_threshold, q_ptr,
        B, V, Dm, n_tiles,
        TEMP_PER_ROW: tl.constexpr, TOPK_PER_ROW: tl.constexpr, TOPP_PER_ROW: tl.constexpr,
        MINP_PER_ROW: tl.constexpr, SEED_FROM_PTR: tl.constexpr, FILTERS: tl.constexpr,
        HAS_SAFETY: tl.constexpr, TWO_CLASS: tl.constexpr, BIAS_MODE: tl.constexpr,
        HAS_STATE: tl.constexpr, SCHEDULE: tl.constexpr, POLICY: tl.constexpr,
        LOGPROBS: tl.constexpr, HAS_PROBE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < B
        NEVER: tl.constexpr = 2147483647

        # ---- safety score: sigmoid(w . h_cls + b), read only for rows that evaluate --------
        p_unsafe = tl.full((BLOCK_R,), float("nan"), tl.float32)
        if HAS_SAFETY:
            if HAS_STATE:
                ev = tl.load(evaluating_ptr + rows, mask=row_ok, other=0) != 0
            else:
                ev = row_ok
            acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
            d_end = tl.where(ev, Dm, 0)  # rows that do not evaluate read nothing
            for d0 in range(0, Dm, BLOCK_D):
                offs = d0 + tl.arange(0, BLOCK_D)
                m = offs[None, :] < d_end[:, None]
                h = tl.load(hcls_ptr + rows[:, None].to(tl.int64) * stride_hcls + offs[None, :],
                            mask=m, other=0.0)
                w = tl.load(sw_ptr + offs, mask=offs < Dm, other=0.0).to(tl.float32)
                if TWO_CLASS:  # softmax(W h + b)[1] == sigmoid((W[1] - W[0]) . h + b[1] - b[0])
                    w = tl.load(sw_ptr + stride_sw + offs, mask=offs < Dm,
                                other=0.0).to(tl.float32) - w
                acc += h.to(tl.float32) * w[None, :]
            if BIAS_MODE == 0:
                bias = sb_val
            elif BIAS_MODE == 1:
                bias = tl.load(sb_ptr).to(tl.float32)
            else:
                bias = tl.load(sb_ptr + 1).to(tl.float32) - tl.load(sb_ptr).to(tl.float32)
            score = tl.sigmoid(tl.sum(acc, axis=1) + bias)
            p_unsafe = tl.where(ev, score, p_unsafe)
            bad_score = ev & (score != score)
        else:
            bad_score = rows < 0
        tl.store(p_ptr + rows, p_unsafe, mask=row_ok)

        # ---- ESS state: update_state + forced_tokens (reference/controller.py) -------------
        forced = rows < 0
        forced_tok = tl.zeros((BLOCK_R,), tl.int64)
        if HAS_STATE:
            ev = tl.load(evaluating_ptr + rows, mask=row_ok, other=0) != 0
            t = tl.load(seq_len_ptr + rows, mask=row_ok, other=0)
            n = t - tl.load(prompt_len_ptr + rows, mask=row_ok, other=0)
            mode = tl.load(mode_ptr + rows, mask=row_ok, other=0)
            flags = tl.load(flags_ptr + rows, mask=row_ok, other=0)
            interval = tl.load(interval_ptr + rows, mask=row_ok, other=1)
            next_eval = tl.load(next_eval_ptr + rows, mask=row_ok, other=0)
            flag = ev & (p_unsafe >= threshold)
            benign = ev & ~flag
            flags = tl.where(ev, tl.where(flag, flags + 1, 0), flags)
            trigger = flag & ((mode == 0) | (flags >= tau))
            to_suspect = flag & ~trigger & (mode != 2)
            if SCHEDULE == 0:
                nxt = n * 0 + NEVER
                grown = interval
            elif SCHEDULE == 1:
                nxt = n + 1
                grown = interval
            elif SCHEDULE == 2:
                nxt = n + period
                grown = interval
            elif SCHEDULE == 4:                          # cascade: only the probe brings it
                nxt = n * 0 + NEVER
                grown = interval
            else:                                        # annealing, cascade + its net
                growth = growth_bits.to(tl.float64, bitcast=True)
                scaled = tl.minimum(interval.to(tl.float64) * growth, NEVER // 4)
                grown = tl.minimum(tl.maximum(interval + 1, scaled.to(tl.int32)), NEVER // 4)
                nxt = n + interval
                nxt = tl.where(nxt > anneal_stop, NEVER, nxt)
            next_eval = tl.where(benign, nxt, next_eval)
            tl.store(interval_ptr + rows, tl.where(benign, grown, interval), mask=row_ok)
            switch = tl.load(switch_ptr + rows, mask=row_ok, other=0)
            tl.store(switch_ptr + rows, tl.where(to_suspect, t, tl.where(benign, -1, switch)),
                     mask=row_ok)
            mode = tl.where(benign, 1, mode)
            mode = tl.where(to_suspect, 2, mode)
            mode = tl.where(trigger, 3, mode)
            if HAS_PROBE:
                # the cascade's screening probe (reference/controller.py, escalate) on the token
                # row this launch already reads: q = sigmoid(w . h_tok + b); a BENIGN row that
                # scores >= the threshold is evaluated at the next step
                qacc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
                for d0 in range(0, Dm, BLOCK_D):
                    offs = d0 + tl.arange(0, BLOCK_D)
                    hm = row_ok[:, None] & (offs < Dm)[None, :]
                    ht = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hb + offs[None, :],
                                 mask=hm, other=0.0)
                    pw = tl.load(pw_ptr + offs, mask=offs < Dm, other=0.0).to(tl.float32)
                    qacc += ht.to(tl.float32) * pw[None, :]
                q = tl.sigmoid(tl.sum(qacc, axis=1) + tl.load(pb_ptr).to(tl.float32))
                tl.store(q_ptr + rows, q, mask=row_ok)
                up = (mode == 1) & (q >= probe_threshold)
                next_eval = tl.where(up, tl.minimum(next_eval, n + 1), next_eval)
            tl.store(next_eval_ptr + rows, next_eval, mask=row_ok)
            tl.store(mode_ptr + rows, mode, mask=row_ok)
            tl.store(flags_ptr + rows, flags, mask=row_ok)
            trig_step = tl.load(trigger_ptr + rows, mask=row_ok, other=0)
            tl.store(trigger_ptr + rows, tl.where(trigger, t, trig_step), mask=row_ok)
            fidx = tl.load(forced_ptr + rows, mask=row_ok, other=-1)
            if POLICY != 0:
                # Mid-response (n > 0) force "\n" + refusal; an empty response skips the newline.
                fidx = tl.where(trigger, tl.where(n > 0, 0, refusal_skip), fidx)
            forced = fidx >= 0
            forced_tok = tl.load(refusal_ptr + tl.minimum(tl.maximum(fidx, 0), R - 1),
                                 mask=row_ok, other=0)
            fidx = tl.where(forced, fidx + 1, fidx)
            done = forced & (fidx >= R)
            tl.store(forced_ptr + rows, tl.where(done, -1, fidx), mask=row_ok)
            if POLICY == 2:
                fin = tl.load(finished_ptr + rows, mask=row_ok, other=0) != 0
                tl.store(finished_ptr + rows, fin | done, mask=row_ok)

        # ---- token: reduce the per-tile maxima; filtered rows sample from stored logits ----
        best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        tok = tl.zeros((BLOCK_R,), tl.int64)
        bad_logits = rows < 0
        part_row = rows[:, None].to(tl.int64) * n_tiles
        for t0 in range(0, n_tiles, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            ok = row_ok[:, None] & (offs < n_tiles)[None, :]
            vals = tl.load(part_val_ptr + part_row + offs[None, :], mask=ok, other=float("-inf"))
            nan = vals != vals
            bad_logits = bad_logits | (tl.max(nan.to(tl.int32), axis=1) > 0)
            vals = tl.where(nan, float("-inf"), vals)  # never the max (as before), flagged
            idxs = tl.load(part_idx_ptr + part_row + offs[None, :], mask=ok, other=0)
            m, a = tl.max(vals, axis=1, return_indices=True, return_indices_tie_break_left=True)
            idx = tl.sum(tl.where(tl.arange(0, BLOCK_T)[None, :] == a[:, None], idxs, 0), axis=1)
            take = m > best
            best = tl.where(take, m, best)
            tok = tl.where(take, idx.to(tl.int64), tok)
        if FILTERS:
            temp = _row_param(temp_ptr, temp_val, rows, row_ok, TEMP_PER_ROW, tl.float32)
            top_k = _row_param(topk_ptr, topk_val, rows, row_ok, TOPK_PER_ROW, tl.int64)
            top_p = _row_param(topp_ptr, topp_val, rows, row_ok, TOPP_PER_ROW, tl.float32)
            min_p = _row_param(minp_ptr, minp_val, rows, row_ok, MINP_PER_ROW, tl.float32)
            filtered = row_ok & _is_filtered(temp, top_k, top_p, min_p, V)
            if tl.max(filtered.to(tl.int32), axis=0) > 0:
                seed, off_lo, off_hi = _rng(seed_ptr, seed_val, offset_val, SEED_FROM_PTR)
                inv_t = tl.where(filtered, 1.0 / tl.where(filtered, temp, 1.0), 1.0)
                k_on = filtered & (top_k > 0) & (top_k < V)
                p_on = filtered & (top_p < 1.0)
                drawn = _filter_sample(logits_ptr, rows, filtered, V, inv_t,
                                       tl.where(filtered, best, 0.0), k_on, top_k, p_on,
                                       top_p, tl.where(filtered, min_p, 0.0),
                                       seed, off_lo, off_hi, 16, BLOCK_F)
                tok = tl.where(filtered, drawn, tok)
        tok = tl.minimum(tl.maximum(tok, 0), V - 1)
        tok = tl.where(forced, forced_tok, tok)
        tl.store(tok_ptr + rows, tok, mask=row_ok)
        # Non-finite logits (bit 1) or a NaN score of an evaluating row (bit 2), accumulated
        # over calls; each row belongs to one program, so a plain load/store suffices.
        seen = tl.load(nonfinite_ptr + rows, mask=row_ok, other=0)
        tl.store(nonfinite_ptr + rows,
                 seen | tl.where(bad_logits, 1, 0) | tl.where(bad_score, 2, 0), mask=row_ok)
        if LOGPROBS:
            # logsumexp(logit / T) from the tiles' (max, sum exp) pairs, and the chosen token's
            # logit recomputed from h_tok and its LM-head row (forced tokens included).
            lse_m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
            lse_s = tl.zeros((BLOCK_R,), tl.float32)
            for t0 in range(0, n_tiles, BLOCK_T):
                offs = t0 + tl.arange(0, BLOCK_T)
                ok = row_ok[:, None] & (offs < n_tiles)[None, :]
                m_t = tl.load(part_m_ptr + part_row + offs[None, :], mask=ok, other=float("-inf"))
                s_t = tl.load(part_s_ptr + part_row + offs[None, :], mask=ok, other=0.0)
                m_new = tl.maximum(lse_m, tl.max(m_t, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                lse_s = lse_s * tl.exp(lse_m - m_safe) + \
                    tl.sum(s_t * tl.exp(m_t - m_safe[:, None]), axis=1)
                lse_m = m_new
            lse = lse_m + tl.log(tl.where(row_ok, lse_s, 1.0))
            temp = _row_param(temp_ptr, temp_val, rows, row_ok, TEMP_PER_ROW, tl.float32)
            inv_t = tl.where(temp > 0, 1.0 / tl.where(temp > 0, temp, 1.0), 1.0)
            dot = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
            for d0 in range(0, Dm, BLOCK_D):
                offs = d0 + tl.arange(0, BLOCK_D)
                m = row_ok[:, None] & (offs < Dm)[None, :]
                h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hb + offs[None, :],
                            mask=m, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + tok[:, None] * stride_wv + offs[None, :], mask=m,
                            other=0.0).to(tl.float32)
                dot += h * w
            tl.store(lp_ptr + rows, tl.sum(dot, axis=1) * inv_t - lse, mask=row_ok)
            tl.store(lse_ptr + rows, lse, mask=row_ok)


def _param_args(value, device, dtype):
    """(tensor or dummy pointer, scalar, per_row) for a scalar-or-(B,) sampling parameter."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype), 0, True
    return torch.empty(0, device=device, dtype=dtype), value, False


def _rng_args(sampling, generator, rng_state, device, needed):
    """(seed pointer, seed, offset, from_ptr). Never reads a device value on the host: a
    torch.Generator (or torch's default one) draws the Philox seed/offset on the device."""
    dummy = torch.empty(0, device=device, dtype=torch.int64)
    if not needed:
        return dummy, 0, 0, False
    if generator is not None:
        return torch.randint(0, 2**62, (2,), device=device, dtype=torch.int64,
                             generator=generator), 0, 0, True
    if rng_state is not None:
        return rng_state, 0, 0, True
    if sampling.seed is not None:
        return dummy, sampling.seed, 0, False
    return torch.randint(0, 2**62, (2,), device=device, dtype=torch.int64), 0, 0, True


def _triton_blocks(B: int, V: int, gpu: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_V, BLOCK_K) of the LM-head launch and BLOCK_R of the finalize launch.

    A GPU wants many programs: narrow vocab tiles and one row per finalize program (rows are
    independent, B programs fill the SMs). The interpreter pays per program and per op, so it
    takes wide tiles and many rows at once.
    """
    block_b = min(64, max(16, triton.next_power_of_2(B)))
    block_v = min(128 if gpu else 2048, max(16, triton.next_power_of_2(V)))
    block_r = 1 if gpu else min(64, triton.next_power_of_2(B))
    return block_b, block_v, 64, block_r


def raise_non_finite(nonfinite: torch.Tensor) -> None:
    """Raise the reference's error if a ``nonfinite`` flag buffer of the Triton or CUDA backend
    holds a flag (one host read)."""
    flags = nonfinite.cpu()
    for bit, what, source in ((1, "logits", "h_tok or lm_head_weight"),
                              (2, "p_unsafe", "h_cls or the safety head (safety_weight, "
                                              "safety_bias)")):
        _raise_non_finite(what, (flags & bit) != 0, source)


def head_sample_triton(h_tok, lm_head_weight, *, h_cls=None, safety_weight=None,
                       safety_bias=None, state=None, ess=None, sampling=SamplingParams(),
                       generator=None, rng_state=None, out=None, nonfinite=None,
                       probe_weight=None, probe_bias=None, probe_threshold=None, probe_out=None):
    """Triton backend of ``head_sample`` (inputs already validated). 2 launches, +1 when the
    randomness comes from a ``torch.Generator`` (a device-side seed draw).

    The cascade's probe (``probe_weight`` ...): the finalize launch computes it from the same
    ``h_tok`` rows, after the state update (no extra launch); ``probe_out`` receives it.

    ``out``: optional ``(tokens (B,) int64, p_unsafe (B,) float32)`` buffers to write into.
    ``sampling.logprobs``: the LM-head launch also keeps each tile's (max, sum exp) of
    ``logit / T`` and the finalize launch reduces them to the row logsumexp and the chosen
    token's logprob (still 2 launches); ``logprobs = k > 0`` stores the logits and adds a
    ``torch.topk`` over them.
    ``nonfinite``: optional ``(B,)`` int32 buffer the kernel ORs flags into (1: a NaN/inf
    logit, 2: a NaN score of an evaluating row) without a host sync; the caller checks it at
    its own sync points (``raise_non_finite``). Without it the flags are checked here, after
    the launch (one host read, skipped while value checks are off), and raise as the reference.
    """
    dev = h_tok.device
    B, Dm = h_tok.shape
    V = lm_head_weight.shape[0]
    if out is None:
        out = (torch.empty(B, device=dev, dtype=torch.int64),
               torch.empty(B, device=dev, dtype=torch.float32))
    if B == 0:  # an empty batch is legal (as for the reference); there is nothing to launch
        return out
    check_here = nonfinite is None
    if check_here:
        nonfinite = torch.zeros(B, device=dev, dtype=torch.int32)
    h_tok = h_tok if h_tok.stride(1) == 1 else h_tok.contiguous()
    W = lm_head_weight if lm_head_weight.stride(1) == 1 else lm_head_weight.contiguous()
    temp = _param_args(sampling.temperature, dev, torch.float32)
    top_k = _param_args(sampling.top_k if isinstance(sampling.top_k, torch.Tensor)
                        else min(int(sampling.top_k), V), dev, torch.int64)
    top_p = _param_args(sampling.top_p, dev, torch.float32)
    min_p = _param_args(sampling.min_p, dev, torch.float32)
    # Host-side knowledge only (Python scalars), so no launch path depends on tensor values.
    noise = temp[2] or temp[1] > 0
    filters = noise and (top_k[2] or top_p[2] or min_p[2] or 0 < top_k[1] < V
                         or top_p[1] < 1 or min_p[1] > 0)
    seed_ptr, seed_val, offset_val, seed_from_ptr = _rng_args(sampling, generator, rng_state,
                                                              dev, noise)
    block_b, block_v, block_k, block_r = _triton_blocks(B, V, dev.type == "cuda")
    n_tiles = triton.cdiv(V, block_v)
    part_val = torch.empty(B, n_tiles, device=dev, dtype=torch.float32)
    part_idx = torch.empty(B, n_tiles, device=dev, dtype=torch.int32)
    n_top = sampling.logprobs or 0
    want_lp = sampling.logprobs is not None
    logits = torch.empty(B, V, device=dev, dtype=torch.float32) if filters or n_top else part_val
    part_m = torch.empty(B, n_tiles, device=dev, dtype=torch.float32) if want_lp else part_val
    part_s = torch.empty(B, n_tiles, device=dev, dtype=torch.float32) if want_lp else part_val
    param_args = (temp[0], temp[1], top_k[0], top_k[1], top_p[0], top_p[1], min_p[0], min_p[1],
                  seed_ptr, seed_val, offset_val)
    param_flags = dict(TEMP_PER_ROW=temp[2], TOPK_PER_ROW=top_k[2], TOPP_PER_ROW=top_p[2],
                       MINP_PER_ROW=min_p[2], SEED_FROM_PTR=seed_from_ptr)
    _lm_head_partial_kernel[(triton.cdiv(B, block_b), n_tiles)](
        h_tok, W, part_val, part_idx, logits, part_m, part_s, *param_args,
        B, V, Dm, n_tiles, h_tok.stride(0), W.stride(0),
        **param_flags, NOISE=noise, FILTERS=filters, LOGPROBS=want_lp, STORE_LOGITS=n_top > 0,
        # The interpreter's tl.dot mishandles bf16 operands (triton 3.9); GPUs keep bf16 MMA.
        DOT_FP32=dev.type != "cuda" and h_tok.dtype == torch.bfloat16,
        BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=4, num_stages=3)

    tokens, p_unsafe = out
    dummy_i32 = torch.empty(0, device=dev, dtype=torch.int32)
    has_safety = h_cls is not None
    if has_safety:
        h_cls = h_cls if h_cls.stride(1) == 1 else h_cls.contiguous()
        sw = safety_weight.contiguous()
        two_class = sw.dim() == 2
        if isinstance(safety_bias, torch.Tensor):
            sb, sb_val, bias_mode = safety_bias, 0.0, 2 if two_class else 1
        else:
            sb, sb_val, bias_mode = dummy_i32, float(safety_bias or 0.0), 0
        safety = (h_cls, h_cls.stride(0), sw, sw.stride(0) if two_class else 0, sb, sb_val)
    else:
        two_class, bias_mode = False, 0
        safety = (h_tok, 0, h_tok, 0, dummy_i32, 0.0)
    if state is not None:
        st = (state.seq_len, state.prompt_len, state.mode, state.flags, state.switch_step,
              state.next_eval, state.interval, state.forced_idx, state.trigger_step,
              state.evaluating, state.finished, state.refusal_ids, state.refusal_ids.numel(),
              state.refusal_skip)
        cfg = (float(ess.threshold), ess.tau, ess.period, ess.anneal_stop,
               struct.unpack("<q", struct.pack("<d", float(ess.anneal_growth)))[0])
        schedule, policy = _SCHEDULE_IDS[ess.schedule], _POLICY_IDS[ess.policy]
        if ess.schedule == "cascade" and ess.cascade_net:
            schedule = 5
    else:
        st = (dummy_i32,) * 12 + (1, 0)
        cfg, schedule, policy = (0.5, 1, 1, 0, 0), 0, 0
    lp = torch.empty(B, device=dev, dtype=torch.float32) if want_lp else p_unsafe
    lse = torch.empty(B, device=dev, dtype=torch.float32) if want_lp else p_unsafe
    has_probe = probe_weight is not None and state is not None
    if has_probe:
        # the bias as a device scalar: a 0-d tensor is never read on the host (no sync)
        probe = (probe_weight.contiguous(),
                 torch.as_tensor(probe_bias if probe_bias is not None else 0.0,
                                 device=dev).to(torch.float32).reshape(1),
                 float(probe_threshold),
                 probe_out if probe_out is not None else torch.empty(B, device=dev))
    else:
        probe = (p_unsafe, p_unsafe, 1.0, p_unsafe)
    _finalize_kernel[(triton.cdiv(B, block_r),)](
        part_val, part_idx, logits, tokens, p_unsafe, nonfinite, part_m, part_s, lp, lse,
        h_tok, W, h_tok.stride(0), W.stride(0), *param_args, *safety, *st, *cfg, *probe,
        B, V, Dm, n_tiles, **param_flags, FILTERS=filters,
        HAS_SAFETY=has_safety, TWO_CLASS=two_class, BIAS_MODE=bias_mode,
        HAS_STATE=state is not None, SCHEDULE=schedule, POLICY=policy, LOGPROBS=want_lp,
        HAS_PROBE=has_probe,
        BLOCK_R=block_r, BLOCK_T=min(1024, triton.next_power_of_2(n_tiles)),
        BLOCK_D=min(1024, triton.next_power_of_2(Dm)),
        BLOCK_F=min(512, triton.next_power_of_2(V)), num_warps=4)
    if check_here and value_checks_enabled():
        raise_non_finite(nonfinite)
    if not want_lp:
        return tokens, p_unsafe
    top_ids = torch.zeros(B, 0, device=dev, dtype=torch.int64)
    top_lp = torch.zeros(B, 0, device=dev, dtype=torch.float32)
    if n_top:
        t = temp[0] if temp[2] else torch.full((B,), float(temp[1]), device=dev)
        inv_t = torch.where(t > 0, 1.0 / torch.where(t > 0, t, 1.0), 1.0)
        top = torch.topk(logits * inv_t[:, None], min(n_top, V), dim=-1)
        top_ids, top_lp = top.indices, top.values - lse[:, None]
    return tokens, p_unsafe, Logprobs(lp, top_ids, top_lp)


def _triton_can_run(device, dtype, **ctx):
    why = dispatch.triton_can_run(device)
    if why is None and dtype == torch.float64:
        return "float64 is served by the torch reference (no fp64 tl.dot)"
    return why
