"""Shared timing helpers for ``benchmarks/`` and ``safekern bench``.

GPU: ``triton.testing.do_bench`` (median, p20, p80 in ms). CPU: medians of repeated
``time.perf_counter`` runs. Results are rows of dicts written as CSV with device and versions.
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def time_fn(fn: Callable[[], object], *, device: torch.device, warmup: int = 2,
            reps: int = 10) -> Dict[str, float]:
    """``{"ms": median, "p20": ..., "p80": ...}`` of ``fn()`` on ``device``."""
    if device.type == "cuda":
        import triton.testing

        p20, ms, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])
        return {"ms": ms, "p20": p20, "p80": p80}
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=5) if len(samples) >= 2 else samples * 4
    return {"ms": statistics.median(samples), "p20": q[0], "p80": q[3]}


def interleaved_medians(fns: Dict[str, Callable[[], object]], *, reps: int = 5,
                        warmup: int = 1,
                        clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """CPU A/B timing: run the candidates round-robin and return each one's median seconds.

    ``clock=time.process_time`` measures the CPU time the process used instead of wall time:
    on a shared, oversubscribed CPU it does not count the time slices other jobs took."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = clock()
            f()
            samples[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: torch.device) -> Dict[str, str]:
    from .._version import __version__
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return {"device": device_name(device), "torch": torch.__version__, "triton": tv,
            "safekern": __version__}


def write_csv(path: str, rows: Sequence[Dict[str, object]], env: Dict[str, str]) -> str:
    """Write ``rows`` (plus the environment columns) to ``path``; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    keys += [k for k in env if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**env, **r})
    return path


def format_table(rows: Sequence[Dict[str, object]], columns: Sequence[str],
                 headers: Optional[Dict[str, str]] = None) -> str:
    """Fixed-width text table of ``columns`` from ``rows`` (floats to 3 significant digits),
    each column titled ``headers[column]`` where given, else by its key."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    titles = [(headers or {}).get(c, c) for c in columns]
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(t), *(len(row[i]) for row in cells)) for i, t in enumerate(titles)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(titles), line(["-" * w for w in widths])] + [line(r) for r in cells])
