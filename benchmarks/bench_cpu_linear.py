"""Question: which CPU linear path makes a decode step's extra rows (the [CLS] row) nearly free?

Per SmolLM2-135M shape (576->576 q/o, 576->192 k/v, 576->960 fused qkv, 576->1536 gate/up,
576->3072 fused gate+up, 1536->576 down, 576->49152 LM head) and M = 1, 2, 4, 8, 16, 32 rows,
the candidates run A/B interleaved in one process over 30 weight copies per shape (the model's
30 layers, so weights come from memory as in a real decode step, not from a hot L2):

* ``F.linear``: MKL sgemm (today's path);
* ``mkl_packed``: ``torch.ops.mkl._mkl_linear`` over a weight packed for that M (inductor's
  fp32 freezing path);
* ``onednn_packed``: ``torch.ops.mkldnn._linear_pointwise`` over a prepacked oneDNN weight;
* ``safekern``: ``safekern.ops.cpu_linear`` (reads each weight tile once for all M rows).

Prints ms per GEMM (median), the ratio to the same candidate at M = 1, and the max error vs
float64 relative to F.linear's; writes ``bench_out/cpu_linear.csv``.

    python benchmarks/bench_cpu_linear.py [--threads 2] [--reps 15] [--quick]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from safekern.benchmarking import environment, format_table, interleaved_medians, write_csv
from safekern.ops import cpu_linear

SHAPES = {"q,o": (576, 576), "k,v": (576, 192), "qkv": (576, 960), "gate,up": (576, 1536),
          "gate+up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}
ROWS = (1, 2, 4, 8, 16, 32)


def candidates(ws, x):
    """name -> callable running the GEMM over every weight copy in ``ws``."""
    M = x.shape[0]
    out = {"F.linear": lambda: [F.linear(x, w) for w in ws]}
    try:
        mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, M) for w in ws]
        out["mkl_packed"] = lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, M)
                                     for p, w in zip(mkl, ws)]
    except (AttributeError, RuntimeError):
        pass
    try:
        dnn = [torch.ops.mkldnn._reorder_linear_weight(w, M) for w in ws]
        out["onednn_packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none",
                                                                           [], "") for p in dnn]
    except (AttributeError, RuntimeError):
        pass
    if cpu_linear.unavailable_reason() is None:
        out["safekern"] = lambda: [cpu_linear.linear(x, [w])[0] for w in ws]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--copies", type=int, default=30, help="weight copies per shape (layers)")
    p.add_argument("--quick", action="store_true", help="M = 1, 2, 8 and 5 reps")
    p.add_argument("--cpu-time", action="store_true",
                   help="time in process CPU time (steadier on a loaded machine; 1 thread)")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows_m = (1, 2, 8) if args.quick else ROWS
    reps = 5 if args.quick else args.reps
    clock = time.process_time if args.cpu_time else time.perf_counter
    load = os.getloadavg()[0]
    rows = []
    for name, (K, N) in SHAPES.items():
        copies = 1 if name == "lm_head" else args.copies
        ws = [torch.randn(N, K) / K ** 0.5 for _ in range(copies)]
        at_one = {}
        for M in rows_m:
            x = torch.randn(M, K)
            fns = candidates(ws, x)
            ref = F.linear(x.double(), ws[0].double())
            base_err = (F.linear(x, ws[0]).double() - ref).abs().max().item()
            errs = {k: (f()[0].double() - ref).abs().max().item() / max(base_err, 1e-30)
                    for k, f in fns.items()}
            med = interleaved_medians(fns, reps=reps, clock=clock)
            for k, s in med.items():
                ms = s / copies * 1e3
                at_one.setdefault(k, ms)
                rows.append({"shape": name, "K": K, "N": N, "M": M, "candidate": k, "ms": ms,
                             "vs_M1": ms / at_one[k], "vs_F.linear": s / med["F.linear"],
                             "err_vs_F.linear": errs[k]})
            print(f"{name} M={M}: " + "  ".join(f"{k} {s / copies * 1e3:.4f}"
                                                  for k, s in med.items()), flush=True)
    env = {**environment(torch.device("cpu")), "torch_threads": str(args.threads),
           "loadavg_1min": f"{load:.2f}"}
    print(f"\n{env['device']} | torch {env['torch']} | {args.threads} torch threads | "
          f"median of {reps} | {args.copies} weight copies per shape | load average "
          f"{load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(format_table(rows, ["shape", "M", "candidate", "ms", "vs_M1", "vs_F.linear",
                              "err_vs_F.linear"]))
    print("csv:", write_csv(os.path.join(args.out, "cpu_linear.csv"), rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
