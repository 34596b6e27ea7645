"""The linear layers of one decoder forward, as the engine calls them (issue 11).

``ModuleLinears`` calls the model's own modules (prefill, GPU, anything unusual).
``KernelLinears`` runs a CPU decode step's projections and MLP through
``safekern.ops.cpu_linear``, which reads each weight once for all rows, so the [CLS] row costs
FMAs rather than a second pass over the weights; q/k/v and gate/up each run as one call over the
module weights (no concatenated copies). ``decode_linears`` picks one and says why.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

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


class KernelLinears:
    """The same layers through ``cpu_linear.linear`` (fp32 CPU, up to ``MAX_ROWS`` rows;
    more rows fall back to the modules, where MKL's sgemm is efficient)."""

    def __init__(self, layers):
        self.modules = ModuleLinears(layers)
        self.act = [layer.mlp.act_fn for layer in layers]
        self.qkv_p = [_params((layer.self_attn.q_proj, layer.self_attn.k_proj,
                               layer.self_attn.v_proj))
                      for layer in layers]
        self.o_p = [_params((layer.self_attn.o_proj,)) for layer in layers]
        self.gate_up_p = [_params((layer.mlp.gate_proj, layer.mlp.up_proj)) for layer in layers]
        self.down_p = [_params((layer.mlp.down_proj,)) for layer in layers]

    @staticmethod
    def _run(x, params):
        lead = x.shape[:-1]
        ys = cpu_linear.linear(x.reshape(-1, x.shape[-1]), *params)
        return [y.view(*lead, y.shape[-1]) for y in ys]

    @staticmethod
    def _fits(x) -> bool:
        return x.numel() // x.shape[-1] <= cpu_linear.MAX_ROWS

    def qkv(self, i, h):
        return self._run(h, self.qkv_p[i]) if self._fits(h) else self.modules.qkv(i, h)

    def o(self, i, a):
        return self._run(a, self.o_p[i])[0] if self._fits(a) else self.modules.o(i, a)

    def mlp(self, i, h):
        if not self._fits(h):
            return self.modules.mlp(i, h)
        gate, up = self._run(h, self.gate_up_p[i])
        return self._run(self.act[i](gate) * up, self.down_p[i])[0]


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


def decode_linears(layers, device: torch.device, dtype: torch.dtype, enabled: bool = True):
    """``(linears for decode steps, None or why the CPU kernel is not used)``."""
    reason = "disabled by the caller" if not enabled else \
        _kernel_unsupported(layers, device, dtype)
    if reason is None:
        return KernelLinears(layers), None
    return ModuleLinears(layers), reason
