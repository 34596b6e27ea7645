"""The ESS collator (docs/DESIGN.md §1-2): examples -> training batches with the phase masks'
metadata, for the full-model recipe (``safekern.training.trainer``).

Layout of one training row (right padded, docs/DESIGN.md §2)::

    index:  0      1     ...  P-1 | P ...                  len-1 | len ... L-1
            [CLS]  BOS   prompt   | prefill  response  end EOS | <pad>

The phase masks are not materialised: they are ``ess_attention`` metadata passed as model kwargs
(``attn_implementation="safekern"`` routes them to every layer):

* pretraining: ``response_start = L`` (past the end: nobody sees [CLS]) and
  ``cls_windows = [[1, len)]`` ([CLS] sees every token).
* alignment: ``response_start = P`` (prompt rows do not see [CLS], response rows do) and
  ``cls_windows = [[q_start, q_end)]`` ([CLS] sees the user query span only).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import random

import torch

from ..evaluation import is_refusal
from ..safety.prompts import _encode, _encode_template, encode_prompts, template_split
from .frozen import example_windows

PHASES = ("pretraining", "alignment")
IGNORE = -100


class EssCollator:
    """Tokenises examples into ESS training batches.

    Args:
        tokenizer: a transformers tokenizer with the ``cls_token`` special token already added
            (``safekern.attach`` adds it); its chat template (if any) frames the prompt and
            locates the query span exactly as the engine does (``safekern.safety.encode_prompts``).
        phase: ``"alignment"`` (SFT) or ``"pretraining"``.
        cls_token: the [CLS] token string.
        max_length: rows longer than this are truncated from the right (the [CLS], prompt and
            query span are kept; an over-long prompt raises).
        response_windows: alignment phase only: the probability that a row's [CLS] sees a
            *response window* (the latest ``r2`` response tokens at a random point, or a
            SUSPECT-style ``r2 + r3`` window; the inference rules of docs/DESIGN.md §4) instead
            of the query span, labelled by the response's content: ``response_label`` of the
            example (1 = harmful continuation; default: the request label, 0 when the response
            is a refusal). 0 = the paper's recipe ([CLS] sees the query only).
        seed: seeds the window choice (the same batch gives the same windows).

    Examples are dicts with ``prompt`` (user message), ``response`` (target), optional
    ``prefill`` (assistant text before the response: part of the response span, never an LM
    target) and ``label`` (0 benign, 1 malicious); in the pretraining phase a plain ``text``
    field is accepted instead of prompt/response.

    Returns a dict of CPU tensors:
        ``input_ids (B, L) int64``, ``labels (B, L) int64`` (-100 = not a target),
        ``safety_labels (B,) float32``, ``response_start (B,) int32``,
        ``cls_windows (B, W, 2) int32`` (W = 1 unless response windows),
        ``query_span (B, 2) int32``, ``seqlens (B,) int32``.
    """

    def __init__(self, tokenizer, phase: str = "alignment", cls_token: str = "[CLS]",
                 max_length: int = 1024, response_windows: float = 0.0, seed: int = 0):
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        cls_id = tokenizer.convert_tokens_to_ids(cls_token)
        if cls_id is None or cls_id == tokenizer.unk_token_id:
            raise ValueError(f"cls_token {cls_token!r} is not in the tokenizer vocabulary; add it "
                             "first (safekern.attach does)")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs pad_token and eos_token")
        if not isinstance(max_length, int) or max_length < 4:
            raise ValueError(f"max_length must be an int >= 4, got {max_length!r}")
        if isinstance(response_windows, bool) or not isinstance(response_windows, (int, float)) \
                or not 0.0 <= response_windows <= 1.0:
            raise ValueError(f"response_windows must be a probability in [0, 1], got "
                             f"{response_windows!r}")
        if response_windows and phase != "alignment":
            raise ValueError("response_windows applies to the alignment phase only")
        self.tokenizer, self.phase, self.cls_id = tokenizer, phase, cls_id
        self.max_length = max_length
        self.response_windows = float(response_windows)
        self._rng = random.Random(seed)
        self.template = template_split(tokenizer)
        # The end-of-turn marker of the embedded chat template, when the tokenizer has one.
        self.end_text = "<|end|>" if "<|end|>" in tokenizer.get_vocab() else ""

    def _encode(self, text: str) -> List[int]:
        """Example text (pretraining text, prefill, response) is data, never markup: its
        special-token strings are split as plain text (``safekern.safety._encode``)."""
        return _encode(self.tokenizer, text)

    def _row(self, ex: Dict):
        if not isinstance(ex, dict):
            raise TypeError(f"examples must be dicts, got {type(ex).__name__}")
        label = ex.get("label", 0)
        if label not in (0, 1):
            raise ValueError(f"example label must be 0 or 1, got {label!r}")
        eos = [self.tokenizer.eos_token_id]
        if "text" in ex:
            if self.phase != "pretraining":
                raise ValueError("plain 'text' examples are only valid in the pretraining phase")
            prompt = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None \
                else []
            span = (1 + len(prompt), 0)
            prompt = prompt + self._encode(ex["text"])
            span, prefill, resp = (span[0], 1 + len(prompt)), [], eos
        else:
            for key in ("prompt", "response"):
                if not isinstance(ex.get(key), str):
                    raise ValueError(f"example needs a str {key!r} (or 'text' when pretraining)")
            enc = encode_prompts(self.tokenizer, [ex["prompt"]], cls_id=self.cls_id,
                                 template=self.template)
            prompt, span = enc.ids[0][1:], (enc.query_start[0], enc.query_end[0])
            prefill = self._encode(ex.get("prefill") or "")
            resp = self._encode(ex["response"]) + \
                _encode_template(self.tokenizer, self.end_text) + eos
        ids = [self.cls_id] + prompt + prefill + resp
        P = 1 + len(prompt)
        if P >= self.max_length:
            raise ValueError(f"prompt of {P} tokens does not fit max_length={self.max_length}")
        ids = ids[:self.max_length]
        if self.phase == "alignment":
            labels = [IGNORE] * (P + len(prefill)) + ids[P + len(prefill):]
        else:
            labels = [IGNORE] + ids[1:]
        windows, cls_label = [span], label
        if self.response_windows and self._rng.random() < self.response_windows:
            z = ex.get("response_label")
            if z is None:
                z = 0 if label == 0 or is_refusal(ex.get("response", "")) else label
            if z not in (0, 1):
                raise ValueError(f"example response_label must be 0 or 1, got {z!r}")
            n_resp = len(ids) - P
            choices = [w for w in example_windows(P, span, n_resp, label, z,
                                                  n_prefill=len(prefill))
                       if w[2] in ("response", "suspect")]
            if choices:
                spans, cls_label, _kind, _t = self._rng.choice(choices)
                windows = list(spans)
        return ids, labels[:len(ids)], P, windows, float(cls_label)

    def __call__(self, examples: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("examples must not be empty")
        rows = [self._row(ex) for ex in examples]
        B, L = len(rows), max(len(r[0]) for r in rows)
        input_ids = torch.full((B, L), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE, dtype=torch.long)
        for b, (ids, lab, *_rest) in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            labels[b, :len(lab)] = torch.tensor(lab)
        seqlens = torch.tensor([len(r[0]) for r in rows], dtype=torch.int32)
        span = torch.tensor([r[3][0] for r in rows], dtype=torch.int32)
        if self.phase == "alignment":
            response_start = torch.tensor([r[2] for r in rows], dtype=torch.int32)
            W = max(len(r[3]) for r in rows)
            # Unused window slots are empty ([0, 0)); a response window replaces the query.
            windows = torch.zeros(B, W, 2, dtype=torch.int32)
            for b, r in enumerate(rows):
                windows[b, :len(r[3])] = torch.tensor(r[3], dtype=torch.int32)
        else:
            response_start = torch.full((B,), L, dtype=torch.int32)
            windows = torch.stack([torch.ones_like(seqlens), seqlens], -1)[:, None, :]
        return {"input_ids": input_ids, "labels": labels,
                "safety_labels": torch.tensor([r[4] for r in rows]),
                "response_start": response_start, "cls_windows": windows.contiguous(),
                "query_span": span, "seqlens": seqlens}
