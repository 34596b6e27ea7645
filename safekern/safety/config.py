"""``SafetyConfig`` (what ``attach`` records on ``model.safekern``) and the questions asked of an
attached model: its config, its head's parameters, its decoder layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import nn

from ..spec import EssConfig


_FORMAT_VERSION = 2  # the delta format safekern.safety.delta writes (3: with a probe)
CLS_POSITIONS = ("zero", "last")


@dataclass
class SafetyConfig:
    """What ``attach`` recorded on a model (``model.safekern``).

    Attributes:
        cls_token: the [CLS] token string; cls_id: its id in the tokenizer and embeddings.
        num_classes: 1 (sigmoid head) or 2 (two-class head, class 1 = unsafe).
        template_prefix / template_suffix: the chat template rendered around a user message
            (the query goes between them); ``None`` when the tokenizer has no chat template.
        response_sees_cls: whether response rows attend to the [CLS] key (the paper: yes, so
            the safety signal flows into the answer). A delta trained on a *frozen* LM sets it
            False: then no row but the [CLS] row itself ever sees the [CLS] key, and every other
            hidden state is the base model's own (RoPE is relative, so the shift by one
            position changes nothing), i.e. benign outputs stay the base model's
            (docs/DESIGN.md §1).
        cls_position: the RoPE position of the [CLS] *row* (its key stays in slot 0):
            ``"zero"`` (the paper: index 0, so on a pretrained model it "looks forward" at its
            window, which no causal LM ever does) or ``"last"`` (rotated at the position of
            the step's token row, ``t - 1``: the [CLS] looks back at its window like any
            token, which is what a frozen LM's attention knows how to do).
        windows: ``(r1, r2, r3)`` the delta was trained for (None: unknown); ``generate`` warns
            when an ``EssConfig`` uses others.
        operating_point: the ``EssConfig`` the delta was measured at; ``safekern.generate``
            uses it when called without ``safety`` (None: ``EssConfig()``, the paper's).
    """

    cls_token: str
    cls_id: int
    num_classes: int = 1
    template_prefix: Optional[str] = None
    template_suffix: Optional[str] = None
    response_sees_cls: bool = True
    cls_position: str = "zero"
    windows: Optional[Tuple[int, int, int]] = None
    operating_point: Optional[EssConfig] = None
    version: int = field(default=_FORMAT_VERSION)


def _require_transformers_model(model):
    if not isinstance(model, nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")


def _require_tokenizer(tokenizer):
    if not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got "
                        f"{type(tokenizer).__name__}")


def safety_config(model, tokenizer=None) -> SafetyConfig:
    """The model's ``SafetyConfig``; checks that ``tokenizer`` (if given) still has the [CLS]."""
    cfg = getattr(model, "safekern", None)
    if not isinstance(cfg, SafetyConfig) or not isinstance(getattr(model, "safety_head", None),
                                                          nn.Linear):
        raise ValueError("model has no safety head: call safekern.attach(model, tokenizer) or "
                         "safekern.load_safety(model, tokenizer, dir) first")
    if tokenizer is not None:
        _require_tokenizer(tokenizer)
        # convert_tokens_to_ids is a lookup; get_vocab() builds the whole vocabulary (~22 ms on
        # SmolLM2, once per generate call). A missing token maps to the unk id (or None).
        if tokenizer.convert_tokens_to_ids(cfg.cls_token) != cfg.cls_id:
            raise ValueError(f"tokenizer has no {cfg.cls_token!r} token with id {cfg.cls_id}: pass "
                             "the tokenizer that attach/load_safety modified")
    return cfg


def safety_head_params(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(safety_weight, safety_bias)`` as ``head_sample`` takes them: ``(Dm,)`` + ``()`` for a
    sigmoid head, ``(2, Dm)`` + ``(2,)`` for a two-class head."""
    head = model.safety_head
    if head.out_features == 1:
        return head.weight[0], (None if head.bias is None else head.bias[0])
    return head.weight, head.bias


def decoder_layers(model) -> list:
    """The decoder layers of a Llama-family transformers model (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no model.layers: the [CLS] adapter needs "
                         "a Llama-family decoder (Llama, Mistral, Qwen2)")
    return list(layers)


__all__ = ["SafetyConfig", "CLS_POSITIONS", "safety_config", "safety_head_params", "decoder_layers"]
