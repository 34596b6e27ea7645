"""The engine's forward passes: one generic decoder forward over the model's own modules, the
prefill, and the fused decode step (docs/DESIGN.md §2-§3). Functions of the ``Engine``
(bound as its ``_forward`` / ``_prefill`` / ``_decode_step`` / ``_key_bias``).

Per decode step and sequence, two query rows share one forward pass (Lq = 2):

* the token row: the token sampled last step, at position ``t - 1``;
* the [CLS] row at ``q_pos = 0`` when the sequence re-evaluates this step (``-1`` otherwise:
  a padding row that costs nothing and writes nothing). In every layer its fresh K/V overwrite
  cache slot 0 *before* that layer's attention, so the token row of the same step already sees
  the refreshed [CLS] (docs/DESIGN.md §3, KV-cache semantics).

On a CPU a step where only some sequences evaluate is compact (``_compact_step``): the
linears run on the token rows plus a few [CLS] rows, not 2B rows.

Prompts of different lengths are right-padded (never left-padded): padding rows get
``q_pos = -1`` and ``seqlens_k`` hides padding keys, so RoPE positions equal indices.
"""
from __future__ import annotations

import torch

from ..ops import ess_attention
from ..ops.attention import reuse_masks
from ..ops.cpu import controller as fused_controller
from ..safety.adapter import AdaptedLinears
from .controller import decode_rows_ref, sample, step_begin_ref


def forward(eng, ids, pos, q_pos, kv_len, write, attn, ess_kw, linears, rows=None):
    """Run the decoder on ``ids (B, L)`` at ``pos (B, L)``; ``write(layer, k, v)`` stores
    this pass's K/V in the cache before ``attn`` reads ``cache[:, :kv_len]``; ``linears``
    runs the projections and MLPs (``safekern.ops.cpu.decode_linear``).

    ``rows = (idx, qbuf)``: the compact decode step. ``ids``/``pos`` are ``(M, 1)`` rows that
    sit at flat positions ``idx (M,)`` of the attention's ``(Bc, 2)`` layout (``qbuf (Bc, 2,
    H, D)``, ``q_pos (Bc, 2)``): each layer scatters its queries there and gathers the
    attention output back, so the linears run on M rows only."""
    a = eng.arch
    B, L = ids.shape
    kw = {"response_start": None, "cls_windows": None, "key_bias": None, **ess_kw}
    x = a.base.embed_tokens(ids)
    if isinstance(linears, AdaptedLinears):
        linears.embed(x)                      # the adapter's own [CLS] embedding
    cache = eng._cache
    cos, sin = cache.cos[pos][:, :, None, :], cache.sin[pos][:, :, None, :]
    half = a.head_dim // 2
    with reuse_masks():                   # one visibility mask per pass, not one per layer
        for i, layer in enumerate(a.layers):
            h = layer.input_layernorm(x)
            q, k, v = linears.qkv(i, h)
            q = q.view(B, L, a.n_heads, a.head_dim)
            k = k.view(B, L, a.n_kv, a.head_dim)
            v = v.view(B, L, a.n_kv, a.head_dim)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            write(i, k, v)
            if rows is not None:
                idx, qbuf = rows
                qbuf.view(-1, a.n_heads, a.head_dim).index_copy_(0, idx, q.view(B, a.n_heads,
                                                                                a.head_dim))
                q = qbuf
            o = attn(q, cache.k[i, :, :kv_len], cache.v[i, :, :kv_len],
                     softmax_scale=a.scale, causal=True, q_pos=q_pos, return_lse=False, **kw)
            o = o.reshape(-1, a.n_heads * a.head_dim)
            if rows is not None:
                o = o.index_select(0, rows[0])
            x = x + linears.o(i, o.view(B, L, a.n_heads * a.head_dim))
            x = x + linears.mlp(i, layer.post_attention_layernorm(x))
    return x


def key_bias(eng, kv_len):
    """``cls_bias_scale * logit(p_unsafe)`` on key 0 (the [CLS]) — seen by response rows
    and the [CLS] row itself; prompt rows never see key 0. None when the scale is 0."""
    if eng._ess is None or eng._ess.cls_bias_scale == 0:
        return None
    kb = torch.zeros(eng.B, 1, kv_len, device=eng.device)
    kb[:, 0, 0] = eng._ess.cls_bias_scale * eng._logit
    return kb


def prefill(eng, ids, lengths):
    """Run the prompts (right-padded ``ids (B, L)``, ``lengths (B,)``) through the model, fill
    the cache and sample generated token 0 (step 0; the [CLS] row evaluates with safety on)."""
    B, L = ids.shape
    i = torch.arange(L, device=eng.device, dtype=torch.int32)[None]
    valid = i < lengths[:, None]
    q_pos = torch.where(valid, i, torch.full_like(i, -1))
    pos = torch.where(valid, i, torch.zeros_like(i)).long()
    if eng._ess is not None and eng.model.safekern.cls_position == "last":
        pos[:, 0] = lengths.long() - 1           # the [CLS] row looks back from t - 1
    ess_kw = dict(seqlens_k=lengths, key_bias=key_bias(eng, L))
    if eng._ess is not None:
        windows = eng._plan(eng.state, eng._ess)[0]
        ess_kw.update(response_start=eng._cls_visible_from, cls_windows=windows)
    attn = lambda *args, **kw: ess_attention(*args, backend=eng.backend, **kw)  # noqa: E731
    x = forward(eng, ids, pos, q_pos, L, eng._cache.prefill_writer(L), attn, ess_kw,
                eng._prefill_linears)
    h_tok = eng._norm(x[eng._cache.bidx, lengths.long() - 1])
    h_cls = eng._norm(x[:, 0]) if eng._ess is not None else None
    sample(eng, h_tok, h_cls, checked=True)


def decode_step(eng, kv_len: int, host_skip: bool = False):
    """One step for every sequence; reads and writes only device tensors (graph-safe).

    ``host_skip`` (CPU, where reading a flag costs nothing): when no sequence re-evaluates
    this step, the token rows run alone. A decode token row sits at ``t - 1 >= P``, so plain
    causal attention over ``[0, t)`` is exactly its ESS visibility.
    """
    st = eng.state if eng._ess is not None else None
    if st is None:
        rows = fused_controller.decode_rows if eng._fused_rows else decode_rows_ref
        pos, q_pos, flat, seqlens = rows(eng._lengths, eng._step_idx, eng._cache.row_base)
        x = forward(eng, eng._tok[:, None], pos, q_pos, kv_len, eng._cache.flat_writer(flat),
                    eng._attn_fns[1], dict(seqlens_k=seqlens, key_bias=key_bias(eng, kv_len)),
                    eng._decode_linears)
        sample(eng, eng._norm(x[:, 0]), None, controller=False)
        return
    args = (eng._lengths, eng._step_idx, eng._cache.row_base,
            eng.model.safekern.cls_position == "last", eng.Lmax, host_skip)
    windows, n_ev, pos, q_pos, flat = eng._ctl.step_begin(*args) if eng._fused_ctl else \
        step_begin_ref(st, eng._ess, *args)
    write = eng._cache.flat_writer(flat)
    if pos.shape[1] == 1:                 # host_skip and nobody evaluates: token rows only
        ess_kw = dict(seqlens_k=st.seq_len, key_bias=key_bias(eng, kv_len))
        if not eng.model.safekern.response_sees_cls:
            ess_kw["response_start"] = eng._cls_visible_from     # token rows skip key 0
        x = forward(eng, eng._tok[:, None], pos, q_pos, kv_len, write, eng._attn_fns[1], ess_kw,
                    eng._decode_linears)
        h = eng._norm(x[:, 0])
        if eng._probe is None and not bool((st.forced_idx >= 0).any()):
            # Nobody evaluates or takes a refusal token: the controller update is a no-op
            # (under the cascade it is not: the probe screens every step).
            sample(eng, h, None, controller=False)
        else:
            sample(eng, h, h)                     # no [CLS] row is read: none evaluates
        return
    ess_kw = dict(seqlens_k=st.seq_len, response_start=eng._cls_visible_from,
                  cls_windows=windows, key_bias=key_bias(eng, kv_len))
    if n_ev is not None and compact_rows(n_ev) < eng.B:
        return _compact_step(eng, n_ev, pos, q_pos, flat, kv_len, ess_kw)
    x = forward(eng, eng._ids2, pos, q_pos, kv_len, write, eng._attn_fns[2], ess_kw,
                eng._step_linears)
    h = eng._norm(x)
    # the fused controller reads the [CLS] rows of h itself (a select is a ~5 us op here)
    sample(eng, h[:, 0], h if eng._fused_ctl else h[:, 1])



def compact_rows(n_ev: int) -> int:
    """The [CLS] rows a compact step runs for ``n_ev`` evaluating sequences: the next power of
    two (the linears calibrate per row count M, ``KernelLinears``; buckets keep that to a few
    M per batch size). The extra rows are non-evaluating [CLS] rows (``q_pos = -1``)."""
    return 1 << max(n_ev - 1, 0).bit_length()


def _compact_step(eng, n_ev, pos, q_pos, flat, kv_len, ess_kw):
    """A decode step where only some sequences evaluate (CPU, ``host_skip``): the B token rows
    and ``compact_rows(n_ev)`` [CLS] rows run the linears, M = B + n instead of 2B (at batch
    16 with one escalation: 17 rows, not 32). Attention keeps the ``(B, 2)`` layout, where a
    non-evaluating [CLS] row (``q_pos = -1``) costs nothing. Same values as the full step:
    bitwise where the linears run the C++ kernels (rows independent of each other,
    ``safekern.ops.cpu.linear``), within float32 rounding where MKL runs."""
    n = compact_rows(n_ev)
    cls = q_pos[:, 1] >= 0
    pick = torch.cat([cls.nonzero()[:, 0], (~cls).nonzero()[:n - n_ev, 0]])
    idx = torch.cat([eng._cache.bidx * 2, pick * 2 + 1])        # flat rows of the (B, 2) layout
    x = forward(eng, eng._ids2.view(-1)[idx][:, None], pos.view(-1)[idx][:, None], q_pos,
                kv_len, eng._cache.flat_writer(flat[idx]), eng._attn_fns[2], ess_kw,
                eng._compact_linears, rows=(idx, eng._qbuf))
    h, h2 = eng._norm(x[:, 0]), eng._h2
    h2.view(-1, h2.shape[-1]).index_copy_(0, idx, h)   # the [CLS] rows where the controller reads
    # the token rows as a contiguous (B, D) block: the LM head's GEMM is slower on a strided one
    sample(eng, h[:eng.B], h2 if eng._fused_ctl else h2[:, 1])


__all__ = ["forward", "key_bias", "prefill", "decode_step", "compact_rows"]
