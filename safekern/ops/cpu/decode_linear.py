"""The linear layers of one decoder forward, as the engine calls them (issue 11).

``ModuleLinears`` calls the model's own modules (prefill, GPU, anything unusual).
``KernelLinears`` runs a CPU decode step's projections and MLP through
``safekern.ops.cpu.linear`` (reads each weight once for all rows, so the [CLS] row costs FMAs
rather than a second pass over the weights; q/k/v and gate/up each run as one call over the
module weights, no concatenated copies), through its packed-panel variant (small models: copies
of the weights as panels, no horizontal sums) or through MKL, per number of rows and group,
whichever measured faster on this machine. ``decode_linears`` picks one and says why.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..timing import interleaved_medians
from . import linear as cpu_linear


class ModuleLinears:
    """q/k/v, o and the MLP through the layers' own modules."""

    def __init__(self, layers):
        self.layers = layers

    def qkv(self, i: int, h: torch.Tensor):
        sa = self.layers[i].self_attn
        return sa.q_proj(h), sa.k_proj(h), sa.v_proj(h)

    def o(self, i: int, a: torch.Tensor) -> torch.Tensor:
        return self.layers[i].self_attn.o_proj(a)

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.layers[i].mlp(h)

    # The MLP in its three steps (the [CLS] adapter adds deltas between them).
    def gate_up(self, i: int, h: torch.Tensor):
        m = self.layers[i].mlp
        return m.gate_proj(h), m.up_proj(h)

    def act(self, i: int):
        return self.layers[i].mlp.act_fn

    def down(self, i: int, z: torch.Tensor) -> torch.Tensor:
        return self.layers[i].mlp.down_proj(z)


def _params(linears) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    return [m.weight for m in linears], [m.bias for m in linears]


GROUPS = ("qkv", "o", "gate_up", "down")
# The packed path keeps a copy of every projection weight (repacked at the first packed call of
# each generate, see ``KernelLinears.refresh``): offered only for models whose projections fit
# in this many bytes (small models with cache-resident weights, where the tile kernel's
# per-output horizontal sums dominate; a large model would double its weight memory and pay
# the repack per generate).
PACK_MAX_BYTES = 16 << 20
# Calibration: per group, interleaved passes over every layer per path (median): at least
# CALIBRATION_REPS, and enough for CALIBRATION_SECONDS per path (a tiny model's pass is ~30 us,
# where 5 samples mis-rank paths that differ by 30%), at most CALIBRATION_MAX_REPS.
CALIBRATION_REPS = 5
CALIBRATION_SECONDS = 2e-3
CALIBRATION_MAX_REPS = 51
# One path for every M when its pass is within this fraction of each M's fastest (``_resolve``):
# the linears are ~20% of a tiny-model step, a second weight layout in the caches costs more.
SHARED_PATH_SLACK = 0.10
MODES = ("auto", "kernel")
_SHARED_PLANS: Dict[tuple, tuple] = {}     # layer shapes, threads, ISA -> calibration state


def _reps(per_pass: float) -> int:
    """Calibration samples for a pass of ``per_pass`` seconds (see CALIBRATION_SECONDS)."""
    return int(min(CALIBRATION_MAX_REPS,
                   max(CALIBRATION_REPS, CALIBRATION_SECONDS / max(per_pass, 1e-9))))


class KernelLinears:
    """The same layers through ``cpu_linear.linear`` or MKL (``F.linear``), chosen per number
    of rows M and per group (q/k/v, o, gate/up, down) by measurement (issue 11).

    ``mode="auto"``: the first time a decode step has M rows, each group is timed over every
    layer with each path, interleaved (median of at least ``CALIBRATION_REPS`` passes each);
    that per-group plan and the single-path plans are then timed over whole passes (all
    groups, all layers) and the fastest is kept for that M (``plan``; times in
    ``calibration`` and ``pass_times``). The paths: the tile kernel, MKL, and, for models
    whose projections fit in ``PACK_MAX_BYTES``, the packed-panel kernel
    (``cpu_linear.packed_linear`` on copies repacked lazily each generate: no horizontal sums;
    on the tiny model it wins at M = 8, batch 4 with its [CLS] rows). Plans are shared by all
    instances over layers of the same shapes (and threads, ISA) in the process. On an idle
    machine MKL's threaded GEMV wins at M = 1; the kernel wins where MKL's small-M sgemm re-reads the weights per row; which M is
    which depends on the CPU, its load and the thread count, so it is measured, not assumed.
    ``mode="kernel"``: the kernel for every M up to ``cpu_linear.MAX_ROWS`` (tests, A/B).
    Above ``MAX_ROWS`` rows MKL always runs. All paths are fp32 and within reference
    tolerance of each other; only the two kernels guarantee row-independent bits."""

    def __init__(self, layers, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.acts = [layer.mlp.act_fn for layer in layers]
        self.params = {
            "qkv": [_params((layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj)) for layer in layers],
            "o": [_params((layer.self_attn.o_proj,)) for layer in layers],
            "gate_up": [_params((layer.mlp.gate_proj, layer.mlp.up_proj)) for layer in layers],
            "down": [_params((layer.mlp.down_proj,)) for layer in layers],
        }
        nbytes = sum(w.numel() * w.element_size() for per_layer in self.params.values()
                     for ws, _ in per_layer for w in ws)
        # group -> per layer (packs, output counts, biases); None: the packed path is not offered
        self.packed: Optional[Dict[str, list]] = \
            {} if mode == "auto" and nbytes <= PACK_MAX_BYTES else None
        self.refresh()                                # packed lazily, on first use
        # Calibrations are shared by every instance over layers of the same shapes in this
        # process (same threads, same ISA): engines of one model then run the same paths, so
        # their results are bitwise equal, and a new Engine (safekern.generate makes one per
        # call) does not re-measure.
        key = (tuple((g, tuple((tuple(w.shape), b is not None) for ws, bs in per_layer
                               for w, b in zip(ws, bs))) for g, per_layer in self.params.items()),
               self.packed is not None, torch.get_num_threads(), cpu_linear._isa)
        shared = _SHARED_PLANS.setdefault(key, ({}, {}, {}, {}))
        self.plan: Dict[int, Dict[str, str]] = shared[0]  # M -> group -> kernel | mkl | packed
        self.calibration: Dict[int, Dict[str, Dict[str, float]]] = shared[1]  # M -> group -> s
        self.pass_times: Dict[int, Dict[str, float]] = shared[2]  # M -> candidate -> s a pass
        self._candidates: Dict[int, Dict[str, Dict[str, str]]] = shared[3]

    @staticmethod
    def _kernel(x, params):
        return cpu_linear.linear(x, *params)          # (..., K) -> (..., N) in C++

    def refresh(self) -> None:
        """Mark the packed path's weight copies stale: the next packed call repacks them from
        the modules' current weights (the engine calls this at the start of every generate, so
        a weight changed in between, even through ``.data``, is never read stale; a generate
        that runs no packed call pays nothing)."""
        self._stale = self.packed is not None

    @torch.no_grad()
    def _repack(self) -> None:
        self._stale = False
        if self.packed:                      # into the same buffers (one pass at copy speed)
            for group, per_layer in self.params.items():
                for (ws, _), (packs, _, _) in zip(per_layer, self.packed[group]):
                    for w, wp in zip(ws, packs):
                        cpu_linear.pack(w, out=wp)
            return
        for group, per_layer in self.params.items():
            self.packed[group] = [([cpu_linear.pack(w) for w in ws], [w.shape[0] for w in ws],
                                   bs) for ws, bs in per_layer]

    @staticmethod
    def _packed_run(x, packed):
        return cpu_linear.packed_linear(x, *packed)

    @staticmethod
    def _mkl(x, params):
        return [F.linear(x, w, b) for w, b in zip(*params)]

    def _run(self, group: str, i: int, x: torch.Tensor):
        """Layer ``i``'s ``group`` projections of ``x`` by the path planned for its M."""
        M = x.numel() // x.shape[-1]
        if M > cpu_linear.MAX_ROWS:
            return self._mkl(x, self.params[group][i])
        if self.mode == "kernel":
            return self._kernel(x, self.params[group][i])
        plan = self.plan.get(M)
        if plan is None:
            plan = self._calibrate(M, x.dtype)
        return self._run_path(plan[group], group, i, x)

    def _packs(self, group: str) -> list:
        """The packed path's per-layer operands of ``group``, repacked first when stale."""
        if self._stale:
            self._repack()
        return self.packed[group]

    def _run_path(self, path: str, group: str, i: int, x: torch.Tensor):
        if path == "packed":
            return self._packed_run(x, self._packs(group)[i])
        return (self._kernel if path == "kernel" else self._mkl)(x, self.params[group][i])

    @torch.no_grad()
    def _calibrate(self, M: int, dtype) -> Dict[str, str]:
        """Time every path per group at ``M`` rows over all layers; record the fastest."""
        times, plan = {}, {}
        gen = torch.Generator().manual_seed(M)          # leaves the global RNG alone
        for group, per_layer in self.params.items():
            K = per_layer[0][0][0].shape[1]
            x = torch.randn(M, K, dtype=dtype, generator=gen)
            paths = [("kernel", self._kernel, per_layer), ("mkl", self._mkl, per_layer)]
            if self.packed is not None:
                paths.append(("packed", self._packed_run, self._packs(group)))
            fns = {name: (lambda run, ps: lambda: [run(x, p) for p in ps])(run, ps)
                   for name, run, ps in paths}
            t0 = time.perf_counter()
            for f in fns.values():                      # warm-up, and the pass's cost
                f()
            per_pass = (time.perf_counter() - t0) / len(fns)
            times[group] = interleaved_medians(fns, reps=_reps(per_pass))
            plan[group] = min(times[group], key=times[group].get)
        # Groups timed alone mis-rank paths whose cost depends on what ran before (in a decode
        # step the weights of the other groups pass through the caches in between: on the tiny
        # model, packed q/k/v wins alone at M = 4 and loses in a step). So the per-group plan
        # then competes with each single-path plan over whole passes (every group, every
        # layer, in forward order), and the fastest pass is kept.
        names = ["kernel", "mkl"] + (["packed"] if self.packed is not None else [])
        candidates = {"per-group": plan, **{n: dict.fromkeys(self.params, n) for n in names}}
        xs = {g: torch.randn(M, per_layer[0][0][0].shape[1], dtype=dtype, generator=gen)
              for g, per_layer in self.params.items()}

        def whole_pass(cand):
            def run():
                for i in range(len(self.acts)):
                    for g, x in xs.items():
                        self._run_path(cand[g], g, i, x)
            return run

        fns = {n: whole_pass(c) for n, c in candidates.items()}
        self.pass_times[M] = interleaved_medians(
            fns, reps=_reps(sum(times[g][plan[g]] for g in plan)))
        self._candidates[M] = candidates
        self.calibration[M] = times
        self._resolve()
        return self.plan[M]

    def _resolve(self) -> None:
        """Each calibrated M takes its fastest pass, unless one single path is within
        ``SHARED_PATH_SLACK`` of the fastest at every calibrated M: then all take it. Two
        layouts of the weights (originals for MKL / the tile kernel, panels for the packed
        path) in alternating steps double the cache footprint; on the tiny model that cost
        the batch-4 token-only steps ~5% after [CLS] steps had run packed."""
        shared = None
        for path in ("packed", "mkl", "kernel"):
            if all(path in t and t[path] <= (1 + SHARED_PATH_SLACK) * min(t.values())
                   for t in self.pass_times.values()):
                shared = path
                break
        for M, t in self.pass_times.items():
            name = shared or min(t, key=t.get)
            self.plan[M] = dict(self._candidates[M][name])

    def qkv(self, i, h):
        return self._run("qkv", i, h)

    def o(self, i, a):
        return self._run("o", i, a)[0]

    def mlp(self, i, h):
        gate, up = self.gate_up(i, h)
        return self.down(i, self.acts[i](gate) * up)

    def gate_up(self, i, h):
        return self._run("gate_up", i, h)

    def act(self, i):
        return self.acts[i]

    def down(self, i, z):
        return self._run("down", i, z)[0]

    def describe(self) -> str:
        """The measured plan, e.g. ``M=1: mkl; M=2: kernel (o: mkl)``."""
        if self.mode == "kernel":
            return f"cpu_linear kernel for M <= {cpu_linear.MAX_ROWS}"
        parts = []
        for M in sorted(self.plan):
            plan = self.plan[M]
            common = max(set(plan.values()), key=list(plan.values()).count)
            odd = [f"{g}: {p}" for g, p in plan.items() if p != common]
            parts.append(f"M={M}: {common}" + (f" ({', '.join(odd)})" if odd else ""))
        return "; ".join(parts) or "not calibrated yet"


def _kernel_unsupported(layers, device, dtype) -> Optional[str]:
    if device.type != "cpu" or dtype != torch.float32:
        return f"the kernel is for float32 on CPU (the model is {dtype} on {device.type})"
    for layer in layers:
        sa, mlp = layer.self_attn, layer.mlp
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                return f"the MLP ({type(mlp).__name__}) is not gate/up/down + act_fn"
        mods = [sa.q_proj, sa.k_proj, sa.v_proj, sa.o_proj, mlp.gate_proj, mlp.up_proj,
                mlp.down_proj]
        for m in mods:
            if type(m) is not torch.nn.Linear:
                return f"a projection is a {type(m).__name__}, not a plain nn.Linear"
            if not m.weight.is_contiguous() or (m.bias is not None and
                                                not m.bias.is_contiguous()):
                return "a projection weight is not contiguous"
    return cpu_linear.unavailable_reason()


def decode_linears(layers, device: torch.device, dtype: torch.dtype, enabled: bool = True,
                   mode: str = "auto"):
    """``(linears for decode steps, None or why the CPU kernel is not used)``; ``mode`` as in
    ``KernelLinears``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    reason = "disabled by the caller" if not enabled else \
        _kernel_unsupported(layers, device, dtype)
    if reason is None:
        return KernelLinears(layers, mode), None
    return ModuleLinears(layers), reason
