"""The linear layers of one decoder forward, as the engine calls them (issue 11).

``ModuleLinears`` calls the model's own modules (prefill, GPU, anything unusual).
``KernelLinears`` runs a CPU decode step's projections and MLP through
``safekern.ops.cpu_linear`` (reads each weight once for all rows, so the [CLS] row costs FMAs
rather than a second pass over the weights; q/k/v and gate/up each run as one call over the
module weights, no concatenated copies) or through MKL, per number of rows and group, whichever
measured faster on this machine. ``decode_linears`` picks one and says why.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .benchmarking import interleaved_medians
from .ops import cpu_linear


class ModuleLinears:
    """q/k/v, o and the MLP through the layers' own modules."""

    def __init__(self, layers):
        self.layers = layers

    def qkv(self, i: int, h: torch.Tensor):
        sa = self.layers[i].self_attn
        return sa.q_proj(h), sa.k_proj(h), sa.v_proj(h)

    def o(self, i: int, a: torch.Tensor) -> torch.Tensor:
        return self.layers[i].self_attn.o_proj(a)

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.layers[i].mlp(h)


def _params(linears) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    return [m.weight for m in linears], [m.bias for m in linears]


GROUPS = ("qkv", "o", "gate_up", "down")
# Calibration: per group, this many interleaved passes over every layer per path (median).
CALIBRATION_REPS = 5
MODES = ("auto", "kernel")


class KernelLinears:
    """The same layers through ``cpu_linear.linear`` or MKL (``F.linear``), chosen per number
    of rows M and per group (q/k/v, o, gate/up, down) by measurement (issue 11).

    ``mode="auto"``: the first time a decode step has M rows, each group is timed over every
    layer with both paths, interleaved (``CALIBRATION_REPS`` passes each, median), and the
    faster one is kept for that M (``plan``). On an idle machine MKL's threaded GEMV wins at
    M = 1; the kernel wins where MKL's small-M sgemm re-reads the weights per row; which M is
    which depends on the CPU, its load and the thread count, so it is measured, not assumed.
    ``mode="kernel"``: the kernel for every M up to ``cpu_linear.MAX_ROWS`` (tests, A/B).
    Above ``MAX_ROWS`` rows MKL always runs. Both paths are fp32 and within reference
    tolerance of each other; only the kernel guarantees row-independent bits."""

    def __init__(self, layers, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.act = [layer.mlp.act_fn for layer in layers]
        self.params = {
            "qkv": [_params((layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj)) for layer in layers],
            "o": [_params((layer.self_attn.o_proj,)) for layer in layers],
            "gate_up": [_params((layer.mlp.gate_proj, layer.mlp.up_proj)) for layer in layers],
            "down": [_params((layer.mlp.down_proj,)) for layer in layers],
        }
        self.plan: Dict[int, Dict[str, str]] = {}     # M -> group -> "kernel" | "mkl"
        self.calibration: Dict[int, Dict[str, Dict[str, float]]] = {}   # M -> group -> s

    @staticmethod
    def _kernel(x, params):
        lead = x.shape[:-1]
        ys = cpu_linear.linear(x.reshape(-1, x.shape[-1]), *params)
        return [y.view(*lead, y.shape[-1]) for y in ys]

    @staticmethod
    def _mkl(x, params):
        return [F.linear(x, w, b) for w, b in zip(*params)]

    def _path(self, group: str, x: torch.Tensor):
        M = x.numel() // x.shape[-1]
        if M > cpu_linear.MAX_ROWS:
            return self._mkl
        if self.mode == "kernel":
            return self._kernel
        plan = self.plan.get(M)
        if plan is None:
            plan = self._calibrate(M, x.dtype)
        return self._kernel if plan[group] == "kernel" else self._mkl

    @torch.no_grad()
    def _calibrate(self, M: int, dtype) -> Dict[str, str]:
        """Time both paths per group at ``M`` rows over all layers; record the faster."""
        times, plan = {}, {}
        gen = torch.Generator().manual_seed(M)          # leaves the global RNG alone
        for group, per_layer in self.params.items():
            K = per_layer[0][0][0].shape[1]
            x = torch.randn(M, K, dtype=dtype, generator=gen)
            fns = {name: (lambda run: lambda: [run(x, p) for p in per_layer])(run)
                   for name, run in (("kernel", self._kernel), ("mkl", self._mkl))}
            times[group] = interleaved_medians(fns, reps=CALIBRATION_REPS)
            plan[group] = min(times[group], key=times[group].get)
        self.calibration[M], self.plan[M] = times, plan
        return plan

    def qkv(self, i, h):
        return self._path("qkv", h)(h, self.params["qkv"][i])

    def o(self, i, a):
        return self._path("o", a)(a, self.params["o"][i])[0]

    def mlp(self, i, h):
        gate, up = self._path("gate_up", h)(h, self.params["gate_up"][i])
        z = self.act[i](gate) * up
        return self._path("down", z)(z, self.params["down"][i])[0]

    def describe(self) -> str:
        """The measured plan, e.g. ``M=1: mkl; M=2: kernel (o: mkl)``."""
        if self.mode == "kernel":
            return f"cpu_linear kernel for M <= {cpu_linear.MAX_ROWS}"
        parts = []
        for M in sorted(self.plan):
            plan = self.plan[M]
            common = max(set(plan.values()), key=list(plan.values()).count)
            odd = [f"{g}: {p}" for g, p in plan.items() if p != common]
            parts.append(f"M={M}: {common}" + (f" ({', '.join(odd)})" if odd else ""))
        return "; ".join(parts) or "not calibrated yet"


def _kernel_unsupported(layers, device, dtype) -> Optional[str]:
    if device.type != "cpu" or dtype != torch.float32:
        return f"the kernel is for float32 on CPU (the model is {dtype} on {device.type})"
    for layer in layers:
        sa, mlp = layer.self_attn, layer.mlp
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                return f"the MLP ({type(mlp).__name__}) is not gate/up/down + act_fn"
        mods = [sa.q_proj, sa.k_proj, sa.v_proj, sa.o_proj, mlp.gate_proj, mlp.up_proj,
                mlp.down_proj]
        for m in mods:
            if type(m) is not torch.nn.Linear:
                return f"a projection is a {type(m).__name__}, not a plain nn.Linear"
            if not m.weight.is_contiguous() or (m.bias is not None and
                                                not m.bias.is_contiguous()):
                return "a projection weight is not contiguous"
    return cpu_linear.unavailable_reason()


def decode_linears(layers, device: torch.device, dtype: torch.dtype, enabled: bool = True,
                   mode: str = "auto"):
    """``(linears for decode steps, None or why the CPU kernel is not used)``; ``mode`` as in
    ``KernelLinears``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    reason = "disabled by the caller" if not enabled else \
        _kernel_unsupported(layers, device, dtype)
    if reason is None:
        return KernelLinears(layers, mode), None
    return ModuleLinears(layers), reason
