"""The [CLS] adapter: a trainable path of the [CLS] row's own (docs/DESIGN.md §9).

Per decoder layer, low-rank deltas ``y += s * (x @ A) @ B`` (rank ``r``, ``s = alpha / r``) on
some of the q, k, v, o, gate, up and down projections, added to the **[CLS] rows only**, and a
[CLS] input embedding of its own (the embedding matrix's [CLS] row is left alone: with tied
embeddings it is also the LM head's [CLS] row, which every token row's softmax reads). With
``response_sees_cls=False`` no token row reads the [CLS] key, so token rows compute the base
model's values bit for bit whether the adapter is there or not (tested); the [CLS] row becomes a
small classifier that reads every layer's K/V through its own adapted projections.

``AdaptedLinears`` wraps the linears of one forward (``safekern.ops.cpu.decode_linear``: the model's
modules or the CPU kernels) and adds the deltas to one column of ``(B, L, .)`` inputs — the
[CLS] column of a prefill (0) or a fused decode step (1) — or to every row (the training
recipe's [CLS]-only forward). The base projections run as before, for all rows together, so a
CPU step still reads each weight once; the delta is two thin matmuls on the [CLS] rows after.
On a CPU in fp32 without autograd, one C++ call per projection group adds the deltas of all its
targets (``cpu_adapter.cpp``: ~42 small torch ops per layer were ~10 ms of a SmolLM2 step); the
torch path is its reference and runs everywhere else.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
# The projection groups that share an input (one C++ delta call each).
_QKV, _O, _GATE_UP, _DOWN = _ATTN[:3], ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)


def _module(layer, target: str) -> nn.Module:
    owner = layer.self_attn if target in _ATTN else layer.mlp
    mod = getattr(owner, target, None)
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"the [CLS] adapter targets {target!r}, but the decoder layer has no "
                         f"nn.Linear of that name ({type(owner).__name__})")
    return mod


def adapter_shapes(layers, targets: Sequence[str], rank: int) -> Dict[str, Tuple[int, ...]]:
    """``{tensor name: shape}`` of an adapter over ``layers``: ``A`` is ``(in, r)``, ``B``
    ``(r, out)`` per layer and target (the names ``save_safety`` writes)."""
    out = {"adapter.cls_embedding": (layers[0].self_attn.q_proj.in_features,)}
    for i, layer in enumerate(layers):
        for t in targets:
            m = _module(layer, t)
            out[f"adapter.{i}.{t}.A"] = (m.in_features, rank)
            out[f"adapter.{i}.{t}.B"] = (rank, m.out_features)
    return out


def check_targets(targets: Iterable[str]) -> Tuple[str, ...]:
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if not targets or bad or len(set(targets)) != len(targets):
        raise ValueError(f"adapter targets must be distinct names from {TARGETS}, got "
                         f"{list(targets)}")
    return tuple(t for t in TARGETS if t in targets)          # canonical order


def check_meta(meta, where: str) -> Tuple[int, float, Tuple[str, ...]]:
    """``(rank, alpha, targets)`` of a delta's ``"adapter"`` record (``safety.json``, the vLLM
    checkpoint's too); every error starts with ``where`` (the file)."""
    if not isinstance(meta, dict) or set(meta) != {"rank", "alpha", "targets"}:
        raise ValueError(f"{where}: 'adapter' must be an object with rank, alpha and targets, "
                         f"got {meta!r}")
    rank, alpha = meta["rank"], meta["alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: adapter 'rank' must be an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{where}: adapter 'alpha' must be a positive number, got {alpha!r}")
    try:
        targets = check_targets(meta["targets"] if isinstance(meta["targets"], list)
                                else [meta["targets"]])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return rank, float(alpha), targets


class ClsAdapter(nn.Module):
    """Low-rank deltas for the [CLS] row of every decoder layer.

    Args:
        layers: the model's decoder layers (their projection sizes fix the shapes).
        rank: ``r >= 1``; alpha: the scale is ``alpha / rank``.
        targets: projection names from ``TARGETS`` (default all seven).

    ``A`` starts random (``1/sqrt(in)``), ``B`` at zero: a fresh adapter is the identity.
    """

    def __init__(self, layers, rank: int, alpha: float, targets: Sequence[str] = TARGETS,
                 embedding: Optional[torch.Tensor] = None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        self.rank, self.alpha, self.targets = rank, float(alpha), check_targets(targets)
        self.scale = self.alpha / rank
        self.num_layers = len(layers)
        ref = layers[0].self_attn.q_proj.weight
        hidden = layers[0].self_attn.q_proj.in_features
        emb = torch.zeros(hidden) if embedding is None else embedding.detach()
        if tuple(emb.shape) != (hidden,):
            raise ValueError(f"embedding must have shape ({hidden},), got {tuple(emb.shape)}")
        self.embedding = nn.Parameter(emb.to(device=ref.device, dtype=ref.dtype).clone())
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self._index: Dict[Tuple[int, str], int] = {}
        for name, shape in adapter_shapes(layers, self.targets, rank).items():
            if name == "adapter.cls_embedding":
                continue
            _, i, t, ab = name.split(".")
            if ab == "A":
                self._index[(int(i), t)] = len(self.A)
                w = torch.randn(shape, device=ref.device, dtype=ref.dtype) * shape[0] ** -0.5
                self.A.append(nn.Parameter(w))
            else:
                self.B.append(nn.Parameter(torch.zeros(shape, device=ref.device,
                                                       dtype=ref.dtype)))
        # (layer, target) -> (A, B) without ParameterList's per-index cost (the CPU decode
        # step asks 7 x layers times per step); the same Parameter objects.
        self._factors = {key: (self.A[j], self.B[j]) for key, j in self._index.items()}

    def delta(self, i: int, target: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``s * (x @ A) @ B`` of layer ``i``'s ``target``; None where it is not adapted."""
        j = self._index.get((i, target))
        if j is None:
            return None
        return (x @ self.A[j]) @ self.B[j] * self.scale

    def factors(self, i: int, target: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(A, B)`` of layer ``i``'s ``target`` (the Parameters), None where it is not adapted."""
        return self._factors.get((i, target))

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The delta's tensors by their ``safety.safetensors`` names."""
        out = {"adapter.cls_embedding": self.embedding}
        for (i, t), j in self._index.items():
            out[f"adapter.{i}.{t}.A"] = self.A[j]
            out[f"adapter.{i}.{t}.B"] = self.B[j]
        return out

    @torch.no_grad()
    def load_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        for name, p in self.tensors().items():
            p.copy_(tensors[name].to(p))

    def meta(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


class AdaptedLinears:
    """``linears`` (``ModuleLinears`` / ``KernelLinears``) plus the adapter's deltas on the
    [CLS] rows: column ``col`` of ``(B, L, .)`` inputs from row ``row0`` on (the compact decode
    step puts the [CLS] rows after the B token rows: ``col=0, row0=B``), or every row when
    ``col`` is None.

    Token rows go through ``linears`` untouched (the delta is added to a copy-free slice of
    the [CLS] column only), so their values are bitwise those of ``linears`` alone.
    """

    def __init__(self, linears, adapter: ClsAdapter, col: Optional[int], row0: int = 0):
        self.base, self.adapter, self.col, self.row0 = linears, adapter, col, row0
        self._cpp: Optional[bool] = None            # the C++ op is available (on first use)
        self._lists: Dict[tuple, tuple] = {}         # (layer, targets) -> adapted factors

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, L, Dm)`` (the embedded ids) with the adapter's [CLS] embedding in the [CLS]
        column, in place."""
        x[self.row0:, self.col] = self.adapter.embedding.to(x.dtype)
        return x

    def _add(self, i: int, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The reference (torch) path: ``y`` plus target's delta on the [CLS] rows."""
        if self.col is None:
            d = self.adapter.delta(i, target, x)
            return y if d is None else y + d
        d = self.adapter.delta(i, target, x[self.row0:, self.col])
        if d is not None:
            y[self.row0:, self.col] += d
        return y

    def _fast(self, x: torch.Tensor) -> bool:
        """Whether the C++ op may add deltas to this input (fp32 CPU, a [CLS] column, the
        extension built); autograd is checked per group in ``_add_group``."""
        if self.col is None or not x.is_cpu or x.dtype is not torch.float32 or \
                x.dim() != 3 or x.stride(-1) != 1:
            return False
        if self._cpp is None:
            from ..ops.cpu import linear as cpu_linear
            self._cpp = cpu_linear.unavailable_reason() is None
        return self._cpp

    def _factor_lists(self, i: int, targets: Tuple[str, ...]):
        """``(positions in targets, As, Bs)`` of the adapted targets, built once per group."""
        key = (i, targets)
        got = self._lists.get(key)
        if got is None:
            pos, As, Bs = [], [], []
            for j, t in enumerate(targets):
                ab = self.adapter.factors(i, t)
                if ab is not None:
                    pos.append(j)
                    As.append(ab[0])
                    Bs.append(ab[1])
            got = self._lists[key] = (pos, As, Bs)
        return got

    def _add_group(self, i: int, targets: Tuple[str, ...], x: torch.Tensor,
                   ys: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """``ys`` (the outputs of ``targets``, which share the input ``x``) with their deltas.
        The C++ op when it can run (this is the CPU decode step's hot path: ~120 calls a step
        on SmolLM2, so the checks are kept to a few attribute reads), else the torch path."""
        pos, As, Bs = self._factor_lists(i, targets)
        if not pos:
            return ys
        if self._fast(x) and not (torch.is_grad_enabled() and (
                x.requires_grad or any(t.requires_grad for t in As + Bs))):
            out = [ys[j] for j in pos]
            if all(y.stride(-1) == 1 and y.dim() == 3 for y in out):
                if self.row0:
                    x, out = x[self.row0:], [y[self.row0:] for y in out]
                torch.ops.safekern_cpu.adapter_add(x, self.col, out, As, Bs, self.adapter.scale)
                return ys
        return [self._add(i, t, x, y) for t, y in zip(targets, ys)]

    def qkv(self, i: int, h: torch.Tensor):
        return tuple(self._add_group(i, _QKV, h, self.base.qkv(i, h)))

    def o(self, i: int, a: torch.Tensor) -> torch.Tensor:
        return self._add_group(i, _O, a, [self.base.o(i, a)])[0]

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        gate, up = self._add_group(i, _GATE_UP, h, self.base.gate_up(i, h))
        z = self.base.act(i)(gate) * up
        return self._add_group(i, _DOWN, z, [self.base.down(i, z)])[0]


def adapter_of(model) -> Optional[ClsAdapter]:
    """The model's ``ClsAdapter`` (``model.safety_adapter``), or None (a rank-0 delta)."""
    a = getattr(model, "safety_adapter", None)
    return a if isinstance(a, ClsAdapter) else None


def with_adapter(model, linears, col: Optional[int], row0: int = 0):
    """``linears`` wrapped with the model's adapter for [CLS] column ``col`` (from row
    ``row0``); unchanged when the model has none."""
    a = adapter_of(model)
    return linears if a is None else AdaptedLinears(linears, a, col, row0)


__all__ = ["TARGETS", "ClsAdapter", "AdaptedLinears", "adapter_of", "adapter_shapes",
           "check_meta", "check_targets", "with_adapter"]
