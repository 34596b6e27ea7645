"""The prompt layout with the [CLS] in place, shared by the engine and the training recipes::

    index:  0      1     ...                 P-1 | P ...
            [CLS]  BOS   template  query  template | response (prefill) tokens

``encode_prompts`` builds it from strings; ``encode_inputs`` extends it to the other prompt forms
``generate`` takes (token ids, chat message lists) without changing how a user message is
tokenized; ``template_split`` finds the query inside the chat template; ``refusal_token_ids``
encodes a refusal the controller forces.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import torch
from .config import _require_tokenizer, safety_config



# A user message that no tokenizer merges with its neighbours' template text.
_SENTINEL = "\x00SAFEKERN_QUERY\x00"


# The same for the j-th earlier message of a chat (chat_template_split).
_MESSAGE_SENTINEL = "\x00SAFEKERN_MESSAGE_{}\x00"


_ANY_SENTINEL = re.compile("\x00SAFEKERN_(?:QUERY|MESSAGE_([0-9]+))\x00")


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


__all__ = ["EncodedPrompts", "encode_prompts", "encode_for_model", "encode_inputs", "as_prompt_list",
           "chat_template_split", "encode_token_ids", "refusal_token_ids", "template_split"]
