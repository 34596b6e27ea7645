"""ESS training recipe (docs/DESIGN.md §1): joint loss, ``EssTrainer``, and the tiny default
model; the collator and its phase masks (the row layout) are ``safekern.training.collate``'s.

Loss: ``L = L_lm + cls_weight * L_cls`` with ``L_lm`` the token-mean next-token cross-entropy over
the labelled tokens (all tokens but [CLS]/padding in pretraining, the response without the
prefill in alignment) and ``L_cls`` the binary cross-entropy of the safety logit of the [CLS]
row (label 1 = malicious). Paper: ``cls_weight`` 0.01 (pretraining), 0.1 or 0.01 (alignment).

Distributed training is the ``transformers.Trainer``'s (accelerate: DDP, FSDP, torchrun):
:class:`EssTrainer` only overrides ``compute_loss`` and normalises the LM term by the token count
of the *global* batch, so N processes compute the same update as one process on the same batch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import contextlib
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, Trainer

from ..data import corpus, load_split
from ..integrations.hf import apply_safekern
from ..safety.attach import attach
from ..safety.delta import load_safety, save_safety
from ..ops.dispatch import BACKENDS
from .collate import IGNORE, PHASES, EssCollator
from ..models.tiny import build_tokenizer, tiny_llama_config


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
    train split and this recipe's source (this module and collate). A cache from another version
    is never reused."""
    import hashlib
    from importlib import resources

    from .._version import __version__

    h = hashlib.sha256(__version__.encode())
    h.update(resources.files("safekern.data").joinpath("ess_train.jsonl").read_bytes())
    for path in (__file__, os.path.join(os.path.dirname(__file__), "collate.py")):
        with open(path, "rb") as f:
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

