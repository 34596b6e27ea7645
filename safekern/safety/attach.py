"""Attach the ESS [CLS] token and safety head to a transformers causal LM (docs/DESIGN.md §2).

``attach`` adds one special token (prepended at index 0, before BOS), a safety head
``p_unsafe = sigmoid(w . h_cls + b)`` (or a 2-class head) and records where the user's query sits
in a chat-templated prompt (``model.safekern``, a ``SafetyConfig``); ``add_adapter`` gives the
[CLS] row its low-rank path (``safekern.safety.adapter``). The delta's files: ``delta``; the
prompt layout: ``prompts``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .adapter import TARGETS, ClsAdapter, adapter_of
from .probe import probe_of
from .config import (CLS_POSITIONS, SafetyConfig, _require_tokenizer,
                     _require_transformers_model, decoder_layers, safety_config)
from .prompts import template_split


def _make_head(model, head) -> nn.Module:
    hidden = model.get_input_embeddings().weight.shape[1]
    ref = model.get_input_embeddings().weight
    if head is None:
        head = nn.Linear(hidden, 1)
        nn.init.normal_(head.weight, std=hidden ** -0.5)
        nn.init.zeros_(head.bias)
        return head.to(device=ref.device, dtype=ref.dtype)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear(hidden, 1 or 2), got {type(head).__name__}")
    if head.in_features != hidden or head.out_features not in (1, 2):
        raise ValueError(f"head must map hidden size {hidden} to 1 or 2 outputs, got "
                         f"nn.Linear({head.in_features}, {head.out_features})")
    return head.to(device=ref.device, dtype=ref.dtype)


@torch.no_grad()
def attach(model, tokenizer, *, head: Optional[nn.Linear] = None, cls_token: str = "[CLS]",
           response_sees_cls: bool = True, cls_position: str = "zero"):
    """Add the [CLS] token and a safety head to ``model`` (in place) and return it.

    The token is added to ``tokenizer`` as a special token; the embedding matrix grows if needed
    and the new row (and the LM-head row when untied) is the mean of the existing rows, so the
    untrained token sits at the centre of the embedding cloud. The head is stored as
    ``model.safety_head`` and the config as ``model.safekern`` (a ``SafetyConfig``).

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2 for the engine).
        tokenizer: its tokenizer (modified in place).
        head: an ``nn.Linear(hidden, 1)`` (sigmoid) or ``nn.Linear(hidden, 2)`` (two-class);
            default a fresh ``nn.Linear(hidden, 1)``.
        cls_token: the token string.
        response_sees_cls, cls_position: see ``SafetyConfig`` (a delta trained on a frozen LM
            uses False and ``"last"``).
    """
    _require_transformers_model(model)
    if not isinstance(response_sees_cls, bool):
        raise TypeError(f"response_sees_cls must be a bool, got {type(response_sees_cls).__name__}")
    if cls_position not in CLS_POSITIONS:
        raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {cls_position!r}")
    _require_tokenizer(tokenizer)
    if not isinstance(cls_token, str) or not cls_token:
        raise ValueError(f"cls_token must be a non-empty string, got {cls_token!r}")
    vocab = tokenizer.get_vocab()
    added = cls_token not in vocab
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": [cls_token]},
                                     replace_extra_special_tokens=False)
    cls_id = tokenizer.convert_tokens_to_ids(cls_token)
    emb = model.get_input_embeddings()
    if cls_id >= emb.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = model.get_input_embeddings()
    if added:
        n_old = min(cls_id, emb.weight.shape[0])
        emb.weight[cls_id] = emb.weight[:n_old].mean(0)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not emb.weight:
            out.weight[cls_id] = out.weight[:n_old].mean(0)
    model.safety_head = _make_head(model, head)
    if adapter_of(model) is not None:
        model.safety_adapter = None           # a fresh delta has no adapter (add_adapter)
    if probe_of(model) is not None:
        model.safety_probe = None             # nor a screening probe (set_probe)
    prefix, suffix = template_split(tokenizer)
    model.safekern = SafetyConfig(cls_token=cls_token, cls_id=int(cls_id),
                                  num_classes=model.safety_head.out_features,
                                  template_prefix=prefix, template_suffix=suffix,
                                  response_sees_cls=response_sees_cls,
                                  cls_position=cls_position)
    return model


def add_adapter(model, rank: int = 16, alpha: Optional[float] = None,
                targets: Sequence[str] = TARGETS) -> ClsAdapter:
    """Give an attached ``model`` a fresh [CLS] adapter (docs/DESIGN.md §9) and return it.

    Low-rank deltas on the [CLS] row's ``targets`` projections of every decoder layer
    (``alpha`` default: ``rank``, i.e. scale 1). Needs ``response_sees_cls=False``: only then
    does no token row read the adapted [CLS] K/V, so token rows stay the base model's bit for
    bit. The adapter's [CLS] input embedding starts as the model's [CLS] row. A fresh adapter
    (``B = 0``) changes nothing until trained (``safekern.training.adapter``).
    """
    cfg = safety_config(model)
    if cfg.response_sees_cls:
        raise ValueError("a [CLS] adapter needs attach(..., response_sees_cls=False): with "
                         "response rows reading the [CLS] key, the adapter would change the "
                         "model's answers")
    emb = model.get_input_embeddings().weight[cfg.cls_id]
    adapter = ClsAdapter(decoder_layers(model), rank, float(rank if alpha is None else alpha),
                         targets, embedding=emb)
    model.safety_adapter = adapter
    return adapter


__all__ = ["attach", "add_adapter"]
