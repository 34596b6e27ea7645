"""Decode-step linear layers on CPU that read each weight once for all rows (issue 11).

``linear(x, weights, biases)`` returns ``[x @ W.T + b for W, b in ...]`` for fp32 ``x (M, K)``
and ``nn.Linear`` weights ``(N, K)``, from the C++ kernel in ``cpu_linear.cpp`` (AVX2 + FMA):
a tile of weight rows is loaded once and multiplied by every row of ``x``, so M = 2 (the token
row and the [CLS] row) costs about what M = 1 does, where MKL's small-M sgemm costs ~2x
(``benchmarks/bench_cpu_linear.py``). Several weights that share ``x`` (q/k/v, gate/up) run in
one call and one parallel loop, without concatenated copies of the weights.

The kernel is compiled on first use with ``torch.utils.cpp_extension`` (g++, ~20 s once, cached
in ``TORCH_EXTENSIONS_DIR``). ``unavailable_reason()`` says why it cannot run (not x86-64, no
AVX2/FMA, ``SAFEKERN_CPU_LINEAR=0``, no compiler, build error); callers then use ``F.linear``.
"""
from __future__ import annotations

import os
import platform
from typing import List, Optional, Sequence

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_linear.cpp")
# Above this many rows MKL's sgemm is compute-efficient and wins (bench_cpu_linear.py).
MAX_ROWS = 32

_reason: Optional[str] = None
_loaded = False


def _check_platform() -> Optional[str]:
    if os.environ.get("SAFEKERN_CPU_LINEAR", "1") == "0":
        return "disabled by SAFEKERN_CPU_LINEAR=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is x86-64 AVX2 code; this machine is {platform.machine()}"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2/FMA (torch reports capability {cap})"
    return None


def unavailable_reason() -> Optional[str]:
    """``None`` when the kernel is built and loaded (building it on the first call), else why
    not. The answer is cached for the process."""
    global _reason, _loaded
    if _loaded or _reason is not None:
        return _reason
    _reason = _check_platform()
    if _reason is None:
        try:
            from torch.utils.cpp_extension import load

            load(name="safekern_cpu_linear", sources=[SOURCE], is_python_module=False,
                 extra_cflags=["-O3", "-mavx2", "-mfma"], verbose=False)
            _loaded = True
        except Exception as e:  # no compiler, no ninja, a build error: fall back, say why
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _reason = f"building the C++ kernel failed ({first[:200]})"
    return _reason


def linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
           biases: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
    """``[x @ w.T (+ b)]`` per weight, in one call (the kernel must be available).

    Args:
        x: ``(M, K)`` float32 CPU tensor, unit stride in K.
        weights: ``(N_i, K)`` contiguous float32 tensors (``nn.Linear.weight``).
        biases: ``(N_i,)`` float32 tensors or None, one per weight (default: no biases).
    Returns:
        ``(M, N_i)`` float32 tensors. Each row's result is independent of the other rows.
    """
    if biases is None:
        biases = [None] * len(weights)
    return torch.ops.safekern_cpu.linear(x, list(weights), list(biases))
