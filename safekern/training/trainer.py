"""ESS training recipe (docs/DESIGN.md §1): collator, phase masks, joint loss, ``EssTrainer``.

Layout of one training row (right padded, docs/DESIGN.md §2)::

    index:  0      1     ...  P-1 | P ...                  len-1 | len ... L-1
            [CLS]  BOS   prompt   | prefill  response  end EOS | <pad>

The phase masks are not materialised: they are ``ess_attention`` metadata passed as model kwargs
(``attn_implementation="safekern"`` routes them to every layer):

* pretraining: ``response_start = L`` (past the end: nobody sees [CLS]) and
  ``cls_windows = [[1, len)]`` ([CLS] sees every token).
* alignment: ``response_start = P`` (prompt rows do not see [CLS], response rows do) and
  ``cls_windows = [[q_start, q_end)]`` ([CLS] sees the user query span only).

Loss: ``L = L_lm + cls_weight * L_cls`` with ``L_lm`` the token-mean next-token cross-entropy over
the labelled tokens (all tokens but [CLS]/padding in pretraining, the response without the
prefill in alignment) and ``L_cls`` the binary cross-entropy of the safety logit of the [CLS]
row (label 1 = malicious). Paper: ``cls_weight`` 0.01 (pretraining), 0.1 or 0.01 (alignment).

Distributed training is the ``transformers.Trainer``'s (accelerate: DDP, FSDP, torchrun):
:class:`EssTrainer` only overrides ``compute_loss`` and normalises the LM term by the token count
of the *global* batch, so N processes compute the same update as one process on the same batch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import contextlib
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, Trainer

from ..data import corpus, load_split
from ..integrations.hf import apply_safekern
from ..evaluation import is_refusal
from ..safety.prompts import _encode, _encode_template, encode_prompts, template_split
from ..safety.attach import attach
from ..safety.delta import load_safety, save_safety
from ..ops.dispatch import BACKENDS
from .frozen import example_windows
from ..models.tiny import build_tokenizer, tiny_llama_config

PHASES = ("pretraining", "alignment")
IGNORE = -100


# ----------------------------------------------------------------------------------- collator

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


# ------------------------------------------------------------------------------- model + loss

def unsafe_logit(head_out: torch.Tensor) -> torch.Tensor:
    """Safety-head output ``(B,)``, ``(B, 1)`` (logit) or ``(B, 2)`` (2-class) -> ``(B,)`` logit.

    A 2-class head is the same model as a binary one with logit ``z1 - z0``.
    """
    if head_out.dim() == 2 and head_out.shape[1] == 2:
        return head_out[:, 1] - head_out[:, 0]
    if head_out.dim() == 2 and head_out.shape[1] == 1:
        return head_out[:, 0]
    if head_out.dim() == 1:
        return head_out
    raise ValueError(f"safety head output must be (B,), (B, 1) or (B, 2), got "
                     f"{tuple(head_out.shape)}")


class EssForTraining(nn.Module):
    """A causal LM with its attached safety head as one module, so DDP/FSDP wrap and sync both.

    Args:
        model: a transformers ``*ForCausalLM`` after ``safekern.attach`` (``model.safety_head``)
            and ``safekern.integrations.hf.apply_safekern`` (``attn_implementation="safekern"``).
        attention_backend: ``ess_attention`` backend. ``"auto"`` (default) trains on the fused
            Triton kernels (forward + FlashAttention-2-style backward, O(L) memory) on a GPU
            and on the reference on a CPU; ``"triton"`` / ``"torch"`` force one.

    ``forward`` runs the decoder once with the phase-mask metadata and returns
    ``{"logits": (B, L, V), "cls_logits": (B,)}``: the safety head reads the final-norm hidden
    state of the [CLS] row (index 0). Other batch keys (labels, spans, num_items_in_batch) are
    accepted and ignored: the loss lives in :func:`ess_loss`.
    """

    accepts_loss_kwargs = True  # Trainer: count label tokens over the global batch

    def __init__(self, model: nn.Module, attention_backend: str = "auto"):
        super().__init__()
        for name in ("model", "lm_head", "safety_head"):
            if not hasattr(model, name):
                raise TypeError(f"model must be a transformers *ForCausalLM with .{name} "
                                "(call safekern.attach first)")
        from ..integrations.hf import _refuse_adapter

        _refuse_adapter(model)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl != "safekern":
            raise ValueError(f"model must use attn_implementation='safekern' (got {impl!r}): call "
                             "safekern.integrations.hf.apply_safekern(model) so the phase masks "
                             "reach every layer")
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got "
                             f"{attention_backend!r}")
        self.lm, self.attention_backend = model, attention_backend

    def forward(self, input_ids, response_start, cls_windows, key_bias=None, **_ignored):
        out = self.lm.model(input_ids=input_ids, response_start=response_start,
                            cls_windows=cls_windows, key_bias=key_bias, use_cache=False,
                            safekern_backend=self.attention_backend)
        h = out.last_hidden_state                                       # after the final norm
        return {"logits": self.lm.lm_head(h),
                "cls_logits": unsafe_logit(self.lm.safety_head(h[:, 0]))}


def ess_loss(logits: torch.Tensor, cls_logits: torch.Tensor, labels: torch.Tensor,
             safety_labels: torch.Tensor, *, cls_weight: float,
             num_items_in_batch: Optional[float] = None, lm_scale: float = 1.0,
             cls_scale: float = 1.0):
    """Joint ESS loss ``L_lm + cls_weight * L_cls``.

    Args:
        logits: ``(B, L, V)`` LM logits; labels ``(B, L)`` int64 with -100 = ignored (shifted
            here: logits at ``i`` predict ``labels[i + 1]``).
        cls_logits: ``(B,)`` safety logits; safety_labels ``(B,)`` in {0, 1}.
        num_items_in_batch: divisor of the summed LM loss (the label count of the global batch
            under the Trainer); None = this batch's label count.
        lm_scale, cls_scale: extra factors (the Trainer's process-count and gradient-accumulation
            corrections).
    Returns:
        ``(loss, lm, cls)``: the scaled total, and the unscaled terms for logging.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits (B, L, V) and labels (B, L) disagree: {tuple(logits.shape)} vs "
                         f"{tuple(labels.shape)}")
    if cls_logits.shape != safety_labels.shape or cls_logits.dim() != 1:
        raise ValueError(f"cls_logits and safety_labels must both be (B,), got "
                         f"{tuple(cls_logits.shape)} and {tuple(safety_labels.shape)}")
    if not cls_weight >= 0:
        raise ValueError(f"cls_weight must be >= 0, got {cls_weight}")
    target = labels[:, 1:].reshape(-1)
    lm_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target,
                             ignore_index=IGNORE, reduction="sum")
    count = (target != IGNORE).sum().clamp(min=1) if num_items_in_batch is None \
        else num_items_in_batch
    lm = lm_sum / count
    cls = F.binary_cross_entropy_with_logits(cls_logits.float(), safety_labels.float())
    return lm * lm_scale + cls_weight * cls * cls_scale, lm.detach(), cls.detach()


def compute_loss(model: nn.Module, inputs: Dict[str, torch.Tensor], *, cls_weight: float,
                 num_items_in_batch=None, lm_scale: float = 1.0, cls_scale: float = 1.0):
    """Forward an :class:`EssForTraining` (possibly DDP/FSDP-wrapped) on a collated batch.

    Returns ``(loss, outputs)`` with ``outputs`` holding logits, cls_logits, lm and cls.
    """
    out = model(**inputs)
    loss, lm, cls = ess_loss(out["logits"], out["cls_logits"], inputs["labels"],
                             inputs["safety_labels"], cls_weight=cls_weight,
                             num_items_in_batch=num_items_in_batch, lm_scale=lm_scale,
                             cls_scale=cls_scale)
    return loss, {**out, "lm": lm, "cls": cls}


class EssTrainer(Trainer):
    """``transformers.Trainer`` with the ESS joint loss.

    Pass an :class:`EssForTraining` as ``model``, an :class:`EssCollator` as ``data_collator``
    and ``TrainingArguments(remove_unused_columns=False, ...)``. Extra argument:
    ``cls_weight`` (lambda of the joint loss, default 0.1 = the paper's alignment setting).

    Scaling: the LM term is the token mean over the whole global batch (all processes, all
    gradient-accumulation micro-batches: the Trainer's ``num_items_in_batch``), times the
    process count because DDP averages gradients; the classification term is the mean over the
    local rows divided by the accumulation steps (equal per-process batch sizes make that the
    global mean). Hence ``loss_is_scaled_for_ga = True``.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, cls_weight: float = 0.1, **kwargs):
        if isinstance(cls_weight, bool) or not isinstance(cls_weight, (int, float)) \
                or not cls_weight >= 0:
            raise ValueError(f"cls_weight must be a float >= 0, got {cls_weight!r}")
        super().__init__(*args, **kwargs)
        self.cls_weight = float(cls_weight)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Evaluation (model.eval()) has no accumulation.
        accum = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        per_micro_batch = 1.0 / accum
        if num_items_in_batch is None:          # local token mean: scale like the cls term
            lm_scale = per_micro_batch
        else:
            lm_scale = float(self.accelerator.num_processes) \
                if self.args.average_tokens_across_devices else 1.0
        cls_scale = per_micro_batch
        loss, out = compute_loss(model, inputs, cls_weight=self.cls_weight,
                                 num_items_in_batch=num_items_in_batch, lm_scale=lm_scale,
                                 cls_scale=cls_scale)
        return (loss, out) if return_outputs else loss


# --------------------------------------------------------------------------- the tiny default

def recipe_key() -> str:
    """Short hash of what decides the trained tiny model: the package version, the embedded
    train split and this recipe's source. A cache from another version is never reused."""
    import hashlib
    from importlib import resources

    from .._version import __version__

    h = hashlib.sha256(__version__.encode())
    h.update(resources.files("safekern.data").joinpath("ess_train.jsonl").read_bytes())
    with open(__file__, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:10]


def default_cache_dir() -> str:
    """``$SAFEKERN_CACHE/tiny-<recipe_key>`` (base default ``~/.cache/safekern``): where
    ``safekern train --tiny`` saves and ``safekern demo --model tiny`` looks."""
    from ..models import cache_base

    return os.path.join(cache_base(), f"tiny-{recipe_key()}")


@contextlib.contextmanager
def _torch_threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def train_tiny(out_dir: Optional[str] = None, *, steps: int = 300, batch_size: int = 32,
               lr: float = 3e-3, pretrain_fraction: float = 0.25,
               cls_weight: Tuple[float, float] = (0.01, 0.1), vocab_size: int = 1024,
               seed: int = 0, progress: bool = True, log=print) -> Dict:
    """Train the embedded tiny Llama with [CLS] + safety head from scratch on the embedded data.

    CPU-sized: a 4-layer, 128-wide Llama (``safekern.models.tiny``) and a byte-level BPE tokenizer
    learnt from the train split. The first ``pretrain_fraction`` of the steps run the
    pretraining phase (LM on every token, [CLS] sees all, nobody sees [CLS]), the rest the
    alignment phase; ``cls_weight`` is lambda per phase (paper: 0.01, then 0.1).
    Saves to ``out_dir`` (default :func:`default_cache_dir`): the model and tokenizer
    (``save_pretrained``) and the safety delta (``safekern.save_safety``) in ``out_dir/safety``.

    Returns a summary dict: steps, seconds, final lm/cls losses, out_dir.
    """
    for name, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not 0.0 <= pretrain_fraction < 1.0:
        raise ValueError(f"pretrain_fraction must be in [0, 1), got {pretrain_fraction}")
    out_dir = out_dir or default_cache_dir()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(corpus("train"), vocab_size=vocab_size)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer) + 1))
    attach(model, tokenizer)
    apply_safekern(model)
    wrapped = EssForTraining(model)
    rows = load_split("train")
    collate = {ph: EssCollator(tokenizer, phase=ph) for ph in PHASES}
    opt = torch.optim.AdamW(wrapped.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    n_pre = int(steps * pretrain_fraction)
    gen = torch.Generator().manual_seed(seed)
    order: List[int] = []
    bar = _progress(range(steps), progress)
    wrapped.train()
    # One thread: float reductions then do not depend on the machine's core count, so the same
    # seed gives the same model, and the same evaluation table, on every machine.
    with _torch_threads(1):
        for step in bar:
            if len(order) < batch_size:
                order += torch.randperm(len(rows), generator=gen).tolist()
            batch_rows, order = [rows[i] for i in order[:batch_size]], order[batch_size:]
            phase = "pretraining" if step < n_pre else "alignment"
            loss, out = compute_loss(wrapped, collate[phase](batch_rows),
                                     cls_weight=cls_weight[phase == "alignment"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
            opt.step()
            sched.step()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(phase=phase[:5], lm=f"{out['lm']:.3f}", cls=f"{out['cls']:.3f}")
    seconds = time.perf_counter() - t0
    save_tiny(model, tokenizer, out_dir)
    summary = {"steps": steps, "seconds": round(seconds, 1), "lm": float(out["lm"]),
               "cls": float(out["cls"]), "out_dir": out_dir}
    if log is not None:
        log(f"trained tiny ESS model: {summary}")
    return summary


def _progress(it, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return it
    return tqdm(it, desc="safekern train --tiny", unit="step")


def save_tiny(model, tokenizer, out_dir: str) -> str:
    """Save model + tokenizer (``save_pretrained``) and the safety delta to ``out_dir/safety``."""
    os.makedirs(out_dir, exist_ok=True)
    # The head is saved once, in the delta; the base checkpoint stays a plain causal LM.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("safety_head.")}
    model.save_pretrained(out_dir, state_dict=state)
    tokenizer.save_pretrained(out_dir)
    save_safety(model, os.path.join(out_dir, "safety"))
    return out_dir


def load_tiny(out_dir: Optional[str] = None):
    """Load what :func:`save_tiny` wrote: ``(model, tokenizer)`` in eval mode, safety attached,
    ``attn_implementation="safekern"``. Raises FileNotFoundError when nothing is there."""
    out_dir = out_dir or default_cache_dir()
    if not os.path.isfile(os.path.join(out_dir, "safety", "safety.json")):
        raise FileNotFoundError(f"no trained tiny model in {out_dir!r}: run `safekern train "
                                "--tiny` first")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    load_safety(model, tokenizer, os.path.join(out_dir, "safety"))
    apply_safekern(model)
    return model.eval(), tokenizer
