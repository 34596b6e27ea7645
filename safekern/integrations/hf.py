"""transformers drop-in: ``attn_implementation="safekern"`` runs attention through
``safekern.ess_attention``, with no dense ``(L, L)`` mask built anywhere.

>>> from safekern.integrations.hf import register, apply_safekern
>>> register()                          # idempotent
>>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="safekern")
>>> model = apply_safekern(model)       # or switch a loaded model (same as set_attn_implementation)
>>> out = model(input_ids, attention_mask=am, response_start=rs)        # ESS metadata: kwargs

How it plugs in. ``register()`` adds ``safekern_attention`` to ``transformers.AttentionInterface``
and ``safekern_mask`` to ``transformers.masking_utils.AttentionMaskInterface``. The mask function
returns ``None`` (no padding: causal attention, bottom-right aligned to the keys) or the 2-D
boolean padding mask ``(B, Lk)`` itself. The attention function turns that mask into
``seqlens_k (B,)`` and per-row ``q_pos (B, Lq)`` (once per forward, shared by every layer) and
calls ``ess_attention`` on ``(B, H, L, D) -> (B, L, H, D)`` transposed views: no K/V copies, no
repeated KV heads for GQA.

Semantics without ESS metadata: exactly transformers' causal attention with padding (what
``sdpa``/``eager`` compute): the query at cache index ``i`` sees key ``j`` iff ``j <= i`` and
``attention_mask[b, j] == 1``.

- Right padding (docs/DESIGN.md §2, the project's layout): keys ``j < seqlens_k[b]``, the fast
  path.
- Left padding (what ``generate`` uses for decoder-only models) and the holes that right-padded
  ``generate`` leaves between prompt and new tokens: also exact. Padded keys get a large
  negative ``key_bias`` (linear memory, ``(B, 1, Lk)``) and query rows that precede every valid
  key are padding rows (``q_pos = -1``, output 0).
- Query rows at padded positions compute what sdpa computes for them (they see the valid keys
  before them); their outputs are never seen by valid rows.

ESS metadata: keyword arguments of ``model(...)`` that transformers forwards to every attention
call of Llama, Mistral and Qwen2 (and any model whose layers pass ``**kwargs`` down):

- ``response_start``: ``(B,)`` int tensor. Given => ESS mode (docs/DESIGN.md §3): normal rows see
  key 0 (the [CLS]) only from ``response_start`` on; the row at index 0 is the [CLS] row.
  Needs right padding (the [CLS] sits at index 0).
- ``cls_windows``: ``(B, W, 2)`` int ``[start, end)`` key windows of the [CLS] row.
- ``key_bias``: ``(B, Hq or 1, Lk)`` float32 added to the scaled logits; ``Lk`` is the key
  length of that forward (cached + new tokens). Shared by all layers.
- ``q_pos`` ``(B, Lq)`` / ``seqlens_k`` ``(B,)`` int: override the values derived from the
  padding mask (cache indices, ``-1`` = padding row).
- ``safekern_backend``: ``"auto"`` (default; env ``SAFEKERN_BACKEND``), ``"torch"``,
  ``"triton"``, ``"cuda"``.

These go through ``model(...)`` / ``model.model(...)`` forwards. ``model.generate`` refuses
keywords it does not know (transformers' ``_validate_model_kwargs``), so it runs plain causal
attention; ESS decoding with [CLS] re-evaluation is the job of ``safekern.runtime``.

Not supported (raises, never computes something else): dropout > 0 (training with
``attention_dropout``), logit soft-capping, attention sinks, non-causal/bidirectional or
packed-sequence masks, custom ``or``/``and`` mask overlays, prepared 4-D masks, static
(pre-allocated) caches, and a sliding window shorter than the sequence (a Mistral/Qwen2
``sliding_window`` is accepted while every sequence fits inside it, where it changes nothing).
``output_attentions`` returns ``None`` weights.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional, Tuple

import torch

from .._checks import no_value_checks
from ..ops.attention import ess_attention

ATTN_IMPLEMENTATION = "safekern"
# pyproject.toml's floor, the oldest version CI installs and tests (.ci/run).
MIN_TRANSFORMERS = "5.6.2"

# Bias that removes a padded key when the valid keys are not a prefix. Finite on purpose: a
# tile made only of such keys must keep the online softmax finite (exp(-inf - -inf) = NaN),
# and exp(-1e30 - m) underflows to exactly 0 once any real key is seen.
MASKED_KEY_BIAS = -1.0e30

_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
}
_ESS_KWARGS = ("response_start", "cls_windows", "key_bias", "q_pos", "seqlens_k")
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

_registered = False


def _transformers():
    try:
        tf = importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError("safekern.integrations.hf needs transformers: pip install "
                          f"'transformers>={MIN_TRANSFORMERS}'") from e
    from packaging.version import Version  # a dependency of transformers

    if Version(tf.__version__).release < Version(MIN_TRANSFORMERS).release:
        raise ImportError(f"safekern needs transformers>={MIN_TRANSFORMERS} (older versions call "
                          f"attention mask functions differently), found {tf.__version__}: "
                          f"pip install -U 'transformers>={MIN_TRANSFORMERS}'")
    return tf


def _masking_utils():
    _transformers()
    mu = importlib.import_module("transformers.masking_utils")
    if not hasattr(mu, "AttentionMaskInterface"):
        raise ImportError("safekern.integrations.hf needs a transformers version with "
                          f"masking_utils.AttentionMaskInterface (>= {MIN_TRANSFORMERS}): "
                          "pip install -U transformers")
    return mu


# ----------------------------------------------------------------------------- mask function

def _closure_vars(fn) -> dict:
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def _mask_kind(mask_function, mu) -> Tuple[str, Optional[int]]:
    """``("causal", None)``, ``("sliding", window)`` or ``("other", None)``.

    transformers describes a layer's mask as a composable predicate; safekern computes causal
    attention with padding, so anything else must be recognised and refused, not ignored.
    The sliding-window predicate is ``and_masks(sliding_window_overlay(w), causal)``.
    """
    if mask_function is mu.causal_mask_function:
        return "causal", None
    if getattr(mask_function, "__qualname__", "") == "and_masks.<locals>.and_mask":
        parts = _closure_vars(mask_function).get("mask_functions", ())
        if len(parts) == 2 and mu.causal_mask_function in parts:
            other = parts[0] if parts[1] is mu.causal_mask_function else parts[1]
            if getattr(other, "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask":
                return "sliding", int(_closure_vars(other)["sliding_window"])
    return "other", None


def safekern_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                  mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """``AttentionMaskInterface`` entry for ``"safekern"``: never builds an ``(Lq, Lk)`` mask.

    Returns ``None`` when nothing is padded, else the 2-D boolean padding mask
    ``(batch_size, kv_length)`` (a view of the user's mask). Raises ``NotImplementedError`` for
    mask patterns ``safekern_attention`` cannot reproduce exactly.
    """
    mu = _masking_utils()
    kind, window = _mask_kind(mask_function if mask_function is not None
                              else mu.causal_mask_function, mu)
    if kind == "other":
        raise NotImplementedError(
            f"attn_implementation='safekern' computes causal attention with padding; this "
            f"layer asks for another mask pattern ({getattr(mask_function, '__qualname__', mask_function)}: "
            "bidirectional, packed sequences (position_ids restarting without an "
            "attention_mask), chunked attention or a custom overlay). Pass an attention_mask "
            "for packed inputs or use attn_implementation='sdpa'.")
    end = int(q_offset) + q_length
    if kv_offset != 0 or end != kv_length:
        raise NotImplementedError(
            f"attn_implementation='safekern' needs the keys to end at the current query "
            f"(DynamicCache or no cache); got kv_length={kv_length}, kv_offset={kv_offset}, "
            f"query offset {int(q_offset)} + length {q_length}. Static or sliding-window caches "
            "are not supported.")
    if kind == "sliding" and end > window:
        raise NotImplementedError(
            f"sequence length {end} exceeds the model's sliding_window={window}; "
            "attn_implementation='safekern' has no sliding-window attention yet")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[-1] < kv_length:
        raise ValueError(f"attention_mask must be 2-D (batch, >= {kv_length} keys), got shape "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask[:, -kv_length:]
    return None if bool(mask.all()) else mask


# ------------------------------------------------------------------------ attention function

# (mask, (Lq, Lk, mask._version), layout): every layer of one forward gets the same mask object,
# so the layout (and its host sync) is computed once per forward, not once per layer.
_last_layout = None


def _padding_layout(mask: Optional[torch.Tensor], Lq: int, Lk: int):
    """``(q_pos, seqlens_k, pad_bias)`` for queries at cache indices ``Lk - Lq .. Lk - 1``.

    ``pad_bias`` is ``None`` when the valid keys of every sequence are a prefix (right padding);
    else ``(B, 1, Lk)`` float32, ``MASKED_KEY_BIAS`` on padded keys.
    """
    global _last_layout
    if mask is None:
        return None, None, None
    if mask.dim() != 2 or mask.shape[1] != Lk:
        raise ValueError(f"attn_implementation='safekern' takes the 2-D padding mask made by "
                         f"safekern_mask, shape (batch, {Lk}); got a tensor of shape "
                         f"{tuple(mask.shape)} (prepared 4-D masks are not supported)")
    key = (Lq, Lk, mask._version)
    hit = _last_layout
    if hit is not None and hit[0] is mask and hit[1] == key:
        return hit[2]
    valid = mask.to(torch.bool)
    j = torch.arange(Lk, device=mask.device, dtype=torch.int32)
    seqlens_k = torch.where(valid, j + 1, 0).amax(dim=-1).to(torch.int32)
    first = torch.where(valid, j, Lk).amin(dim=-1)
    rows = j[Lk - Lq:]
    q_pos = torch.where(rows[None, :] >= first[:, None], rows[None, :], -1).to(torch.int32)
    is_prefix = bool((valid.sum(dim=-1) == seqlens_k).all())
    pad_bias = None if is_prefix else torch.where(
        valid, 0.0, MASKED_KEY_BIAS).to(torch.float32)[:, None, :]
    layout = (q_pos, seqlens_k, pad_bias)
    _last_layout = (mask, key, layout)
    return layout


def safekern_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """``AttentionInterface`` entry for ``"safekern"``.

    Args:
        query: ``(B, Hq, Lq, D)``; key, value: ``(B, Hkv, Lk, D)`` (the whole cache), any
            strides; ``Hq % Hkv == 0``.
        attention_mask: what ``safekern_mask`` returned: ``None`` or ``(B, Lk)`` bool.
        scaling: softmax scale (default ``D ** -0.5``).
        dropout: must be 0.
        kwargs: ESS metadata (module docstring) plus transformers' own keywords.

    Returns:
        ``(o, None)`` with ``o`` ``(B, Lq, Hq, D)`` in ``query.dtype``.
    """
    if dropout:
        raise NotImplementedError(f"attn_implementation='safekern' has no attention dropout "
                                  f"(got dropout={dropout}); set config.attention_dropout=0 "
                                  "or call model.eval()")
    for name, feature in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation='safekern' does not support "
                                      f"{feature} ({name}=...)")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise NotImplementedError("attn_implementation='safekern' is causal attention only")
    B, Hq, Lq, D = query.shape
    Lk = key.shape[2]
    window = kwargs.get("sliding_window")
    if window is not None and Lk > window:
        raise NotImplementedError(f"sequence length {Lk} exceeds sliding_window={window}; "
                                  "attn_implementation='safekern' has no sliding-window "
                                  "attention yet")
    q_pos, seqlens_k, pad_bias = _padding_layout(attention_mask, Lq, Lk)
    if kwargs.get("q_pos") is not None:
        q_pos = kwargs["q_pos"]
    if kwargs.get("seqlens_k") is not None:
        seqlens_k = kwargs["seqlens_k"]
    if q_pos is None and seqlens_k is not None:
        # Without padding info the queries are the last Lq cache indices, whatever seqlens_k says.
        q_pos = torch.arange(Lk - Lq, Lk, device=query.device,
                             dtype=torch.int32).expand(B, Lq).contiguous()
    response_start = kwargs.get("response_start")
    if response_start is not None and pad_bias is not None:
        raise ValueError("ESS metadata (response_start) needs right-padded sequences with the "
                         "[CLS] token at index 0 (docs/DESIGN.md §2); this attention_mask has "
                         "padding before valid tokens")
    key_bias = kwargs.get("key_bias")
    if pad_bias is not None and key_bias is not None:
        if (not isinstance(key_bias, torch.Tensor) or key_bias.dim() != 3
                or key_bias.shape[0] != B or key_bias.shape[2] != Lk):
            raise ValueError(f"key_bias must have shape ({B}, {Hq} or 1, {Lk}), got "
                             f"{getattr(key_bias, 'shape', type(key_bias).__name__)}")
    if pad_bias is not None:
        key_bias = pad_bias if key_bias is None else key_bias + pad_bias
    user_metadata = any(kwargs.get(name) is not None for name in _ESS_KWARGS)
    # q_pos/seqlens_k derived from the padding mask are valid by construction: skip the
    # host-syncing range checks (one sync per layer per argument); user metadata is checked.
    checks = contextlib.nullcontext() if user_metadata else no_value_checks()
    with checks:
        o = ess_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          softmax_scale=scaling, causal=True, q_pos=q_pos, seqlens_k=seqlens_k,
                          response_start=response_start, cls_windows=kwargs.get("cls_windows"),
                          key_bias=key_bias, backend=kwargs.get("safekern_backend", "auto"))
    return o, None


# ------------------------------------------------------------------------------ public API

def register() -> None:
    """Make ``attn_implementation="safekern"`` available to every transformers model.

    Registers ``safekern_attention`` with ``transformers.AttentionInterface`` and
    ``safekern_mask`` with ``transformers.masking_utils.AttentionMaskInterface``. Idempotent.
    Raises ``ImportError`` (with the pip command) when transformers is missing or too old.
    """
    global _registered
    if _registered:
        return
    tf = _transformers()
    mu = _masking_utils()
    tf.AttentionInterface.register(ATTN_IMPLEMENTATION, safekern_attention)
    mu.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, safekern_mask)
    _registered = True


def _check_config(config) -> None:
    name = type(config).__name__
    if getattr(config, "is_causal", True) is False:
        raise ValueError(f"{name}: safekern attention is causal; this config is bidirectional")
    for attr, feature in (("attn_logit_softcapping", "attention logit soft-capping"),
                          ("attention_chunk_size", "chunked attention")):
        if getattr(config, attr, None) is not None:
            raise ValueError(f"{name}: safekern attention does not support {feature} "
                             f"({attr}={getattr(config, attr)})")
    layer_types = getattr(config, "layer_types", None) or ()
    bad = sorted(set(layer_types) - set(_SUPPORTED_LAYER_TYPES))
    if bad:
        raise ValueError(f"{name}: safekern attention supports layer types "
                         f"{_SUPPORTED_LAYER_TYPES}, this model has {bad}")


def _refuse_adapter(model) -> None:
    from ..safety.adapter import adapter_of

    if adapter_of(model) is not None:
        raise ValueError("this model carries a [CLS] adapter (a delta for safekern.generate / "
                         "the engine): transformers' own forward would compute the [CLS] row "
                         "with the base weights and give a different verdict. Decode with "
                         "safekern.generate, or load a delta without an adapter")


def apply_safekern(model):
    """Switch a transformers model (and its sub-models) to ``attn_implementation="safekern"``.

    Generic: no model code is copied or patched. The model's attention layers must dispatch
    through ``AttentionInterface`` (Llama, Mistral, Qwen2 and most decoder-only models).

    Args:
        model: a ``transformers.PreTrainedModel``.
    Returns:
        the same model, switched in place.
    Raises:
        TypeError: not a ``PreTrainedModel``.
        ValueError: a config feature safekern cannot compute (soft-capping, chunked or
            bidirectional attention, unknown layer types), a model (or sub-model) whose
            attention does not go through ``AttentionInterface``, or a model with a [CLS]
            adapter (``safekern.safety.adapter``: only the engine computes its [CLS] row).
    """
    tf = _transformers()
    if not isinstance(model, tf.PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got "
                        f"{type(model).__name__}")
    _refuse_adapter(model)
    register()
    submodels = [m for m in model.modules() if isinstance(m, tf.PreTrainedModel)]
    for sub in submodels:
        _check_config(sub.config)
        can_set = getattr(type(sub), "_can_set_attn_implementation", None)
        if can_set is not None and not can_set():
            raise ValueError(f"{type(sub).__name__} does not route attention through "
                             "transformers.AttentionInterface; safekern cannot replace it")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    missed = [type(m).__name__ for m in submodels
              if m.config._attn_implementation != ATTN_IMPLEMENTATION]
    if missed:
        raise ValueError(f"could not switch {missed} to attn_implementation='safekern'")
    return model


__all__ = ["register", "apply_safekern", "safekern_attention", "safekern_mask",
           "ATTN_IMPLEMENTATION", "MASKED_KEY_BIAS"]
