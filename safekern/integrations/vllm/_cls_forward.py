"""The [CLS] rows of one vLLM step: one row per evaluating request through every decoder layer,
reading that request's window keys/values from vLLM's paged KV cache (``read_kv``), appended to
the token rows of vLLM's decoder stack (``fused_forward``) or in a pass of its own after vLLM's
forward (``cls_pass``); the [CLS] adapter's deltas (``AdapterDeltas``) go on the [CLS] rows'
projections. ``forward_metadata`` reads the step's sequence lengths and block table.

Nothing here imports vLLM at module level: the forward context and vLLM's custom ops are read
inside ``forward_metadata`` and ``_cpu``. Positions: a safekern index ``j >= 1`` is vLLM
position ``j - 1`` (see ``_batch``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ._controller import Plan


# ---------------------------------------------------------------- the [CLS] adapter
# The checkpoint's per-target tensors grouped in vLLM's fused projections' layout.
ADAPTER_GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)),
                  ("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",)))


class AdapterDeltas(torch.nn.Module):
    """The [CLS] adapter (``safekern.safety.adapter``) in vLLM's fused layout: per layer and fused
    projection (``qkv_proj`` = q | k | v, ``o_proj``, ``gate_up_proj`` = gate | up,
    ``down_proj``) the targets' ``A`` side by side (``in x n*r``) and their ``B`` block-diagonal
    (``n*r x out``, zero columns where a target is not adapted), as buffers (vLLM's weight
    loader never sees them). ``add`` puts ``s * (x @ A) @ B`` on the [CLS] rows' slice of the
    base projection's output, so the [CLS] rows get each target's delta at its own columns and
    token rows are not touched.

    Args:
        meta: ``safety.json["adapter"]`` (``rank``, ``alpha``, ``targets``), checked here.
        sizes: ``{target: (in, out)}`` of one decoder layer as the model was built.
        num_layers: decoder layers; where: the file named in errors.
    """

    def __init__(self, meta, sizes, num_layers: int, dtype, device, where: str):
        super().__init__()
        from ...safety.adapter import check_meta

        rank, alpha, targets = check_meta(meta, where)
        self.rank, self.targets, self.num_layers = rank, targets, num_layers
        self.scale = float(alpha) / rank
        self.sizes = dict(sizes)
        self.shapes = {}                     # checkpoint tensor name -> shape
        for i in range(num_layers):
            for t in targets:
                fan_in, fan_out = self.sizes[t]
                self.shapes[f"ess_adapter.{i}.{t}.A"] = (fan_in, rank)
                self.shapes[f"ess_adapter.{i}.{t}.B"] = (rank, fan_out)
        self._groups = {}                    # (layer, group) -> (A name, B name)
        for i in range(num_layers):
            for g, members in ADAPTER_GROUPS:
                present = [t for t in members if t in targets]
                if not present:
                    continue
                fan_in = self.sizes[present[0]][0]
                out = sum(self.sizes[t][1] for t in members)
                a, b = f"A_{g}_{i}", f"B_{g}_{i}"
                self.register_buffer(a, torch.zeros(fan_in, rank * len(present), dtype=dtype,
                                                    device=device), persistent=False)
                self.register_buffer(b, torch.zeros(rank * len(present), out, dtype=dtype,
                                                    device=device), persistent=False)
                self._groups[(i, g)] = (a, b)

    def describe(self) -> str:
        return ", ".join(f"{t} {self.sizes[t][0]}->{self.sizes[t][1]}" for t in self.targets)

    @torch.no_grad()
    def load(self, tensors: Dict[str, torch.Tensor], where: str):
        """Copy the checkpoint's ``ess_adapter.{layer}.{target}.A/B`` tensors in; every name
        and shape is checked against the model (errors name ``where`` and the tensor)."""
        unknown = sorted(set(tensors) - set(self.shapes))
        if unknown:
            raise ValueError(f"{where} holds adapter tensors safety.json's adapter (rank "
                             f"{self.rank}, targets {list(self.targets)}, {self.num_layers} "
                             f"layers) does not describe: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}")
        for name, shape in self.shapes.items():
            if name not in tensors:
                raise ValueError(f"{where} has no {name!r} tensor (safety.json names an adapter "
                                 f"of rank {self.rank} on {list(self.targets)})")
            w = tensors[name]
            if tuple(w.shape) != shape:
                raise ValueError(f"{where}: {name!r} has shape {tuple(w.shape)}, but the "
                                 f"model's config ({self.describe()}, rank {self.rank}) needs "
                                 f"{shape}")
            if not w.dtype.is_floating_point:
                raise ValueError(f"{where}: {name!r} must hold floats, got {w.dtype}")
        for (i, g), (a, b) in self._groups.items():
            A, B = getattr(self, a), getattr(self, b)
            B.zero_()
            j = col = 0
            for t in dict(ADAPTER_GROUPS)[g]:
                n = self.sizes[t][1]
                if t in self.targets:
                    r = slice(j * self.rank, (j + 1) * self.rank)
                    A[:, r] = tensors[f"ess_adapter.{i}.{t}.A"].to(A)
                    B[r, col:col + n] = tensors[f"ess_adapter.{i}.{t}.B"].to(B)
                    j += 1
                col += n

    def add(self, i: int, group: str, x: torch.Tensor, y: torch.Tensor):
        """``y += s * (x @ A) @ B`` for layer ``i``'s fused projection ``group``, in place:
        ``x`` are the [CLS] rows' inputs, ``y`` their rows of the base output (a view)."""
        names = self._groups.get((i, group))
        if names is not None:
            A, B = getattr(self, names[0]), getattr(self, names[1])
            y += (x @ A) @ B * self.scale


def _adapter(model) -> Optional[AdapterDeltas]:
    a = getattr(model, "ess_adapter", None)
    return a if isinstance(a, AdapterDeltas) else None


# ---------------------------------------------------------------- the [CLS] pass
def _rope_tables(rotary, pos: torch.Tensor, dtype):
    """``(cos, sin)`` of vLLM's rotary embedding at positions ``pos (E,)``, shaped to broadcast
    over heads; positions may be negative (the [CLS] row of ``cls_position="zero"`` sits at
    vLLM position -1): cos(-a) = cos(a), sin(-a) = -sin(a) on the module's own cache."""
    cs = rotary.cos_sin_cache.index_select(0, pos.abs()).to(dtype)
    cos, sin = cs.chunk(2, dim=-1)
    return cos[:, None], (sin * pos.sign().to(dtype)[:, None])[:, None]


def _rope(rotary, tables, x: torch.Tensor) -> torch.Tensor:
    """``x (E, heads, D)`` rotated like vLLM's ``rotary`` (neox or GPT-J style, partial
    rotary dims) with ``tables`` from ``_rope_tables``."""
    cos, sin = tables
    rd = rotary.rotary_dim
    rot = x[..., :rd]
    if rotary.is_neox_style:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return out if rd == x.shape[-1] else torch.cat([out, x[..., rd:]], dim=-1)


def read_kv(kv_cache: torch.Tensor, slots: torch.Tensor):
    """Keys and values ``(N, Hkv, D)`` at flat slots of one layer of vLLM's CPU_ATTN cache.

    The cache is ``(blocks, Hkv, block_size, 2 * D)``; each (block, head) holds the keys
    transposed (``D x block_size``, the layout the ``vec``/``vec16`` kernels read) and then the
    values (``block_size x D``). ``tests/test_vllm.py`` checks this against vLLM's own
    ``cpu_attn_reshape_and_cache`` write.
    """
    nb, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    flat = kv_cache.view(nb, h, 2 * bs * d)
    k_t = flat[..., :bs * d].view(nb, h, d, bs)
    v = flat[..., bs * d:].view(nb, h, bs, d)
    blocks, off = slots // bs, slots % bs
    return k_t[blocks, :, :, off], v[blocks, :, off, :]


class _ClsRows:
    """The [CLS] rows of one step: window key slots, RoPE positions, and their attention."""

    def __init__(self, model, pl: Plan, block_table: torch.Tensor):
        self.model = model
        dev = model.ess_cls_embedding.device
        E = self.E = len(pl.rows)
        keys = []
        for w in pl.windows:
            (a0, b0), (a1, b1) = w.tolist()
            keys.append(list(range(a0, b0)) + list(range(a1, b1)))
        W = self.W = max(1, max(len(k) for k in keys))
        pos_v = torch.zeros(E, W, dtype=torch.long)
        valid = torch.zeros(E, 1 + W, dtype=torch.bool)
        valid[:, 0] = True                                     # key 0: the [CLS] itself
        for i, k in enumerate(keys):
            pos_v[i, :len(k)] = torch.tensor(k, dtype=torch.long) - 1   # safekern j -> vLLM j-1
            valid[i, 1:1 + len(k)] = True
        bt = block_table[torch.tensor(pl.rows)].long()          # (E, max_blocks)
        bs = model.model.layers[0].self_attn.attn.kv_cache.shape[2]
        self.slots = (torch.gather(bt, 1, pos_v // bs) * bs + pos_v % bs).flatten().to(dev)
        last = model.ess_meta["cls_position"] == "last"
        # RoPE position of the [CLS] row: t - 1 ("last") or 0, in safekern indices -> vLLM - 1.
        self.pos = torch.tensor([(ti - 1 if last else 0) - 1 for ti in pl.t], dtype=torch.long,
                                device=dev)
        self.mask = valid.to(dev)[:, None, None, :]             # (E, 1, 1, 1 + W): True = seen
        self._tables = {}                                       # rotary module -> cos/sin

    def _rotate(self, rotary, x):
        key = id(rotary)                      # vLLM shares one rotary module across layers
        if key not in self._tables:
            self._tables[key] = _rope_tables(rotary, self.pos, x.dtype)
        return _rope(rotary, self._tables[key], x)

    def embed(self):
        m = self.model
        return m.ess_cls_embedding[None].expand(self.E, -1).to(m.ess_cls_embedding.dtype)

    def attention(self, at, q, k, v):
        """Attention of the [CLS] rows ``q, k, v (E, q_size | kv_size)`` of one layer over
        themselves (key 0) and their windows, read from that layer's paged cache."""
        E, W, hk, d, hq = self.E, self.W, at.num_kv_heads, at.head_dim, at.num_heads
        qk = self._rotate(at.rotary_emb, torch.cat([q.reshape(E, hq, d), k.reshape(E, hk, d)], 1))
        q, k = qk[:, :hq], qk[:, hq:]                       # one rotation for q and k
        kw, vw = read_kv(at.attn.kv_cache, self.slots)
        kk = torch.cat([k[:, None], kw.view(E, W, hk, d).to(k.dtype)], 1)   # (E, 1+W, hk, d)
        vv = torch.cat([v.reshape(E, 1, hk, d), vw.view(E, W, hk, d).to(v.dtype)], 1)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None].float(), kk.transpose(1, 2).float(), vv.transpose(1, 2).float(),
            attn_mask=self.mask, scale=at.scaling, enable_gqa=True)         # (E, Hq, 1, d)
        return o.reshape(E, at.q_size).to(q.dtype)

    def p_unsafe(self, h: torch.Tensor) -> torch.Tensor:
        """``p_unsafe`` from the [CLS] rows' final-normed hidden states."""
        m = self.model
        logit = h.float() @ m.ess_head_weight.float().t() + m.ess_head_bias.float()
        if logit.shape[1] == 1:
            return torch.sigmoid(logit[:, 0])
        return torch.softmax(logit, -1)[:, 1]


def cls_pass(model, pl: Plan, block_table: torch.Tensor) -> torch.Tensor:
    """Two-pass mode: ``p_unsafe`` of the evaluating rows by a [CLS]-only pass after vLLM's own
    forward (token rows untouched; every weight is read a second time, see DESIGN).

    The [CLS] row attends to itself (key 0) and to the keys of its windows (docs/DESIGN.md §4),
    read from vLLM's paged cache; nothing is written to the cache, since no token row sees the
    [CLS] key (``response_sees_cls=False``, checked at load). Its RoPE position is ``t - 1``
    (``cls_position="last"``, the fed token's) or 0, in safekern indices.
    """
    c = _ClsRows(model, pl, block_table)
    ad = _adapter(model)
    x = c.embed().contiguous()
    for i, layer in enumerate(model.model.layers):
        at = layer.self_attn
        h = layer.input_layernorm(x)
        qkv, _ = at.qkv_proj(h)
        if ad is not None:
            ad.add(i, "qkv", h, qkv)
        q, k, v = qkv.split([at.q_size, at.kv_size, at.kv_size], dim=-1)
        a = c.attention(at, q, k, v)
        o, _ = at.o_proj(a)
        if ad is not None:
            ad.add(i, "o", a, o)
        x = x + o
        h = layer.post_attention_layernorm(x)
        if ad is None:
            x = x + layer.mlp(h)
            continue
        mlp = layer.mlp                       # vLLM's MLP split: gate_up -> act -> down
        y, _ = mlp.gate_up_proj(h)
        ad.add(i, "gate_up", h, y)
        z = mlp.act_fn(y)
        d, _ = mlp.down_proj(z)
        ad.add(i, "down", z, d)
        x = x + d
    return c.p_unsafe(model.model.norm(x))


def _cpu(op):
    """A vLLM CustomOp's C++ CPU kernel (``forward_cpu``) when it has its own, else the module:
    under vLLM's default compilation custom ops are disabled (their native PyTorch forms get
    fused by Inductor), which leaves an eager caller with the slow native forms."""
    from vllm.model_executor.custom_op import CustomOp

    own = isinstance(op, CustomOp) and type(op).forward_cpu is not CustomOp.forward_cpu
    return op.forward_cpu if own else op


def _rms(norm, x, residual=None):
    """vLLM's RMSNorm (with the fused residual add) through its C++ kernels on a CPU."""
    w = getattr(norm, "weight", None)
    if x.device.type != "cpu" or getattr(norm, "variance_size_override", None) is not None or \
            not getattr(norm, "has_weight", False) or not hasattr(torch.ops._C, "rms_norm"):
        return norm(x) if residual is None else norm(x, residual)
    x = x.contiguous()
    if residual is None:
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x, w.data, norm.variance_epsilon)
        return out
    torch.ops._C.fused_add_rms_norm(x, residual, w.data, norm.variance_epsilon)
    return x, residual                              # in place: x = norm(x + r), r = x + r


def fused_forward(model, input_ids, positions, inputs_embeds, pl: Plan,
                  block_table: torch.Tensor):
    """Fused mode: vLLM's decoder stack with the step's [CLS] rows appended to its token rows,
    so every projection and MLP reads its weights once for both (the project's thesis on the
    host: docs/DESIGN.md §8). Token rows take vLLM's own attention (cache write included)
    before the [CLS] rows read their windows. Returns ``(hidden of the token rows, p_unsafe of
    the [CLS] rows)``. The layer step is vLLM's Llama/Qwen2/Mistral pre-norm decoder layer
    (fused residual add) run eagerly on vLLM's CPU kernels; a token row's values equal vLLM's
    up to rounding (MKL's small-M GEMMs are not row-invariant, and Inductor's fused norms round
    differently)."""
    m = model.model
    c = _ClsRows(model, pl, block_table)
    ad = _adapter(model)
    x = m.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
    T = x.shape[0]
    x = torch.cat([x, c.embed().to(x.dtype)])
    residual = None
    for i, layer in enumerate(m.layers[m.start_layer:m.end_layer], m.start_layer):
        if residual is None:
            residual = x
            h = _rms(layer.input_layernorm, x)
        else:
            h, residual = _rms(layer.input_layernorm, x, residual)
        at = layer.self_attn
        qkv, _ = at.qkv_proj(h)
        if ad is not None:                    # the [CLS] rows (T:) only, in place
            ad.add(i, "qkv", h[T:], qkv[T:])
        q, k, v = qkv.split([at.q_size, at.kv_size, at.kv_size], dim=-1)
        qt, kt = _cpu(at.rotary_emb)(positions, q[:T], k[:T])
        ot = at.attn(qt, kt, v[:T])            # writes this step's K/V before the [CLS] reads
        a = c.attention(at, q[T:], k[T:], v[T:])
        o, _ = at.o_proj(torch.cat([ot, a]))
        if ad is not None:
            ad.add(i, "o", a, o[T:])
        h, residual = _rms(layer.post_attention_layernorm, o, residual)
        mlp = layer.mlp
        y, _ = mlp.gate_up_proj(h)
        if ad is not None:
            ad.add(i, "gate_up", h[T:], y[T:])
        z = _cpu(mlp.act_fn)(y)
        x, _ = mlp.down_proj(z)
        if ad is not None:
            ad.add(i, "down", z[T:], x[T:])
    x, _ = _rms(m.norm, x, residual)
    return x[:T], c.p_unsafe(x[T:])


def forward_metadata(model):
    """``(seq_lens list, block_table)`` of the current vLLM step, or None outside a real step
    (profile/warm-up runs, or no metadata)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):
        md = md[0] if md else None
    if not isinstance(md, dict):
        return None
    m = md.get(model.model.layers[0].self_attn.attn.layer_name)
    if m is None or getattr(m, "block_table", None) is None:
        return None
    return m.seq_lens.tolist(), m.block_table


__all__ = ["ADAPTER_GROUPS", "AdapterDeltas", "cls_pass", "forward_metadata", "fused_forward",
           "read_kv"]
