"""Attach the ESS [CLS] token and safety head to a transformers causal LM; save/load the delta.

``attach`` adds one special token (prepended at index 0, before BOS; docs/DESIGN.md §2), a
safety head ``p_unsafe = sigmoid(w . h_cls + b)`` (or a 2-class head) and records where the
user's query sits in a chat-templated prompt. ``encode_prompts`` builds the per-sequence layout
the engine and the training recipe share::

    index:  0      1     ...                 P-1 | P ...
            [CLS]  BOS   template  query  template | response (prefill) tokens

``encode_inputs`` extends it to the other prompt forms ``generate`` takes (token ids, chat
message lists) without changing how a user message is tokenized.

Only the delta (head, [CLS] embedding row, [CLS] LM-head row when untied, the [CLS] adapter
when there is one, config) is saved. Format version 2 adds the adapter, the windows it was
trained for and its operating point; version-1 deltas (the linear head) load as rank 0.
Version 3 is a version-2 delta with the cascade's token-row screening probe (``safekern.probe``:
``probe.weight``, ``probe.bias`` and a ``"probe"`` record); a delta without a probe is still
written as version 2.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .adapter import TARGETS, ClsAdapter, adapter_of, adapter_shapes, check_meta, check_targets
from .probe import check_probe_meta, probe_from, probe_of, probe_shapes, set_probe
from .spec import EssConfig

# A user message that no tokenizer merges with its neighbours' template text.
_SENTINEL = "\x00SAFEKERN_QUERY\x00"
# The same for the j-th earlier message of a chat (chat_template_split).
_MESSAGE_SENTINEL = "\x00SAFEKERN_MESSAGE_{}\x00"
_ANY_SENTINEL = re.compile("\x00SAFEKERN_(?:QUERY|MESSAGE_([0-9]+))\x00")
_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2, 3)
_PROBE_VERSION = 3  # a delta with the cascade's screening probe (safekern.probe)
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
    """Ids of untrusted text (a user message, a prefill, a training response) as plain text.

    Special-token strings inside it (``[CLS]``, ``<|end|>``, ``<|im_start|>``, ...) are split
    like any other text, so a user cannot forge the safety token or the chat template."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False,
                          split_special_tokens=True)["input_ids"])


def _encode_template(tokenizer, text: str) -> List[int]:
    """Ids of trusted template text (the chat template around the query, end-of-turn markers):
    its special-token strings become the special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _encode_pieces(tokenizer, pieces: Sequence[Tuple[str, bool]]) -> List[int]:
    """Ids of ``(text, is_content)`` pieces (``chat_template_split``): message contents as
    untrusted text (``_encode``), the template between them as template text."""
    return [i for text, content in pieces
            for i in (_encode(tokenizer, text) if content else _encode_template(tokenizer, text))]


def _lay_out(out: "EncodedPrompts", head: List[int], pre_ids: List[int], q: List[int],
             suf_ids: List[int], prefill_ids: List[int]) -> None:
    """Append one sequence ``head + prefix + query + suffix | prefill`` to ``out``."""
    ids = head + pre_ids + q + suf_ids
    qs = len(head) + len(pre_ids)
    out.prompt_len.append(len(ids))
    out.query_start.append(qs)
    out.query_end.append(qs + len(q))
    out.ids.append(ids + prefill_ids)


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
    exact (no BPE merge across the boundary). The template keeps its special tokens; the user
    message and the prefill are untrusted and tokenized as plain text (special-token strings in
    them are split), so the [CLS] at index 0 is the only one and the template cannot be forged
    from inside the query. Without a chat template (or with
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
        pre_ids = _encode_template(tokenizer, prefix)
        suf_ids = _encode_template(tokenizer, suffix)
    head = [] if cls_id is None else [cls_id]
    out = EncodedPrompts([], [], [], [])
    for i, text in enumerate(prompts):
        _lay_out(out, head, pre_ids, _encode(tokenizer, text), suf_ids,
                 _encode(tokenizer, prefill[i]) if prefill is not None else [])
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


def add_adapter(model, rank: int = 16, alpha: Optional[float] = None,
                targets: Sequence[str] = TARGETS) -> ClsAdapter:
    """Give an attached ``model`` a fresh [CLS] adapter (docs/DESIGN.md §9) and return it.

    Low-rank deltas on the [CLS] row's ``targets`` projections of every decoder layer
    (``alpha`` default: ``rank``, i.e. scale 1). Needs ``response_sees_cls=False``: only then
    does no token row read the adapted [CLS] K/V, so token rows stay the base model's bit for
    bit. The adapter's [CLS] input embedding starts as the model's [CLS] row. A fresh adapter
    (``B = 0``) changes nothing until trained (``safekern.adapter_recipe``).
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


# ---------------------------------------------------------------- prompt forms beyond strings
# Kept outside encode_prompts/_encode: each form is reduced to what those already take (a user
# message and the template text around it) or to ids laid out directly.

def as_prompt_list(prompts) -> list:
    """The prompts ``generate`` accepts, as one entry per sequence.

    Accepted: a string; a list of strings; one prompt as token ids (``list[int]``, or a mapping
    with ``"prompt_token_ids"`` (vLLM's ``TokensPrompt``) or ``"input_ids"`` (a transformers
    ``BatchEncoding``)) or a list of them; one chat (``list[dict]`` with ``role``/``content``)
    or a list of chats; any mix of these in one list. Raises ``TypeError``/``ValueError``
    naming ``prompts``.
    """
    if isinstance(prompts, str):
        return [prompts]
    if _token_ids_of(prompts) is not None:
        return [_token_ids_of(prompts)]
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise TypeError(f"prompts must be a string, a list of strings, token-id lists or chat "
                        f"message lists, got {type(prompts).__name__}")
    xs = list(prompts)
    if not xs:
        raise ValueError("prompts must hold at least one prompt")
    if all(_is_int(x) for x in xs) or all(isinstance(x, dict) and _token_ids_of(x) is None
                                          for x in xs):
        return [xs]                     # one id prompt / one conversation
    xs = [x if _token_ids_of(x) is None else _token_ids_of(x) for x in xs]
    for i, x in enumerate(xs):
        if isinstance(x, str):
            continue
        if not isinstance(x, Sequence) or isinstance(x, (bytes, bytearray)) or not x or not (
                all(_is_int(v) for v in x) or all(isinstance(v, dict) for v in x)):
            raise TypeError(f"prompts[{i}] must be a string, a non-empty list of token ids or a "
                            f"non-empty list of chat messages, got {_describe(x)}")
    return [x if isinstance(x, str) else list(x) for x in xs]


def _token_ids_of(x) -> Optional[list]:
    """The ids of a ``{"prompt_token_ids": ...}`` / ``{"input_ids": ...}`` mapping, else None."""
    if isinstance(x, Mapping) and "role" not in x:
        for key in ("prompt_token_ids", "input_ids"):
            if key in x:
                ids = x[key]
                return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _describe(x) -> str:
    if isinstance(x, Sequence) and not isinstance(x, str) and x:
        return f"a {type(x).__name__} of {sorted({type(v).__name__ for v in x})}"
    return repr(x) if isinstance(x, Sequence) else type(x).__name__


Pieces = List[Tuple[str, bool]]


def chat_template_split(tokenizer, messages, index: int = 0) -> Tuple[Pieces, str, Pieces]:
    """``(prefix, query, suffix)`` of a chat whose last message is the user's query.

    The chat is rendered with the tokenizer's chat template (generation prompt added) with a
    sentinel in place of every message's content, and split at the sentinels: ``prefix`` and
    ``suffix`` are ``(text, is_content)`` pieces in order — the template's own text
    (``is_content=False``, tokenized with its special tokens) and the contents of system
    messages and earlier turns (``True``, tokenized as plain text like the query, so a
    ``[CLS]`` or ``<|im_end|>`` typed in an earlier turn stays text). The query is the last
    user message, so the query span is exactly that message (rule 4). Contents are inserted
    verbatim where the template places them; a message the template does not render is left
    out.
    """
    where = f"prompts[{index}]"
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where} is a chat message list, but the tokenizer has no chat "
                         "template to render it; pass the user message as a string")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), str):
            raise TypeError(f"{where}[{j}] must be a dict with string 'role' and 'content', got "
                            f"{m!r}")
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message of {where} must have role 'user' (the query the "
                         f"[CLS] token judges), got {messages[-1]['role']!r}")
    n = len(messages) - 1
    framed = [{**m, "content": _MESSAGE_SENTINEL.format(j)} for j, m in enumerate(messages[:n])]
    framed.append({**messages[-1], "content": _SENTINEL})
    text = tokenizer.apply_chat_template(framed, tokenize=False, add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the tokenizer's chat template does not render the last user message "
                         "verbatim exactly once; cannot locate the query span")
    pieces: Pieces = []
    seen = set()
    end = 0
    prefix: Pieces = []
    for m in _ANY_SENTINEL.finditer(text):
        pieces.append((text[end:m.start()], False))
        if m.group(1) is None:
            prefix, pieces = pieces, []
        else:
            j = int(m.group(1))
            if j in seen or j >= n:
                raise ValueError(f"the tokenizer's chat template renders {where}[{j}] more than "
                                 "once; cannot tell message contents from the template")
            seen.add(j)
            pieces.append((messages[j]["content"], True))
        end = m.end()
    pieces.append((text[end:], False))
    return ([(t, c) for t, c in prefix if t], messages[-1]["content"],
            [(t, c) for t, c in pieces if t])


def encode_token_ids(ids: Sequence[int], *, cls_id: Optional[int], vocab_size: int,
                     bos_id: Optional[int], template_ids: Tuple[List[int], List[int]],
                     prefill_ids: Sequence[int] = (), index: int = 0) -> EncodedPrompts:
    """The layout of one prompt given as token ids (vLLM's ``prompt_token_ids``).

    The ids are the *whole* prompt, template included, as fed to the model; the [CLS] id is
    prepended (a leading [CLS] already in ``ids`` is not doubled). The query span is exact when
    the ids are the chat template around a message (they start with the template prefix ids and
    end with the suffix ids, as ``encode_prompts`` would lay them out): the tokens in between.
    Otherwise the prompt counts as untemplated and the query is every token after a leading BOS.
    """
    where = f"prompts[{index}]"
    ids = [int(x) for x in ids]
    bad = [x for x in ids if not 0 <= x < vocab_size]
    if bad:
        raise ValueError(f"{where} holds token id {bad[0]} outside the vocabulary "
                         f"[0, {vocab_size})")
    head = [] if cls_id is None else [cls_id]
    if cls_id is not None and ids and ids[0] == cls_id:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"{where} must hold at least one token id besides [CLS]")
    pre, suf = template_ids
    n = len(ids)
    if (pre or suf) and n >= len(pre) + len(suf) and ids[:len(pre)] == pre and \
            ids[n - len(suf):] == suf:
        qs, qe = len(pre), n - len(suf)
    else:
        qs, qe = (1 if bos_id is not None and ids[0] == bos_id else 0), n
    k = len(head)
    return EncodedPrompts([head + ids + list(prefill_ids)], [k + n], [k + qs], [k + qe])


def encode_inputs(model, tokenizer, prompts, prefill=None, *, safety: bool = True,
                  chat_template: bool = True) -> EncodedPrompts:
    """``encode_for_model`` for every prompt form ``as_prompt_list`` accepts.

    Strings go through ``encode_prompts`` unchanged; a chat is its last user message framed by
    the rendered conversation (``chat_template_split``), every message's content tokenized as
    plain text like the query and the template around them with its special tokens; token ids
    are laid out by ``encode_token_ids``. ``prefill`` (strings, one per prompt) works with every
    form.
    """
    _require_tokenizer(tokenizer)
    items = as_prompt_list(prompts)
    prefill = None if prefill is None else _check_strings("prefill", prefill, len(items))
    if all(isinstance(x, str) for x in items):
        return encode_for_model(model, tokenizer, items, prefill, safety=safety,
                                chat_template=chat_template)
    cls_id, template = None, None
    if safety:
        cfg = safety_config(model, tokenizer)
        cls_id, template = cfg.cls_id, (cfg.template_prefix, cfg.template_suffix)
    template = (template or template_split(tokenizer)) if chat_template else (None, None)
    template_ids = ([], []) if template[0] is None else \
        (_encode_template(tokenizer, template[0]), _encode_template(tokenizer, template[1]))
    out = EncodedPrompts([], [], [], [])
    for i, x in enumerate(items):
        pf = None if prefill is None else [prefill[i]]
        if isinstance(x, str):
            enc = encode_prompts(tokenizer, [x], pf, cls_id=cls_id, chat_template=chat_template,
                                 template=template)
        elif isinstance(x[0], dict):
            prefix, query, suffix = chat_template_split(tokenizer, x, i)
            enc = EncodedPrompts([], [], [], [])
            _lay_out(enc, [] if cls_id is None else [cls_id], _encode_pieces(tokenizer, prefix),
                     _encode(tokenizer, query), _encode_pieces(tokenizer, suffix),
                     _encode(tokenizer, pf[0]) if pf else [])
        else:
            enc = encode_token_ids(x, cls_id=cls_id, vocab_size=len(tokenizer),
                                   bos_id=getattr(tokenizer, "bos_token_id", None),
                                   template_ids=template_ids, index=i,
                                   prefill_ids=_encode(tokenizer, pf[0]) if pf else ())
        for name in ("ids", "prompt_len", "query_start", "query_end"):
            getattr(out, name).extend(getattr(enc, name))
    return out


def refusal_token_ids(tokenizer, text: str) -> Tuple[List[int], int]:
    """``(ids, skip)``: the ids of the refusal as inserted mid-response, on a new line
    (``"\\n" + text``), and how many leading ids (the newline) to skip when it opens the
    response. ``"\\n" + text`` is tokenized as one string when that ends in the ids of
    ``text`` alone (so both variants are exact tokenizations); else the newline's and the
    text's ids are concatenated."""
    plain = _encode(tokenizer, text)
    joined = _encode(tokenizer, "\n" + text)
    if len(joined) > len(plain) and joined[len(joined) - len(plain):] == plain:
        return joined, len(joined) - len(plain)
    newline = _encode(tokenizer, "\n")
    return newline + plain, len(newline)


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
    adapter = adapter_of(model)
    if adapter is not None:
        tensors.update(adapter.tensors())
    probe = probe_of(model)
    if probe is not None:
        tensors.update(probe.tensors())
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(directory, "safety.safetensors"))
    meta = {**asdict(cfg), "version": _FORMAT_VERSION if probe is None else _PROBE_VERSION,
            "hidden_size": int(emb.shape[1]), "untied_lm_head": untied,
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "adapter": None if adapter is None else adapter.meta()}
    if probe is not None:
        meta["probe"] = probe.meta()
    with open(os.path.join(directory, "safety.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return str(directory)


# safety.json: each required field and its JSON type (bool is not an int here).
_META_FIELDS = {"version": int, "cls_token": str, "num_classes": int, "hidden_size": int,
                "untied_lm_head": bool}


def _read_meta(path: str) -> dict:
    """``safety.json``, checked field by field; every error names the file and the field."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rewrite it with save_safety") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in _META_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"{path} is incomplete: missing {missing} (written by save_safety)")
    if meta["version"] not in _READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported safety format version {meta['version']!r} "
                         f"(this safekern reads versions {_READABLE_VERSIONS})")
    for key, kind in _META_FIELDS.items():
        value = meta[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{path}: {key!r} must be a JSON {kind.__name__}, got {value!r}")
    if not meta["cls_token"]:
        raise ValueError(f"{path}: 'cls_token' must be a non-empty string")
    if meta["num_classes"] not in (1, 2) or meta["hidden_size"] < 1:
        raise ValueError(f"{path}: num_classes must be 1 or 2 and hidden_size >= 1, got "
                         f"{meta['num_classes']} and {meta['hidden_size']}")
    # Optional layout fields (older deltas lack them: the paper's layout).
    if not isinstance(meta.get("response_sees_cls", True), bool):
        raise ValueError(f"{path}: 'response_sees_cls' must be a JSON boolean, got "
                         f"{meta['response_sees_cls']!r}")
    if meta.get("cls_position", "zero") not in CLS_POSITIONS:
        raise ValueError(f"{path}: 'cls_position' must be one of {CLS_POSITIONS}, got "
                         f"{meta['cls_position']!r}")
    _check_adapter_meta(path, meta)
    check_probe_meta(meta.get("probe"), path, meta["version"])
    windows = meta.get("windows")
    if windows is not None and (not isinstance(windows, list) or len(windows) != 3 or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in windows)):
        raise ValueError(f"{path}: 'windows' must be [r1, r2, r3] (ints >= 1), got {windows!r}")
    op = meta.get("operating_point")
    if op is not None:
        if not isinstance(op, dict):
            raise ValueError(f"{path}: 'operating_point' must be a JSON object of EssConfig "
                             f"fields, got {op!r}")
        try:
            meta["operating_point"] = EssConfig(**op)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: 'operating_point' is not a valid EssConfig: {e}") from e
    if meta.get("adapter") is not None:
        if meta.get("response_sees_cls", True):
            raise ValueError(f"{path}: a delta with a [CLS] adapter needs response_sees_cls "
                             "false (token rows must not read the adapted [CLS] key)")
        if op is not None and meta["operating_point"].cls_bias_scale != 0:
            raise ValueError(f"{path}: a delta with a [CLS] adapter cannot run with "
                             "cls_bias_scale != 0 (the bias would feed the adapted verdict into "
                             "token rows)")
    return meta


def _check_adapter_meta(path: str, meta: dict) -> None:
    a = meta.get("adapter")
    if a is None:
        return
    if meta["version"] < 2:
        raise ValueError(f"{path}: 'adapter' needs format version 2, the file says "
                         f"{meta['version']}")
    check_meta(a, path)


def _read_tensors(path: str, meta: dict, adapter_want: Dict[str, Tuple[int, ...]]) -> dict:
    """``safety.safetensors``, with every tensor's shape checked against ``safety.json`` and the
    adapter's against the model (``adapter_want``: name -> shape); unknown tensors are an
    error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {os.path.basename(path)} next to safety.json: {path!r}")
    try:
        tensors = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupted or truncated?): "
                         f"{e}") from e
    hidden, classes = meta["hidden_size"], meta["num_classes"]
    want = {"head.weight": (classes, hidden), "cls_embedding": (hidden,)}
    if "head.bias" in tensors:
        want["head.bias"] = (classes,)
    if meta["untied_lm_head"]:
        want["cls_lm_head"] = (hidden,)
    want.update(adapter_want)
    if meta.get("probe") is not None:
        want.update(probe_shapes(hidden))
    unknown = sorted(set(tensors) - set(want))
    if unknown:
        raise ValueError(f"{path} holds tensors this delta's safety.json does not describe: "
                         f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    for key, shape in want.items():
        if key not in tensors:
            raise ValueError(f"{path} has no {key!r} tensor (found {sorted(tensors)[:8]})")
        t = tensors[key]
        if tuple(t.shape) != shape:
            why = ("the model's projection sizes" if key.startswith("adapter.") else
                   f"safety.json (hidden_size={hidden})" if key.startswith("probe.") else
                   f"safety.json (hidden_size={hidden}, num_classes={classes})")
            raise ValueError(f"{path}: {key!r} has shape {tuple(t.shape)}, but {why} "
                             f"needs {shape}")
        if not t.dtype.is_floating_point or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: {key!r} must hold finite floats, got {t.dtype} with "
                             "NaN/inf or a non-float dtype")
    return tensors


@torch.no_grad()
def load_safety(model, tokenizer, directory: str):
    """Attach the delta written by ``save_safety`` to a fresh ``model``/``tokenizer``.

    The [CLS] id is whatever ``tokenizer`` assigns (it need not match the saved one). A missing,
    corrupted or truncated file, an invalid or incomplete ``safety.json`` and tensors whose
    shapes disagree with it raise (``FileNotFoundError`` / ``ValueError``) naming the file and
    what is wrong, before the model or tokenizer is modified.
    """
    _require_transformers_model(model)
    _require_tokenizer(tokenizer)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    path = os.path.join(directory, "safety.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safety.json in {str(directory)!r} (written by save_safety)")
    meta = _read_meta(path)
    a = meta.get("adapter")
    adapter_want = {} if a is None else adapter_shapes(decoder_layers(model),
                                                       check_targets(a["targets"]), a["rank"])
    tensors = _read_tensors(os.path.join(directory, "safety.safetensors"), meta, adapter_want)
    hidden = model.get_input_embeddings().weight.shape[1]
    if meta["hidden_size"] != hidden:
        raise ValueError(f"{path}: the saved safety head has hidden size {meta['hidden_size']}, "
                         f"the model has {hidden}")
    w = tensors["head.weight"]
    head = nn.Linear(hidden, w.shape[0], bias="head.bias" in tensors)
    head.weight.copy_(w)
    if head.bias is not None:
        head.bias.copy_(tensors["head.bias"])
    attach(model, tokenizer, head=head, cls_token=meta["cls_token"],
           response_sees_cls=meta.get("response_sees_cls", True),
           cls_position=meta.get("cls_position", "zero"))
    cls_id = model.safekern.cls_id
    emb = model.get_input_embeddings().weight
    emb[cls_id] = tensors["cls_embedding"].to(emb)
    out = model.get_output_embeddings()
    if "cls_lm_head" in tensors and out is not None and out.weight is not emb:
        out.weight[cls_id] = tensors["cls_lm_head"].to(out.weight)
    if a is not None:
        add_adapter(model, a["rank"], float(a["alpha"]), a["targets"]).load_tensors(tensors)
    set_probe(model, None if meta.get("probe") is None else
              probe_from(tensors, meta["probe"], hidden))
    windows = meta.get("windows")
    model.safekern.windows = None if windows is None else tuple(windows)
    model.safekern.operating_point = meta.get("operating_point")
    return model


__all__ = ["SafetyConfig", "EncodedPrompts", "attach", "add_adapter", "decoder_layers", "encode_prompts", "encode_for_model",
           "encode_inputs", "as_prompt_list", "chat_template_split", "encode_token_ids",
           "refusal_token_ids",
           "template_split", "safety_config", "safety_head_params", "save_safety", "load_safety"]
