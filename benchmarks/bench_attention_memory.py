"""Does the memory of one ESS attention training step grow as L^2 or as L?

One forward + backward (dq, dk, dv, dkey_bias) of ``ess_attention`` with the alignment-phase
masks and a key bias, per backend and sequence length, each in a fresh process. Reported: the
peak memory the step adds on top of what is live before it (inputs and their gradients'
buffers excluded), and the ratio to the previous length (4x per doubling = quadratic, 2x =
linear).

    python benchmarks/bench_attention_memory.py    # CPU: reference vs Triton (interpreter)
    python benchmarks/bench_attention_memory.py --lengths 1024 4096 16384 --heads 32 8 --dim 128

On a GPU the peak is ``torch.cuda.max_memory_allocated``; on a CPU it is the process's
resident set, sampled every millisecond while the step runs (the Triton kernels run in the
interpreter there: their memory is the kernels' own, their time is not).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssPeak:
    """Peak resident set size while the block runs, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(1e-3)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _step(backend: str, L: int, Hq: int, Hkv: int, D: int, device: str):
    """One measured training step in this process: ``{"peak_mb", "seconds"}``."""
    import torch

    from safekern import ess_attention

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def inputs(n):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, n, Hq, D, generator=g).to(dev, dtype).requires_grad_()
        k = torch.randn(1, n, Hkv, D, generator=g).to(dev, dtype).requires_grad_()
        v = torch.randn(1, n, Hkv, D, generator=g).to(dev, dtype).requires_grad_()
        kb = torch.zeros(1, 1, n, device=dev).requires_grad_()
        P = n // 4
        meta = dict(response_start=torch.tensor([P], dtype=torch.int32, device=dev),
                    cls_windows=torch.tensor([[[1, P]]], dtype=torch.int32, device=dev))
        do = torch.randn(1, n, Hq, D, generator=g).to(dev, dtype)
        return (q, k, v, kb), meta, do

    def run(leaves, meta, do):
        q, k, v, kb = leaves
        o = ess_attention(q, k, v, key_bias=kb, backend=backend, **meta)
        return torch.autograd.grad(o, leaves, do)

    run(*inputs(64))  # warm-up: imports, kernel compilation / interpreter set-up
    leaves, meta, do = inputs(L)
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        grads = run(leaves, meta, do)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        with _RssPeak() as m:
            grads = run(leaves, meta, do)
        peak = m.peak - m.base
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    return {"peak_mb": peak / 2**20, "seconds": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--heads", type=int, nargs=2, default=[2, 1], metavar=("HQ", "HKV"))
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--backends", nargs="+", default=["torch", "triton"])
    p.add_argument("--device", default=None)
    p.add_argument("--child", nargs=2, metavar=("BACKEND", "L"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    Hq, Hkv = args.heads
    if args.child:
        print(json.dumps(_step(args.child[0], int(args.child[1]), Hq, Hkv, args.dim, device)))
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
        # glibc otherwise raises its mmap threshold to the largest freed block and keeps freed
        # heap pages resident: a fixed threshold returns every large tensor to the OS on free,
        # so the resident set follows the live tensors
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    print(f"device {device}  Hq {Hq} Hkv {Hkv} D {args.dim}  one forward + backward, batch 1")
    print(f"{'backend':>8} {'L':>6} {'peak MB':>9} {'x prev':>7} {'seconds':>8}", flush=True)
    for backend in args.backends:
        prev = None
        for L in args.lengths:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, str(L),
                   "--heads", str(Hq), str(Hkv), "--dim", str(args.dim), "--device", device]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{backend:>8} {L:>6}  failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = f"{r['peak_mb'] / prev:.2f}" if prev else ""
            print(f"{backend:>8} {L:>6} {r['peak_mb']:>9.1f} {ratio:>7} {r['seconds']:>8.1f}",
                  flush=True)
            prev = r["peak_mb"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
