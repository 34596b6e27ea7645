"""The cascade's screening probe (docs/DESIGN.md §4, §9; issue 27).

A linear probe on the token row's final hidden state (the normed LM-head input ``h_tok``),
``sigmoid(h_tok . w + b)``: one dot product per row per step, computed where the step's token
is drawn. Under ``EssConfig(schedule="cascade")`` a BENIGN sequence gets a [CLS] evaluation only
at the step after its probe score reaches ``threshold`` (``reference.controller.escalate``).

The probe is part of the safety delta: ``probe.weight`` ``(hidden,)`` and ``probe.bias`` ``()``
in ``safety.safetensors``, ``{"threshold": ..., ...}`` under ``"probe"`` in ``safety.json``
(format version 3; older deltas load without a probe). Fitting: ``safekern.training.probe_fit``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

PROBE_TENSORS = ("probe.weight", "probe.bias")


class SafetyProbe(nn.Module):
    """``sigmoid(h . weight + bias)`` on token rows, and the screening ``threshold``.

    Attributes:
        weight: ``(hidden,)``; bias: ``()``; threshold: a float in [0, 1] (a score ``>=`` it
            escalates); info: what the fit recorded (recall, escalation rate, data), saved in
            ``safety.json``.
    """

    def __init__(self, hidden: int, threshold: float = 0.5, info: Optional[Dict] = None):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
        self.weight = nn.Parameter(torch.zeros(hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.threshold = _check_threshold("threshold", threshold)
        self.info = dict(info or {})

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Probe scores ``(...,)`` float32 of hidden states ``h (..., hidden)``."""
        return torch.sigmoid(h.float() @ self.weight.float() + self.bias.float())

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The delta's probe tensors, by name."""
        return {"probe.weight": self.weight.detach(), "probe.bias": self.bias.detach()}

    def meta(self) -> Dict:
        """The delta's ``safety.json`` record."""
        return {"threshold": self.threshold, **self.info}


def _check_threshold(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    return float(value)


def probe_of(model) -> Optional[SafetyProbe]:
    """The model's screening probe, or None (a delta without one)."""
    p = getattr(model, "safety_probe", None)
    return p if isinstance(p, SafetyProbe) else None


def set_probe(model, probe: Optional[SafetyProbe]) -> None:
    """Attach ``probe`` to an attached ``model`` (None removes it); it moves to the model's
    device."""
    if probe is not None and not isinstance(probe, SafetyProbe):
        raise TypeError(f"probe must be a SafetyProbe or None, got {type(probe).__name__}")
    if getattr(model, "safekern", None) is None:
        raise ValueError("set_probe needs a model with safekern.attach (or load_safety) applied")
    if probe is not None:
        hidden = model.get_input_embeddings().weight.shape[1]
        if probe.weight.shape != (hidden,):
            raise ValueError(f"probe.weight has shape {tuple(probe.weight.shape)}, the model's "
                             f"hidden size is {hidden}")
        probe = probe.to(model.get_input_embeddings().weight.device)
    model.safety_probe = probe


def probe_params(model, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """``(weight, bias, threshold)`` of the model's probe with ``weight``/``bias`` in the
    score's compute dtype (float64 for float64 models, else float32: ``probe_score_ref``'s
    operands). Raises ValueError naming the fix when the delta has no probe."""
    p = probe_of(model)
    if p is None:
        raise ValueError("schedule='cascade' needs a delta with a screening probe, and this "
                         "model's has none: fit one with `safekern train --model NAME "
                         "--probe-only` (safekern.training.probe_fit.fit_probe_for_delta) or use "
                         "another schedule")
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return p.weight.detach().to(cd), p.bias.detach().to(cd), p.threshold


def check_probe_meta(meta, path: str, version: int) -> None:
    """``safety.json``'s ``"probe"`` record: an object with a threshold in [0, 1]."""
    if meta is None:
        return
    if version < 3:
        raise ValueError(f"{path}: 'probe' needs format version 3, the file says {version}")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: 'probe' must be a JSON object, got {meta!r}")
    try:
        _check_threshold("threshold", meta.get("threshold"))
    except ValueError as e:
        raise ValueError(f"{path}: 'probe': {e}") from e


def probe_shapes(hidden: int) -> Dict[str, Tuple[int, ...]]:
    """The probe tensors' shapes in ``safety.safetensors``."""
    return {"probe.weight": (hidden,), "probe.bias": ()}


def probe_from(tensors: Dict[str, torch.Tensor], meta: Dict, hidden: int) -> SafetyProbe:
    """A ``SafetyProbe`` from checked delta tensors and its ``safety.json`` record."""
    info = {k: v for k, v in meta.items() if k != "threshold"}
    p = SafetyProbe(hidden, meta["threshold"], info)
    with torch.no_grad():
        p.weight.copy_(tensors["probe.weight"])
        p.bias.copy_(tensors["probe.bias"])
    return p


__all__ = ["SafetyProbe", "probe_of", "set_probe", "probe_params", "PROBE_TENSORS"]
