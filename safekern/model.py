"""Attach the ESS [CLS] token and safety head to a transformers causal LM; save/load the delta.

``attach`` adds one special token (prepended at index 0, before BOS; docs/DESIGN.md §2), a
safety head ``p_unsafe = sigmoid(w . h_cls + b)`` (or a 2-class head) and records where the
user's query sits in a chat-templated prompt. ``encode_prompts`` builds the per-sequence layout
the engine and the training recipe share::

    index:  0      1     ...                 P-1 | P ...
            [CLS]  BOS   template  query  template | response (prefill) tokens

Only the delta (head, [CLS] embedding row, [CLS] LM-head row when untied, config) is saved.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

# A user message that no tokenizer merges with its neighbours' template text.
_SENTINEL = "\x00SAFEKERN_QUERY\x00"
_FORMAT_VERSION = 1


@dataclass
class SafetyConfig:
    """What ``attach`` recorded on a model (``model.safekern``).

    Attributes:
        cls_token: the [CLS] token string; cls_id: its id in the tokenizer and embeddings.
        num_classes: 1 (sigmoid head) or 2 (two-class head, class 1 = unsafe).
        template_prefix / template_suffix: the chat template rendered around a user message
            (the query goes between them); ``None`` when the tokenizer has no chat template.
    """

    cls_token: str
    cls_id: int
    num_classes: int = 1
    template_prefix: Optional[str] = None
    template_suffix: Optional[str] = None
    version: int = field(default=_FORMAT_VERSION)


@dataclass
class EncodedPrompts:
    """Token ids of a batch laid out as docs/DESIGN.md §2 (one unpadded list per sequence).

    Attributes:
        ids: per sequence the prompt ids followed by the prefill (forced response) ids.
        prompt_len: ``P`` per sequence (includes [CLS] when present); the response starts at P.
        query_start, query_end: the user query span ``[query_start, query_end)``.
    """

    ids: List[List[int]]
    prompt_len: List[int]
    query_start: List[int]
    query_end: List[int]

    @property
    def lengths(self) -> List[int]:
        return [len(x) for x in self.ids]

    def padded(self, pad_id: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(B, max_len)`` int64 ids and ``(B,)`` int32 lengths."""
        L = max(self.lengths)
        out = torch.full((len(self.ids), L), pad_id, dtype=torch.int64)
        for b, x in enumerate(self.ids):
            out[b, :len(x)] = torch.tensor(x, dtype=torch.int64)
        return out.to(device), torch.tensor(self.lengths, dtype=torch.int32, device=device)


def _require_transformers_model(model):
    if not isinstance(model, nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")


def _require_tokenizer(tokenizer):
    if not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got "
                        f"{type(tokenizer).__name__}")


def template_split(tokenizer) -> Tuple[Optional[str], Optional[str]]:
    """Render the chat template around a sentinel user message and split it there.

    Returns ``(prefix, suffix)`` texts, or ``(None, None)`` when the tokenizer has no template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None, None
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}],
                                         tokenize=False, add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the tokenizer's chat template does not render the user message "
                         "verbatim exactly once; cannot locate the query span")
    prefix, suffix = text.split(_SENTINEL)
    return prefix, suffix


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _check_strings(name: str, xs, n: Optional[int] = None) -> List[str]:
    if isinstance(xs, str) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(xs).__name__}")
    xs = list(xs)
    if not all(isinstance(x, str) for x in xs):
        raise TypeError(f"{name} must hold only strings")
    if n is None and not xs:
        raise ValueError(f"{name} must hold at least one string")
    if n is not None and len(xs) != n:
        raise ValueError(f"{name} must hold {n} strings (one per prompt), got {len(xs)}")
    return xs


def encode_prompts(tokenizer, prompts: Sequence[str], prefill: Optional[Sequence[str]] = None,
                   *, cls_id: Optional[int] = None, chat_template: bool = True,
                   template: Optional[Tuple[Optional[str], Optional[str]]] = None
                   ) -> EncodedPrompts:
    """Token ids, prompt lengths and query spans for a batch of user messages.

    The template prefix, the query and the suffix are tokenized separately so the query span is
    exact (no BPE merge across the boundary). Without a chat template (or with
    ``chat_template=False``) the prompt is ``BOS + query`` and the query is every token after BOS.

    Args:
        prompts: user messages. prefill: optional forced response starts (same length).
        cls_id: the [CLS] id to prepend at index 0; None = plain layout (no [CLS]).
        template: a precomputed ``template_split(tokenizer)``.
    """
    _require_tokenizer(tokenizer)
    prompts = _check_strings("prompts", prompts)
    prefill = None if prefill is None else _check_strings("prefill", prefill, len(prompts))
    prefix, suffix = (template or template_split(tokenizer)) if chat_template else (None, None)
    if prefix is None:
        bos = getattr(tokenizer, "bos_token_id", None)
        pre_ids, suf_ids = ([] if bos is None else [bos]), []
    else:
        pre_ids, suf_ids = _encode(tokenizer, prefix), _encode(tokenizer, suffix)
    head = [] if cls_id is None else [cls_id]
    out = EncodedPrompts([], [], [], [])
    for i, text in enumerate(prompts):
        q = _encode(tokenizer, text)
        ids = head + pre_ids + q + suf_ids
        qs = len(head) + len(pre_ids)
        out.prompt_len.append(len(ids))
        out.query_start.append(qs)
        out.query_end.append(qs + len(q))
        out.ids.append(ids + (_encode(tokenizer, prefill[i]) if prefill is not None else []))
    return out


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
def attach(model, tokenizer, *, head: Optional[nn.Linear] = None, cls_token: str = "[CLS]"):
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
    """
    _require_transformers_model(model)
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
    prefix, suffix = template_split(tokenizer)
    model.safekern = SafetyConfig(cls_token=cls_token, cls_id=int(cls_id),
                                  num_classes=model.safety_head.out_features,
                                  template_prefix=prefix, template_suffix=suffix)
    return model


def safety_config(model, tokenizer=None) -> SafetyConfig:
    """The model's ``SafetyConfig``; checks that ``tokenizer`` (if given) still has the [CLS]."""
    cfg = getattr(model, "safekern", None)
    if not isinstance(cfg, SafetyConfig) or not isinstance(getattr(model, "safety_head", None),
                                                          nn.Linear):
        raise ValueError("model has no safety head: call safekern.attach(model, tokenizer) or "
                         "safekern.load_safety(model, tokenizer, dir) first")
    if tokenizer is not None:
        _require_tokenizer(tokenizer)
        if tokenizer.get_vocab().get(cfg.cls_token) != cfg.cls_id:
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


def encode_for_model(model, tokenizer, prompts, prefill=None, *, safety: bool = True,
                     chat_template: bool = True) -> EncodedPrompts:
    """``encode_prompts`` with the [CLS] id and template recorded by ``attach`` (``safety``) or
    the plain layout without [CLS]."""
    if not safety:
        return encode_prompts(tokenizer, prompts, prefill, chat_template=chat_template)
    cfg = safety_config(model, tokenizer)
    template = (cfg.template_prefix, cfg.template_suffix)
    return encode_prompts(tokenizer, prompts, prefill, cls_id=cfg.cls_id,
                          chat_template=chat_template, template=template)


def save_safety(model, directory: str) -> str:
    """Write only the ESS delta to ``directory``: ``safety.safetensors`` (head, [CLS] embedding
    row, [CLS] LM-head row when untied) and ``safety.json`` (config). Returns the directory."""
    from safetensors.torch import save_file

    cfg = safety_config(model)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    os.makedirs(directory, exist_ok=True)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    tensors = {"head.weight": model.safety_head.weight, "cls_embedding": emb[cfg.cls_id]}
    if model.safety_head.bias is not None:
        tensors["head.bias"] = model.safety_head.bias
    untied = out is not None and out.weight is not emb
    if untied:
        tensors["cls_lm_head"] = out.weight[cfg.cls_id]
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(directory, "safety.safetensors"))
    meta = {**asdict(cfg), "hidden_size": int(emb.shape[1]), "untied_lm_head": untied,
            "model_type": getattr(getattr(model, "config", None), "model_type", None)}
    with open(os.path.join(directory, "safety.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return str(directory)


@torch.no_grad()
def load_safety(model, tokenizer, directory: str):
    """Attach the delta written by ``save_safety`` to a fresh ``model``/``tokenizer``.

    The [CLS] id is whatever ``tokenizer`` assigns (it need not match the saved one).
    """
    from safetensors.torch import load_file

    path = os.path.join(directory, "safety.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safety.json in {directory!r} (written by save_safety)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"unsupported safety format version {meta.get('version')}")
    tensors = load_file(os.path.join(directory, "safety.safetensors"))
    hidden = model.get_input_embeddings().weight.shape[1]
    if meta["hidden_size"] != hidden:
        raise ValueError(f"saved safety head has hidden size {meta['hidden_size']}, the model "
                         f"has {hidden}")
    w = tensors["head.weight"]
    head = nn.Linear(hidden, w.shape[0], bias="head.bias" in tensors)
    head.weight.copy_(w)
    if head.bias is not None:
        head.bias.copy_(tensors["head.bias"])
    attach(model, tokenizer, head=head, cls_token=meta["cls_token"])
    cls_id = model.safekern.cls_id
    emb = model.get_input_embeddings().weight
    emb[cls_id] = tensors["cls_embedding"].to(emb)
    out = model.get_output_embeddings()
    if "cls_lm_head" in tensors and out is not None and out.weight is not emb:
        out.weight[cls_id] = tensors["cls_lm_head"].to(out.weight)
    return model


__all__ = ["SafetyConfig", "EncodedPrompts", "attach", "encode_prompts", "encode_for_model",
           "template_split", "safety_config", "safety_head_params", "save_safety", "load_safety"]
