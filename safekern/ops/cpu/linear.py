"""Decode-step linear layers on CPU that read each weight once for all rows (issue 11).

``linear(x, weights, biases)`` returns ``[x @ W.T + b for W, b in ...]`` for fp32 ``x (M, K)``
and ``nn.Linear`` weights ``(N, K)``, from the C++ kernel in ``cpu_linear.cpp`` (AVX2 + FMA
tiles everywhere, AVX-512 tiles where the CPU has AVX-512F: ``isa()``): a tile of weight rows
is loaded once and multiplied by every row of ``x``, so extra rows (the [CLS] rows) cost FMAs,
not another pass over the weights (``benchmarks/bench_cpu_linear.py``). Several weights that
share ``x`` (q/k/v, gate/up) run in one call and one parallel loop over the torch threads,
without concatenated copies of the weights. ``pack`` + ``packed_linear`` are the packed-panel
variant (``cpu_linear_packed.h``: an outer product over ``(N/P, K, P)`` weight copies, no
horizontal sums; faster when K is small and the weights sit in cache). ``safekern.ops.cpu.decode_linear``
decides per M which of these or MKL runs.

The kernel is compiled on first use with ``torch.utils.cpp_extension`` (g++, ~20 s once, cached
in ``TORCH_EXTENSIONS_DIR`` under a name keyed on the source and flags).
``unavailable_reason()`` says why it cannot run (not x86-64, no AVX2/FMA,
``SAFEKERN_CPU_LINEAR=0``, a bad ``SAFEKERN_CPU_LINEAR_ISA``, no compiler, build error);
callers then use ``F.linear``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import warnings
from typing import List, Optional, Sequence

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_linear.cpp")
HEADER = os.path.join(os.path.dirname(SOURCE), "cpu_linear_tile.h")
PACKED = os.path.join(os.path.dirname(SOURCE), "cpu_linear_packed.h")
# The fused CPU ESS controller (safekern.ops.cpu.controller) is built into the same extension.
CONTROLLER = os.path.join(os.path.dirname(SOURCE), "cpu_controller.cpp")
# So is the decode-step ESS attention (safekern.ops.cpu.attention).
ATTENTION = os.path.join(os.path.dirname(SOURCE), "cpu_attention.cpp")
# And the [CLS] adapter's deltas (safekern.safety.adapter).
ADAPTER = os.path.join(os.path.dirname(SOURCE), "cpu_adapter.cpp")
# -fopenmp: without it ATen's at::parallel_for compiles to a serial loop in an extension (its
# OpenMP path is header code guarded by _OPENMP), and the kernel would ignore the torch threads.
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")
ISAS = ("avx2", "avx512")        # the op's ``isa`` argument is an index into this
# Above this many rows MKL's sgemm is compute-efficient and wins (bench_cpu_linear.py).
MAX_ROWS = 32

_reason: Optional[str] = None
_loaded = False
_isa = 0


def _check_platform() -> Optional[str]:
    if os.environ.get("SAFEKERN_CPU_LINEAR", "1") == "0":
        return "disabled by SAFEKERN_CPU_LINEAR=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is x86-64 AVX2 code; this machine is {platform.machine()}"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2/FMA (torch reports capability {cap})"
    return None


def _build_name() -> str:
    """The extension's name, keyed on its source and flags: checkouts with different kernels
    sharing one ``TORCH_EXTENSIONS_DIR`` then keep separate builds instead of rebuilding over
    each other."""
    h = hashlib.sha1(" ".join(CFLAGS).encode())
    for path in (SOURCE, HEADER, PACKED, CONTROLLER, ATTENTION, ADAPTER):
        with open(path, "rb") as f:
            h.update(f.read())
    return f"safekern_cpu_linear_{h.hexdigest()[:10]}"


@contextlib.contextmanager
def _build_guard(name: str):
    """Hold an OS lock on the extension's build directory while torch builds or loads it, and
    remove torch's own ``lock`` file there when it is stale.

    torch's ``FileBaton`` is a bare file that records no owner: a build killed mid-way (Ctrl-C,
    a timeout) leaves it behind, and every later ``load`` of that name waits on it forever at
    0% CPU. Our ``flock`` is released by the OS when its process dies, so once we hold it no
    other safekern process is building this name: a ``lock`` file still there is stale."""
    try:
        import fcntl
        from torch.utils.cpp_extension import _get_build_directory
        build_dir = _get_build_directory(name, verbose=False)
        guard = open(os.path.join(build_dir, "safekern.lock"), "a")
    except Exception:              # no fcntl (Windows), a torch without the helper: no guard
        yield
        return
    with guard:
        fcntl.flock(guard, fcntl.LOCK_EX)          # waits for a live build in another process
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            warnings.warn(f"removing a stale build lock left by an interrupted build: {stale}",
                          RuntimeWarning, stacklevel=4)
            os.remove(stale)
        yield                                      # the flock goes with the file's close


def _choose_isa() -> Optional[str]:
    """Pick the instruction set (``SAFEKERN_CPU_LINEAR_ISA`` or the widest the CPU has);
    None, or why the requested one cannot run."""
    global _isa
    have = torch.ops.safekern_cpu.isas().split(",")
    want = os.environ.get("SAFEKERN_CPU_LINEAR_ISA", have[-1])
    if want not in ISAS:
        return f"SAFEKERN_CPU_LINEAR_ISA must be one of {ISAS}, got {want!r}"
    if want not in have:
        return f"SAFEKERN_CPU_LINEAR_ISA={want} but this CPU runs only {have}"
    _isa = ISAS.index(want)
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

            name = _build_name()
            with _build_guard(name):
                load(name=name, sources=[SOURCE, CONTROLLER, ATTENTION, ADAPTER],
                     is_python_module=False, extra_cflags=list(CFLAGS),
                     extra_include_paths=[os.path.dirname(SOURCE)], verbose=False)
        except Exception as e:  # no compiler, no ninja, a build error: fall back, say why
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _reason = f"building the C++ kernel failed ({first[:200]})"
    if _reason is None:
        _reason = _choose_isa()
        _loaded = _reason is None
    return _reason


def isa() -> Optional[str]:
    """The instruction set the kernel runs (``"avx512"`` or ``"avx2"``), None when it cannot
    run."""
    return ISAS[_isa] if unavailable_reason() is None else None


def linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
           biases: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
    """``[x @ w.T (+ b)]`` per weight, in one call (the kernel must be available).

    Args:
        x: ``(..., K)`` float32 CPU tensor, unit stride in K (leading dims flattened to M).
        weights: ``(N_i, K)`` contiguous float32 tensors (``nn.Linear.weight``).
        biases: ``(N_i,)`` float32 tensors or None, one per weight (default: no biases).
    Returns:
        ``(..., N_i)`` float32 tensors. Each row's result is independent of the other rows.
    """
    if biases is None:
        biases = [None] * len(weights)
    return torch.ops.safekern_cpu.linear(x, list(weights), list(biases), _isa)


def panel_width() -> int:
    """Output columns per packed panel of the running instruction set (32 AVX-512, 16 AVX2)."""
    if unavailable_reason() is not None:
        raise RuntimeError(f"the CPU linear kernel cannot run: {unavailable_reason()}")
    return 32 if ISAS[_isa] == "avx512" else 16


def pack(w: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w (N, K)`` as the packed path's ``(ceil(N / P), K, P)`` panels (a copy; columns past
    ``N`` are zero), ``P = panel_width()``; into ``out`` (a previous ``pack`` of a weight of
    the same shape) when given. Repack after the weight changes."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != torch.float32 or \
            w.device.type != "cpu":
        raise ValueError(f"w must be a (N, K) float32 CPU tensor, got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    P = panel_width()
    N, K = w.shape
    NP = -(-N // P)
    if out is None:
        out = w.new_zeros(NP, K, P)
    elif out.shape != (NP, K, P) or out.dtype != w.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(NP, K, P)} float32 tensor, got "
                         f"{tuple(out.shape)}")
    torch.ops.safekern_cpu.pack_weight(w.detach().contiguous(), out)
    return out


def packed_linear(x: torch.Tensor, packs: Sequence[torch.Tensor], ns: Sequence[int],
                  biases: Optional[Sequence[Optional[torch.Tensor]]] = None
                  ) -> List[torch.Tensor]:
    """``linear(x, weights, biases)`` from ``[pack(w) for w in weights]`` and the weights'
    output counts ``ns``: an outer-product kernel with no horizontal sums (faster than
    ``linear`` when K is small and the weights sit in cache). Same row independence."""
    if biases is None:
        biases = [None] * len(packs)
    return torch.ops.safekern_cpu.packed_linear(x, list(packs), list(ns), list(biases), _isa)
