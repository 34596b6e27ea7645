"""Shared pieces of the ESS attention kernels: the forward (``attention_triton.py``) and the
backward (``_attention_bwd.py``) both read rows, visibility and dots through these Triton
jit helpers, so neither kernel module imports the other.

Owns: the row kinds and their key ranges (``_row_positions``, ``_row_kinds``, ``_row_key_end``,
``_cls_keys``, ``_cls_key_end``), the interpreter-safe dot and bf16 rounding (``_mma``,
``_narrow``) and ``_LOG2E``.
"""

# Scores live in the log2 domain (scale * log2(e) folded into one multiply) so the online
# softmax uses exp2. A row's visible keys, in ESS mode, are:
#   normal row (q_pos = i > 0):  j < seqlens_k, j <= i if causal, j == 0 only if i >= rs
#   [CLS] row  (q_pos == 0):     (j == 0 or j in a window) and j < seqlens_k
#   padding row (q_pos == -1):   nothing
# Without ESS every row with q_pos >= 0 is a normal row and key 0 is an ordinary key.

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; can_run reports the missing package
    triton = None

_LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _cls_keys(offs_n, cw_ptr, W):
        """Keys the [CLS] row sees inside ``offs_n`` (before the seqlens_k bound)."""
        vis = offs_n == 0
        for w in range(W):
            start = tl.load(cw_ptr + 2 * w)
            end = tl.load(cw_ptr + 2 * w + 1)
            vis = vis | ((offs_n >= start) & (offs_n < end))
        return vis

    # INTERP_BF16: bf16 inputs under the Triton interpreter (CPU), which gets two bf16 things
    # wrong that the GPU gets right: tl.dot, and the rounding of fp32 -> bf16. The GPU path
    # (INTERP_BF16=False) compiles to plain tensor-core dots and cvt.rn conversions.

    @triton.jit
    def _mma(a, b, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
        # The interpreter's bf16 tl.dot is wrong; bf16 products are exact in fp32, so
        # upcasting there matches the GPU's fp32-accumulated bf16 dot.
        if INTERP_BF16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=DOT_PREC)

    @triton.jit
    def _narrow(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
        """fp32 ``x`` in ``dtype``, rounded to nearest even as the GPU's conversion does."""
        # The interpreter truncates fp32 -> bf16 (towards zero): every p, ds and stored value
        # shrinks by half a bf16 ulp on average, a bias that sums up over the keys and doubled
        # the backward's error against the float64 truth (issue 26). There, round the fp32
        # bits by hand and keep their top half (NaN stays NaN: the carry could make it inf).
        if INTERP_BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(x != x, x.to(tl.bfloat16), rounded)
        return x.to(dtype)

    @triton.jit
    def _row_positions(QPOS, SEQLENS, b, rows, row_ok, Lq, Lk,
                       HAS_QPOS: tl.constexpr, HAS_SEQLENS: tl.constexpr):
        """``(pos, seqlen)``; without tensors: every key valid, bottom-right aligned rows
        (computed here so the default needs no extra launches)."""
        if HAS_SEQLENS:
            seqlen = tl.load(SEQLENS + b)
        else:
            seqlen = Lk
        if HAS_QPOS:
            pos = tl.load(QPOS + b * Lq + rows, mask=row_ok, other=-1)
        else:
            pos = seqlen - Lq + rows
            pos = tl.where(row_ok & (pos >= 0), pos, -1)
        return pos, seqlen

    @triton.jit
    def _row_kinds(RSTART, b, pos, IS_ESS: tl.constexpr):
        """``(response_start, normal, is_cls)`` per row. Without ESS every row with a position
        is a normal row and there is no [CLS] row."""
        if IS_ESS:
            rs = tl.load(RSTART + b)
            normal = pos > 0
            is_cls = pos == 0
        else:
            rs = 0
            normal = pos >= 0
            is_cls = pos < -1
        return rs, normal, is_cls

    @triton.jit
    def _row_key_end(pos, seqlen, CAUSAL: tl.constexpr):
        """One past the last key a normal row can see."""
        if CAUSAL:
            row_hi = tl.minimum(pos + 1, seqlen)
        else:
            row_hi = tl.zeros_like(pos) + seqlen
        return row_hi

    @triton.jit
    def _cls_key_end(cw_ptr, W, seqlen):
        """One past the last key the [CLS] row can see: key 0 and its windows' ends."""
        cls_hi = tl.minimum(seqlen, 1)
        for w in range(W):
            cls_hi = tl.maximum(cls_hi, tl.minimum(tl.load(cw_ptr + 2 * w + 1), seqlen))
        return cls_hi
