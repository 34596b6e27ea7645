"""Input validation shared by the public ops: raise once, at the boundary, naming the argument.

Shape/dtype/device checks are free. Value checks (ranges, NaN) read tensor contents, which
synchronises with a GPU, so they are skipped while a CUDA graph is being captured, while
``torch.compile`` traces, or when ``SAFEKERN_SKIP_VALUE_CHECKS=1``; internal callers that build
their own inputs (the engine) call the unchecked launchers directly.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterable, Optional, Sequence

import torch

_local = threading.local()

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def value_checks_enabled() -> bool:
    if getattr(_local, "skip", False) or os.environ.get("SAFEKERN_SKIP_VALUE_CHECKS", "0") == "1":
        return False
    if torch.compiler.is_compiling():  # a data-dependent check would break the graph
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def no_value_checks():
    """Skip the host-syncing value checks inside the block (shape/dtype checks still run).

    For internal callers that build the op inputs themselves, e.g. the engine's decode loop.
    """
    prev = getattr(_local, "skip", False)
    _local.skip = True
    try:
        yield
    finally:
        _local.skip = prev


def check_tensor(name: str, x, *, dims: Optional[int] = None, dtypes: Iterable = None,
                 device: Optional[torch.device] = None, shape: Optional[Sequence] = None):
    """Type, rank, dtype, device and shape of ``x``; ``None`` entries in ``shape`` are free."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} is on {x.device}, expected {device} (all inputs on one device)")
    if shape is not None:
        if len(shape) != x.dim() or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


def check_int_range(name: str, x: torch.Tensor, lo: Optional[int], hi: Optional[int]):
    """Every element of an integer tensor in ``[lo, hi]`` (one host sync)."""
    if x.numel() == 0 or not value_checks_enabled():
        return
    bad = torch.zeros_like(x, dtype=torch.bool)
    if lo is not None:
        bad |= x < lo
    if hi is not None:
        bad |= x > hi
    if bool(bad.any()):
        val = x[bad].flatten()[0].item()
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{name} values must be in {rng}, got {val}")


def check_finite(name: str, x: torch.Tensor):
    """No NaN/inf in ``x`` (one host sync)."""
    if value_checks_enabled() and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_choice(name: str, value, choices: Sequence):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def deprecated_alias(name: str, targets, new: str):
    """``(__getattr__, __dir__)`` for a module kept at an old path for one release: warns once
    at import (DeprecationWarning naming ``new``) and forwards every attribute to ``targets``."""
    import importlib
    import warnings

    warnings.warn(f"{name} is deprecated: import from {new} instead (this alias is kept for one "
                  f"release)", DeprecationWarning, stacklevel=3)
    mods = [importlib.import_module(t) for t in targets]

    def __getattr__(attr):
        for m in mods:
            if hasattr(m, attr):
                return getattr(m, attr)
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    def __dir__():
        return sorted({a for m in mods for a in dir(m)})

    return __getattr__, __dir__
