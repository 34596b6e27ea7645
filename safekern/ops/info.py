"""``safekern.info()``: versions, device and which backends can run here."""
from __future__ import annotations

import importlib
import platform
from typing import Any, Dict, Optional

import torch

from . import dispatch

AVAILABLE = "available"


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # an optional dependency that is absent or broken is just "not there"
        return "not installed"


def info(device: Optional[str] = None) -> Dict[str, Any]:
    """Versions, the device, and per op which backends can run on it.

    Args:
        device: ``"cpu"``/``"cuda"``; default CUDA when available, else CPU.
    Returns:
        A JSON-ready dict with ``versions`` (``"not installed"`` for an absent optional
        package; ``cuda`` is the CUDA version torch was built with, ``"none"`` for a CPU-only
        build), ``device``, ``backends`` (``{op: {backend: "available" or the reason it cannot
        run}}``), ``auto`` (``{op: backend auto picks for bf16 inputs}``, fp32 on CPU) and
        ``cpu_linear`` (``"available"`` or why the C++ CPU kernels cannot run: the engine's
        decode linear path, fused controller and decode attention, one extension; the first
        call on a machine builds it, ~20-60 s).

    >>> info("cpu")["backends"]["ess_attention"]["torch"]
    'available'
    """
    from .cpu import linear as cpu_linear
    from .._version import __version__

    dev = torch.device(device if device is not None else
                       ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ctx = dict(device=dev, dtype=dtype, head_dim=128, seqlen_q=1, seqlen_k=1024, batch=1,
               vocab=32000, hidden=4096, requires_grad=False, sampling=None)
    backends = {op: {name: why or AVAILABLE for name, why in dispatch.available(op, **ctx).items()}
                for op in dispatch.ops()}
    auto = {}
    for op in dispatch.ops():
        try:
            auto[op] = dispatch.choose(op, "auto", **ctx)[0]
        except Exception as e:  # report, do not fail: info() is a diagnostic
            auto[op] = f"error: {e}"
    return {
        "versions": {"safekern": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "cuda": torch.version.cuda or "none",
                     "triton": _version("triton"), "transformers": _version("transformers"),
                     "flash_attn": _version("flash_attn"), "flashinfer": _version("flashinfer")},
        "device": {"type": dev.type, "name": name},
        "backends": backends,
        "auto": auto,
        "cpu_linear": cpu_linear.unavailable_reason() or "available",
    }
