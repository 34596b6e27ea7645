"""The ESS state of every request in one vLLM worker process, and the [CLS] pass.

Two vLLM extension points share it (docs/DESIGN.md "Serving with vLLM"):

* the logits processor (``processor.EssLogitsProcessor``) sees requests join, leave and move
  in vLLM's persistent batch (``BatchUpdate``) with their ``SamplingParams``, and forces the
  refusal tokens in ``apply(logits)``;
* the ESS model (``model.EssLlamaForCausalLM`` and friends) runs, inside vLLM's forward
  context, the step of every ESS request: the reference controller
  (``safekern.reference.controller``: windows, verdict, forced tokens — the same code
  ``safekern.generate`` runs), and one [CLS] row per evaluating request through every layer —
  appended to the token rows of vLLM's decoder stack (``fused_forward``) or in a pass of its own
  after vLLM's forward (``cls_pass``) — reading that request's window keys/values from vLLM's
  paged KV cache.

Nothing here imports vLLM at module level; the forward context is read through the two small
functions at the bottom. Positions: the state is kept in safekern's layout (docs/DESIGN.md §2:
[CLS] at index 0, so ``P``, ``t``, windows count it), and vLLM's sequence has no [CLS], so a
safekern index ``j >= 1`` is vLLM position ``j - 1``.
"""
from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ...reference.controller import forced_tokens, plan_step, update_state
from ...spec import BENIGN, NEVER, PENDING, REFUSING, EssConfig, EssState

# Fields of EssState kept per request as Python ints between steps.
_STATE_FIELDS = ("mode", "flags", "switch_step", "next_eval", "interval", "forced_idx",
                 "trigger_step")
_ACTIONS = {"low": "record", "medium": "refusal_prefix", "high": "refusal_stop"}
MAX_TRACES = 10000   # traces kept in the worker (oldest dropped)
MAX_PARKED = 4096    # requests kept after leaving the batch (preempted ones come back)


@dataclass
class Layout:
    """Where a vLLM prompt's query and response sit, in safekern indices ([CLS] = 0)."""

    prompt_len: int      # P: the response (prefilled assistant text included) starts here
    query_start: int
    query_end: int


def prompt_layout(ids: List[int], prefix_ids: List[int], suffix_ids: List[int],
                  bos_id: Optional[int]) -> Layout:
    """The layout of a vLLM prompt (token ids, no [CLS]).

    A chat prompt is ``prefix + query + suffix [+ prefilled assistant text]`` (vLLM's
    ``continue_final_message``): the query is what lies between the template prefix and the
    *last* occurrence of the suffix (the generation prompt), the response starts after it.
    Anything else counts as untemplated: the query is every token after a leading BOS and the
    response starts after the prompt — exactly ``safekern.safety.encode_token_ids``.
    """
    n = len(ids)
    qs = len(prefix_ids) if prefix_ids and ids[:len(prefix_ids)] == prefix_ids else None
    if qs is not None and suffix_ids:
        m = len(suffix_ids)
        for j in range(n - m, qs - 1, -1):
            if ids[j:j + m] == suffix_ids:
                return Layout(j + m + 1, qs + 1, j + 1)
    start = 1 if bos_id is not None and n and ids[0] == bos_id else 0
    return Layout(n + 1, start + 1, n + 1)


@dataclass
class Request:
    """One ESS request in the persistent batch (or parked while preempted)."""

    ess: EssConfig
    layout: Layout
    n_prompt: int                 # len(prompt_token_ids) as vLLM holds them
    output: list                  # vLLM's live list of this request's output token ids
    refusal_ids: List[int]
    refusal_skip: int
    eos_id: Optional[int]
    trace_id: Optional[str] = None
    mode: int = PENDING
    flags: int = 0
    switch_step: int = -1
    next_eval: int = 0
    interval: int = 1
    forced_idx: int = -1
    trigger_step: int = -1
    finished: bool = False
    force: Optional[int] = None   # the token apply() forces at this step (None = free)
    trace: dict = field(default_factory=lambda: {"eval_steps": [], "eval_lengths": [],
                                                 "p_unsafe": [], "trigger_step": None,
                                                 "action": None})

    def __post_init__(self):
        self.interval, self.next_eval = self.ess.anneal_start, self.ess.first_at


class Batch:
    """vLLM's persistent batch as the logits processor last saw it: row -> Request."""

    def __init__(self):
        self.rows: Dict[int, Request] = {}
        # Requests that left the batch without finishing (preemption) come back with the same
        # output list: keyed by id() of that list, which stays alive while it is held here.
        self.parked: "collections.OrderedDict[int, Request]" = collections.OrderedDict()
        self.traces: "collections.OrderedDict[str, dict]" = collections.OrderedDict()

    def remove(self, row: int):
        req = self.rows.pop(row, None)
        if req is not None:
            self.parked[id(req.output)] = req
            self.save(req)
            while len(self.parked) > MAX_PARKED:
                self.parked.popitem(last=False)

    def unpark(self, output: list) -> Optional[Request]:
        req = self.parked.pop(id(output), None)
        return req if req is not None and req.output is output else None

    def move(self, a: int, b: int, swap: bool):
        ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
        if ra is not None:
            self.rows[b] = ra
        if swap and rb is not None:
            self.rows[a] = rb

    def save(self, req: Request):
        """Write the trace to ``$SAFEKERN_VLLM_TRACE_DIR/<trace_id>.json`` when the operator set
        that directory (the channel that also works behind ``vllm serve``); rewritten at every
        verdict of a traced request and when it leaves the batch."""
        d = os.environ.get("SAFEKERN_VLLM_TRACE_DIR")
        if d and req.trace_id is not None:
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in req.trace_id)
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, name[:200] + ".json")
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"trace_id": req.trace_id, **req.trace,
                           "output_len": len(req.output)}, f)
            os.replace(tmp, path)     # a reader never sees a half-written file

    def record(self, req: Request):
        if req.trace_id is not None:
            self.traces[req.trace_id] = req.trace
            self.traces.move_to_end(req.trace_id)
            while len(self.traces) > MAX_TRACES:
                self.traces.popitem(last=False)
            self.save(req)


def _log():
    import logging

    return logging.getLogger("safekern.vllm")


BATCH = Batch()
MODEL = None   # the ESS model of this process (set when vLLM builds it)


# ---------------------------------------------------------------- controller
def _pack(reqs: List[Request], seq_len: List[int]) -> EssState:
    """A batched EssState over requests that share one EssConfig (and refusal ids)."""
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    r0 = reqs[0]
    kw = {f: i32([getattr(r, f) for r in reqs]) for f in _STATE_FIELDS}
    return EssState(prompt_len=i32([r.layout.prompt_len for r in reqs]),
                    query_start=i32([r.layout.query_start for r in reqs]),
                    query_end=i32([r.layout.query_end for r in reqs]),
                    seq_len=i32(seq_len), evaluating=torch.zeros(len(reqs), dtype=torch.bool),
                    finished=torch.tensor([r.finished for r in reqs]),
                    refusal_ids=torch.tensor(r0.refusal_ids, dtype=torch.int64),
                    refusal_skip=r0.refusal_skip, **kw)


def _unpack(reqs: List[Request], st: EssState):
    cols = {f: getattr(st, f).tolist() for f in _STATE_FIELDS}
    fin = st.finished.tolist()
    for i, r in enumerate(reqs):
        for f in _STATE_FIELDS:
            setattr(r, f, cols[f][i])
        r.finished = bool(fin[i])


class Plan:
    """One step's controller work: per EssConfig group the packed state and windows, and the
    evaluating rows ``(row, t, windows)`` in the order the [CLS] rows are computed."""

    def __init__(self):
        self.groups = []          # (items [(row, req)], st, t, ev, windows)
        self.cascade = []         # (row, req, t) of planned cascade rows (escalate)
        self.rows: List[int] = []
        self.t: List[int] = []
        self.windows: List[torch.Tensor] = []

    def __bool__(self):
        return bool(self.rows)


def plan(rows: Dict[int, Request], seq_lens: List[int]) -> Plan:
    """Which ESS rows evaluate at this step, over which windows (before the forward).

    A row whose tokens are all computed after this step (``seq_lens[r] == n_prompt + outputs``)
    samples for real: it is planned, evaluated when due, and takes its forced token. Rows in a
    partial (chunked or recomputed) prefill are left untouched: vLLM discards their sample.
    """
    pl = Plan()
    groups: Dict[int, list] = {}
    for r, req in rows.items():
        req.force = None
        if r >= len(seq_lens) or seq_lens[r] != req.n_prompt + len(req.output):
            continue
        if req.finished:                      # high policy: the refusal is out, end it
            req.force = req.eos_id
            continue
        if req.mode == REFUSING and req.forced_idx < 0:
            continue                          # triggered, refusal emitted: nothing to do
        groups.setdefault(id(req.ess), []).append((r, req))
    for items in groups.values():
        t = [seq_lens[r] + 1 for r, _ in items]       # safekern t counts the [CLS]
        st = _pack([q for _, q in items], t)
        windows = plan_step(st, items[0][1].ess)
        ev = st.evaluating.tolist()
        pl.groups.append((items, st, t, ev, windows))
        for i, e in enumerate(ev):
            if e:
                pl.rows.append(items[i][0])
                pl.t.append(t[i])
                pl.windows.append(windows[i])
    return pl


def commit(pl: Plan, p_unsafe: Optional[torch.Tensor]):
    """Apply this step's verdicts (``p_unsafe`` in ``pl.rows`` order) and pick forced tokens."""
    p_of = {} if p_unsafe is None else dict(zip(pl.rows, p_unsafe.tolist()))
    bad = [r for r, v in p_of.items() if v != v]
    if bad:
        # A NaN score (e.g. a NaN weight) must not read as benign, and must not take the
        # server down with every other request: fail closed, say so in the trace and the log.
        _log().error("safekern: non-finite p_unsafe for batch rows %s: counted as unsafe", bad)
        for r in bad:
            p_of[r] = 1.0
    for items, st, t, ev, _ in pl.groups:
        reqs = [q for _, q in items]
        ess = reqs[0].ess
        if ess.schedule == "cascade":
            pl.cascade += [(r, q, t[i]) for i, (r, q) in enumerate(items)]
        p = torch.tensor([p_of.get(r, float("nan")) for r, _ in items])
        for r, q in items:
            if r in bad:
                q.trace["nonfinite"] = True
        trig = update_state(st, ess, p).tolist()
        forced, toks = forced_tokens(st, ess)
        forced, toks = forced.tolist(), toks.tolist()
        _unpack(reqs, st)
        for i, req in enumerate(reqs):
            tr = req.trace
            if ev[i]:
                tr["eval_steps"].append(len(req.output))
                tr["eval_lengths"].append(t[i] - req.layout.prompt_len)
                tr["p_unsafe"].append(float(p[i]))
            if trig[i]:
                tr["trigger_step"], tr["action"] = len(req.output), _ACTIONS[ess.policy]
            if forced[i]:
                req.force = int(toks[i])
            if ev[i] or trig[i]:
                BATCH.record(req)


def escalate(pl: Plan, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             threshold: float):
    """The cascade's screening step (``safekern.reference.controller.escalate``) after
    ``commit``: ``hidden`` holds the sampled token rows (``compute_logits``' input, one per
    batch row); a cascade request that is BENIGN and whose probe score ``sigmoid(w . h + b)``
    (fp32, as ``probe_score_ref``) is ``>= threshold`` is evaluated at its next step."""
    if not pl.cascade:
        return
    rows = torch.tensor([r for r, _, _ in pl.cascade], device=hidden.device)
    q = torch.sigmoid(hidden.index_select(0, rows).float() @ weight + bias).tolist()
    thr = torch.tensor(threshold, dtype=torch.float32).item()   # compared in float32
    for (_, req, t), qi in zip(pl.cascade, q):
        if req.mode == BENIGN and qi >= thr:
            req.next_eval = min(req.next_eval, t - req.layout.prompt_len + 1)
    pl.cascade = []


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


__all__ = ["ADAPTER_GROUPS", "AdapterDeltas", "BATCH", "Batch", "Layout", "Plan", "Request",
           "cls_pass", "commit", "forward_metadata", "fused_forward", "plan", "prompt_layout",
           "read_kv", "NEVER"]
