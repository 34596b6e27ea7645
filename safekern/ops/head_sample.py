"""Fused head + safety + sampling step (DESIGN.md §5): validation, dispatch, public function.

The math is defined by ``safekern.reference.head_sample_ref``; fast kernels register
themselves as backends of the ``"head_sample"`` op.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch

from .._checks import FLOAT_DTYPES, check_finite, check_tensor, value_checks_enabled
from ..reference.sampling import head_sample_ref
from ..spec import EssConfig, EssState, SamplingParams
from . import dispatch

OP = "head_sample"


def _torch_backend(h_tok, lm_head_weight, *, h_cls, safety_weight, safety_bias, state, ess,
                   sampling, generator):
    return head_sample_ref(h_tok, lm_head_weight, h_cls=h_cls, safety_weight=safety_weight,
                           safety_bias=safety_bias, state=state, ess=ess, sampling=sampling,
                           generator=generator)


dispatch.register(OP, "torch", _torch_backend, lambda **ctx: None)

# Weights are checked for NaN/inf once per (tensor, in-place version), not on every step.
# Keyed by id() with a weak reference, since tensors do not hash by identity in weak dicts.
_checked_weights: Dict[int, Tuple["weakref.ref[torch.Tensor]", int]] = {}


def _check_weight_finite(name: str, w: torch.Tensor):
    if not value_checks_enabled():
        return
    ref, version = _checked_weights.get(id(w), (None, -1))
    if ref is not None and ref() is w and version == w._version:
        return
    check_finite(name, w)
    _checked_weights[id(w)] = (weakref.ref(w, lambda _, k=id(w): _checked_weights.pop(k, None)),
                               w._version)


def _validate(h_tok, lm_head_weight, h_cls, safety_weight, safety_bias, state, ess, sampling,
              generator):
    check_tensor("h_tok", h_tok, dims=2, dtypes=FLOAT_DTYPES)
    dev, (B, Dm) = h_tok.device, h_tok.shape
    check_tensor("lm_head_weight", lm_head_weight, dims=2, dtypes=(h_tok.dtype,), device=dev,
                 shape=(None, Dm))
    if lm_head_weight.shape[0] == 0:
        raise ValueError("lm_head_weight must have at least one row (vocab size 0)")
    check_finite("h_tok", h_tok)
    _check_weight_finite("lm_head_weight", lm_head_weight)
    if h_cls is not None:
        check_tensor("h_cls", h_cls, dtypes=(h_tok.dtype,), device=dev, shape=(B, Dm))
        if safety_weight is None:
            raise ValueError("safety_weight is required when h_cls is given")
        check_tensor("safety_weight", safety_weight, dtypes=FLOAT_DTYPES, device=dev)
        if tuple(safety_weight.shape) not in ((Dm,), (2, Dm)):
            raise ValueError(f"safety_weight must have shape ({Dm},) or (2, {Dm}), got "
                             f"{tuple(safety_weight.shape)}")
        _check_weight_finite("safety_weight", safety_weight)
        if isinstance(safety_bias, torch.Tensor):
            want = ((), (1,)) if safety_weight.dim() == 1 else ((2,),)
            if tuple(safety_bias.shape) not in want or safety_bias.device != dev:
                raise ValueError(f"safety_bias must be a tensor of shape {want[0]} on {dev}, got "
                                 f"{tuple(safety_bias.shape)} on {safety_bias.device}")
            _check_weight_finite("safety_bias", safety_bias)
        elif safety_bias is not None and not isinstance(safety_bias, (int, float)):
            raise TypeError(f"safety_bias must be a float or tensor, got {type(safety_bias)}")
        elif safety_weight.dim() == 2 and safety_bias is not None:
            raise ValueError("a (2, Dm) safety_weight needs a (2,) tensor safety_bias")
    elif safety_weight is not None:
        raise ValueError("safety_weight given without h_cls: pass the [CLS] hidden states")
    if state is not None:
        if not isinstance(state, EssState):
            raise TypeError(f"state must be an EssState, got {type(state).__name__}")
        if not isinstance(ess, EssConfig):
            raise TypeError("ess (an EssConfig) is required when state is given")
        if h_cls is None:
            raise ValueError("state is given but h_cls is None: the [CLS] hidden states of the "
                             "evaluating rows are required")
        state.validate(B, dev)
        if value_checks_enabled() and bool((state.evaluating & ~torch.isfinite(h_cls).all(1)).any()):
            raise ValueError("h_cls contains NaN or inf in a row that evaluates this step")
    elif ess is not None and not isinstance(ess, EssConfig):
        raise TypeError(f"ess must be an EssConfig, got {type(ess).__name__}")
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    for name in ("temperature", "top_k", "top_p", "min_p"):
        x = getattr(sampling, name)
        if isinstance(x, torch.Tensor) and (x.shape != (B,) or x.device != dev):
            raise ValueError(f"sampling.{name} as a tensor must have shape ({B},) on {dev}, got "
                             f"{tuple(x.shape)} on {x.device}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != dev.type:
            raise ValueError(f"generator is on {generator.device}, inputs on {dev}")


def head_sample(
    h_tok: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    h_cls: Optional[torch.Tensor] = None,
    safety_weight: Optional[torch.Tensor] = None,
    safety_bias=None,
    state: Optional[EssState] = None,
    ess: Optional[EssConfig] = None,
    sampling: SamplingParams = SamplingParams(),
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and safety scores from the last hidden states of a decode step.

    Order: safety score -> ESS state update -> refusal-prefix token or
    temperature -> top-k -> top-p -> min-p -> sample (greedy when temperature is 0).

    Args:
        h_tok: ``(B, Dm)`` hidden states of the token rows (after the final norm).
        lm_head_weight: ``(V, Dm)``, same dtype and device as ``h_tok``.
        h_cls: ``(B, Dm)`` [CLS] hidden states; only rows in ``state.evaluating`` are read
            (all rows when ``state`` is None).
        safety_weight, safety_bias: ``(Dm,)`` + float/0-d tensor (sigmoid head) or
            ``(2, Dm)`` + ``(2,)`` (two-class head; class 1 = unsafe).
        state: the batched ``EssState``, updated in place (requires ``ess`` and ``h_cls``).
        ess: the ``EssConfig`` (threshold, tau, policy, schedule).
        sampling: ``SamplingParams`` with scalar or ``(B,)`` per-row parameters.
        generator: a ``torch.Generator`` on the inputs' device (else ``sampling.seed``).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"cuda"``.

    Returns:
        ``next_tokens (B,) int64`` and ``p_unsafe (B,) float32`` (NaN where not evaluated).

    Raises ``ValueError`` for NaN/inf in ``h_tok``, in the weights (checked once per weight
    version) or in ``h_cls`` rows that evaluate.
    """
    _validate(h_tok, lm_head_weight, h_cls, safety_weight, safety_bias, state, ess, sampling,
              generator)
    _, fn = dispatch.choose(OP, backend, device=h_tok.device, dtype=h_tok.dtype,
                            batch=h_tok.shape[0], vocab=lm_head_weight.shape[0],
                            hidden=h_tok.shape[1], sampling=sampling)
    return fn(h_tok, lm_head_weight, h_cls=h_cls, safety_weight=safety_weight,
              safety_bias=safety_bias, state=state, ess=ess, sampling=sampling,
              generator=generator)


__all__ = ["head_sample"]
