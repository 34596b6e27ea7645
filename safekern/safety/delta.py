"""The safety delta on disk: ``save_safety`` / ``load_safety``.

Only the delta (head, [CLS] embedding row, [CLS] LM-head row when untied, the [CLS] adapter when
there is one, config) is saved, as ``safety.json`` + ``safety.safetensors``. Format version 2
adds the adapter, the windows it was trained for and its operating point; version-1 deltas (the
linear head) load as rank 0. Version 3 is a version-2 delta with the cascade's token-row
screening probe (``safekern.safety.probe``: ``probe.weight``, ``probe.bias`` and a ``"probe"``
record); a delta without a probe is still written as version 2. Every tensor's shape is checked
against the model's config, naming the file and the tensor; unknown tensors are an error.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Dict, Tuple

import torch
from torch import nn

from .adapter import adapter_of, adapter_shapes, check_meta, check_targets
from .probe import check_probe_meta, probe_from, probe_of, probe_shapes, set_probe
from ..spec import EssConfig
from .attach import add_adapter, attach
from .config import (_FORMAT_VERSION, CLS_POSITIONS, _require_tokenizer,
                     _require_transformers_model, decoder_layers, safety_config)




_READABLE_VERSIONS = (1, 2, 3)


_PROBE_VERSION = 3  # a delta with the cascade's screening probe (safekern.safety.probe)


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


__all__ = ["save_safety", "load_safety"]
