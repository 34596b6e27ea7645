"""Backend registry and selection for safekern ops.

Each op registers its implementations (``torch`` = the reference, ``triton``, ``cuda``) with a
``can_run`` predicate that returns ``None`` when the backend can serve the call, or the reason
it cannot. ``backend="auto"`` (or the ``SAFEKERN_BACKEND`` environment variable) tries the op's
preference order and falls back to the reference; an explicit backend that cannot run raises.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


@dataclass
class Impl:
    fn: Callable
    can_run: Callable[..., Optional[str]]


_REGISTRY: Dict[str, Dict[str, Impl]] = {}
_AUTO_ORDER: Dict[str, Callable[..., List[str]]] = {}


def register(op: str, backend: str, fn: Callable, can_run: Callable[..., Optional[str]]):
    """Register ``fn`` as ``backend`` for ``op``; ``can_run(**ctx)`` says whether it can run."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(fn, can_run)


def set_auto_order(op: str, order: Callable[..., List[str]]):
    """``order(**ctx)`` returns the backends ``auto`` tries, best first (torch is always last)."""
    _AUTO_ORDER[op] = order


def _default_order(device: torch.device, **ctx) -> List[str]:
    return ["cuda", "triton", "torch"] if device.type == "cuda" else ["torch"]


def triton_can_run(device: torch.device, **ctx) -> Optional[str]:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return (f"triton needs CUDA tensors (got {device.type}); on a CPU set TRITON_INTERPRET=1 "
            "before importing safekern to run the kernels in the interpreter")


def resolve_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("SAFEKERN_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"SAFEKERN_BACKEND must be one of {BACKENDS}, got {env!r}")
        return env
    return backend


def choose(op: str, backend: str, **ctx) -> Tuple[str, Callable]:
    """Pick the implementation of ``op`` for a call; ``ctx`` holds at least ``device``."""
    backend = resolve_backend(backend)
    impls = _REGISTRY.get(op, {})
    if backend != "auto":
        impl = impls.get(backend)
        if impl is None:
            raise RuntimeError(f"{op}: backend {backend!r} is not available in this build "
                               f"(available: {sorted(impls)})")
        why = impl.can_run(**ctx)
        if why is not None:
            raise RuntimeError(f"{op}: backend {backend!r} cannot run this call: {why}")
        return backend, impl.fn
    order = _AUTO_ORDER.get(op, _default_order)(**ctx)
    for name in order + ["torch"]:
        impl = impls.get(name)
        if impl is not None and impl.can_run(**ctx) is None:
            return name, impl.fn
    raise RuntimeError(f"{op}: no backend can run this call")


def available(op: str, **ctx) -> Dict[str, Optional[str]]:
    """``{backend: None or reason it cannot run}`` for ``op`` in context ``ctx``."""
    return {name: impl.can_run(**ctx) for name, impl in sorted(_REGISTRY.get(op, {}).items())}


def ops() -> List[str]:
    return sorted(_REGISTRY)
