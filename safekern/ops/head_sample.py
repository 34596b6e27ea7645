"""Fused head + safety + sampling step (docs/DESIGN.md §5): validation, dispatch, public function.

The math is defined by ``safekern.reference.head_sample_ref``; fast kernels register
themselves as backends of the ``"head_sample"`` op: the Triton kernels and their launcher live
in ``head_sample_triton.py`` (registered here), the CUDA ones in ``cuda_backend.py``.
``raise_non_finite`` (the kernels' NaN/inf flags) is re-exported from ``head_sample_triton``.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, Optional, Tuple

import torch

from .._checks import FLOAT_DTYPES, check_finite, check_tensor, value_checks_enabled
from ..reference.sampling import head_sample_ref
from ..spec import EssConfig, EssState, SamplingParams
from . import dispatch
from . import head_sample_triton as _triton
from .head_sample_triton import raise_non_finite

OP = "head_sample"


def _torch_backend(h_tok, lm_head_weight, *, h_cls, safety_weight, safety_bias, state, ess,
                   sampling, generator, rng_state=None, probe_weight=None, probe_bias=None,
                   probe_threshold=None, probe_out=None):
    if rng_state is not None and generator is None:
        # The reference reads rng_state on the host (a sync); the Triton backend does not.
        seed, offset = (int(v) for v in rng_state.tolist())
        generator = torch.Generator(device=h_tok.device).manual_seed(
            (seed * 0x9E3779B1 + offset) % 2**63)
    return head_sample_ref(h_tok, lm_head_weight, h_cls=h_cls, safety_weight=safety_weight,
                           safety_bias=safety_bias, state=state, ess=ess, sampling=sampling,
                           generator=generator, probe_weight=probe_weight, probe_bias=probe_bias,
                           probe_threshold=probe_threshold, probe_out=probe_out)


dispatch.register(OP, "torch", _torch_backend, lambda **ctx: None)

if _triton.triton is not None:
    dispatch.register(OP, "triton", _triton.head_sample_triton, _triton._triton_can_run)

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


def _validate_probe(h_tok, state, ess, probe_weight, probe_bias, probe_threshold, probe_out):
    """The cascade's probe arguments: all or none, a ``(Dm,)`` weight, a finite scalar bias, a
    threshold in [0, 1]; schedule ``"cascade"`` needs them."""
    cascade = isinstance(ess, EssConfig) and ess.schedule == "cascade"
    if probe_weight is None:
        if probe_bias is not None or probe_threshold is not None or probe_out is not None:
            raise ValueError("probe_bias / probe_threshold / probe_out given without "
                             "probe_weight")
        if cascade and state is not None:
            raise ValueError("ess.schedule='cascade' needs the screening probe: pass "
                             "probe_weight, probe_bias and probe_threshold (a delta with a probe)")
        return
    dev, (B, Dm) = h_tok.device, h_tok.shape
    check_tensor("probe_weight", probe_weight, dtypes=FLOAT_DTYPES, device=dev, shape=(Dm,))
    _check_weight_finite("probe_weight", probe_weight)
    if isinstance(probe_bias, torch.Tensor):
        if tuple(probe_bias.shape) not in ((), (1,)) or probe_bias.device != dev:
            raise ValueError(f"probe_bias must be a 0-d tensor on {dev}, got "
                             f"{tuple(probe_bias.shape)} on {probe_bias.device}")
        _check_weight_finite("probe_bias", probe_bias)
    elif isinstance(probe_bias, bool) or not isinstance(probe_bias, (int, float)) or \
            not math.isfinite(probe_bias):
        raise TypeError(f"probe_bias must be a finite float or 0-d tensor, got {probe_bias!r}")
    if isinstance(probe_threshold, bool) or not isinstance(probe_threshold, (int, float)) or \
            not 0.0 <= probe_threshold <= 1.0:
        raise ValueError(f"probe_threshold must be a float in [0, 1], got {probe_threshold!r}")
    if state is None:
        raise ValueError("probe_weight is given without state: the probe only schedules "
                         "evaluations of an EssState")
    if probe_out is not None:
        check_tensor("probe_out", probe_out, dtypes=(torch.float32,), device=dev, shape=(B,))


def _validate(h_tok, lm_head_weight, h_cls, safety_weight, safety_bias, state, ess, sampling,
              generator, rng_state=None):
    check_tensor("h_tok", h_tok, dims=2, dtypes=FLOAT_DTYPES)
    dev, (B, Dm) = h_tok.device, h_tok.shape
    if Dm == 0:
        raise ValueError(f"h_tok must have a hidden size >= 1, got shape {tuple(h_tok.shape)}")
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
    if rng_state is not None:
        check_tensor("rng_state", rng_state, dtypes=(torch.int64,), device=dev, shape=(2,))
    V = lm_head_weight.shape[0]
    if sampling.logprobs is not None and sampling.logprobs > V:
        raise ValueError(f"sampling.logprobs asks for the top {sampling.logprobs} tokens, more "
                         f"than the vocabulary size {V}")


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
    rng_state: Optional[torch.Tensor] = None,
    probe_weight: Optional[torch.Tensor] = None,
    probe_bias=None,
    probe_threshold: Optional[float] = None,
    probe_out: Optional[torch.Tensor] = None,
):
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
        generator: a ``torch.Generator`` on the inputs' device (else ``rng_state``, else
            ``sampling.seed``, else torch's default generator). The Triton backend draws its
            Philox seed from it on the device (one tiny launch, no host sync).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"cuda"``.
        rng_state: optional ``(2,)`` int64 tensor ``[seed, offset]`` on the inputs' device,
            read by the kernel (CUDA-graph safe); the caller advances ``offset`` between steps.
            Same ``[seed, offset]`` -> same tokens.
        probe_weight, probe_bias, probe_threshold: the cascade's token-row screening probe
            (``(Dm,)`` weight, float or 0-d bias, threshold in [0, 1]; required with
            ``ess.schedule == "cascade"``): ``sigmoid(h_tok . w + b)`` per row, and a BENIGN
            row that did not evaluate this step and scores ``>= probe_threshold`` is evaluated
            at the next step (``reference.controller.escalate``, after the state update).
        probe_out: optional ``(B,)`` float32 tensor that receives the probe scores.

    Returns:
        ``next_tokens (B,) int64`` and ``p_unsafe (B,) float32`` (NaN where not evaluated).
        When ``sampling.logprobs`` is not None, a third element ``Logprobs(token, top_ids,
        top)``: ``(B,)`` fp32 logprob of each emitted token (a forced refusal token included)
        and the ``(B, k)`` top-k ids/logprobs, from ``log_softmax(logits / T)`` (raw logits
        for greedy rows) before top-k/top-p/min-p filtering. The torch and triton backends
        compute them (triton: fused into its two launches for k = 0); cuda declines.

    Raises ``ValueError`` for NaN/inf in ``h_tok``, in the weights (checked once per weight
    version) or in ``h_cls`` rows that evaluate, and, after the step, for NaN/inf logits or a
    NaN score of an evaluating row (a weight changed in place through ``.data`` keeps its
    version): no token is drawn from NaN logits and no NaN verdict reads as benign. The
    torch backend always checks the logits it computes (it reads values on the host anyway);
    the Triton and CUDA kernels flag rows on the device (one compare per logit, no extra pass),
    read once after the launch, or not at all with value checks off
    (``SAFEKERN_SKIP_VALUE_CHECKS=1``, ``no_value_checks()``, CUDA-graph capture): then tokens
    stay in ``[0, V)`` and a NaN score counts as benign. The engine reads their flags once per
    ``generate``.
    """
    _validate(h_tok, lm_head_weight, h_cls, safety_weight, safety_bias, state, ess, sampling,
              generator, rng_state)
    _validate_probe(h_tok, state, ess, probe_weight, probe_bias, probe_threshold, probe_out)
    _, fn = dispatch.choose(OP, backend, device=h_tok.device, dtype=h_tok.dtype,
                            batch=h_tok.shape[0], vocab=lm_head_weight.shape[0],
                            hidden=h_tok.shape[1], sampling=sampling,
                            probe=probe_weight is not None)
    probe = {} if probe_weight is None else dict(
        probe_weight=probe_weight, probe_bias=probe_bias, probe_threshold=float(probe_threshold),
        probe_out=probe_out)
    return fn(h_tok, lm_head_weight, h_cls=h_cls, safety_weight=safety_weight,
              safety_bias=safety_bias, state=state, ess=ess, sampling=sampling,
              generator=generator, **({} if rng_state is None else {"rng_state": rng_state}),
              **probe)


__all__ = ["head_sample", "raise_non_finite"]
