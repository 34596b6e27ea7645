"""Question: which CPU linear path makes a decode step's extra rows (the [CLS] row) nearly free?

Per SmolLM2-135M shape (576->576 q/o, 576->192 k/v, 576->960 fused qkv, 576->1536 gate/up,
576->3072 fused gate+up, 1536->576 down, 576->49152 LM head) and M = 1, 2, 4, 8, 16, 32 rows,
the candidates run A/B interleaved in one process over 30 weight copies per shape (the model's
30 layers, so weights come from memory as in a real decode step, not from a hot L2):

* ``F.linear``: MKL sgemm (today's path);
* ``mkl_packed``: ``torch.ops.mkl._mkl_linear`` over a weight packed for that M (inductor's
  fp32 freezing path);
* ``onednn_packed``: ``torch.ops.mkldnn._linear_pointwise`` over a prepacked oneDNN weight;
* ``safekern_avx2`` / ``safekern_avx512``: ``safekern.ops.cpu.linear`` (reads each weight tile
  once for all M rows) with each instruction set this CPU has;
* ``safekern_packed``: ``cpu_linear.packed_linear`` over ``cpu_linear.pack`` panels (outer
  product, no horizontal sums; the engine offers it for models whose projections fit in
  ``decode_linear.PACK_MAX_BYTES``).

Prints ms per GEMM (median), the ratio to the same candidate at M = 1, and the max error vs
float64 relative to F.linear's; writes ``bench_out/cpu_linear.csv``.

    python benchmarks/bench_cpu_linear.py [--threads 2] [--reps 15] [--quick] [--layers]
        [--rows 1 4 16 17 ...]

``--layers``: instead, a whole decode step's projections over 30 layers per M, as the engine
calls them (the numbers behind ``safekern.ops.cpu.decode_linear``'s per-M choice).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from safekern.ops.timing import environment, format_table, interleaved_medians, write_csv
from safekern.ops.cpu import linear as cpu_linear

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
        for isa in torch.ops.safekern_cpu.isas().split(","):
            out[f"safekern_{isa}"] = _with_isa(isa, lambda: [cpu_linear.linear(x, [w])[0]
                                                            for w in ws])
        packs = [cpu_linear.pack(w) for w in ws]
        out["safekern_packed"] = lambda: [cpu_linear.packed_linear(x, [p], [w.shape[0]])[0]
                                          for p, w in zip(packs, ws)]
    return out


def _with_isa(isa, fn):
    """``fn`` run with the kernel's instruction set set to ``isa``."""
    def run():
        saved = cpu_linear._isa
        cpu_linear._isa = cpu_linear.ISAS.index(isa)
        try:
            return fn()
        finally:
            cpu_linear._isa = saved
    return run


LAYER = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
         "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
# ``--layers --tiny``: the tiny model's layer (safekern.models.tiny: hidden 128, KV 32, MLP 344).
TINY_LAYER = {"q": (128, 128), "k": (128, 32), "v": (128, 32), "o": (128, 128),
              "gate": (128, 344), "up": (128, 344), "down": (344, 128)}


def layer_candidates(layers, x):
    """A decode step's projections over every layer, as the engine calls them: MKL (seven
    ``F.linear``) vs the kernel (q/k/v in one call, o, gate/up in one call, down) per ISA."""
    def mkl():
        for w in layers:
            F.linear(F.linear(x, w["q"]), w["o"])
            F.linear(x, w["k"]), F.linear(x, w["v"])
            F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])

    def kernel():
        for w in layers:
            q, _, _ = cpu_linear.linear(x, [w["q"], w["k"], w["v"]])
            cpu_linear.linear(q, [w["o"]])
            g, u = cpu_linear.linear(x, [w["gate"], w["up"]])
            cpu_linear.linear(F.silu(g) * u, [w["down"]])

    out = {"F.linear": mkl}
    if cpu_linear.unavailable_reason() is None:
        for isa in torch.ops.safekern_cpu.isas().split(","):
            out[f"safekern_{isa}"] = _with_isa(isa, kernel)
        packed = [{k: (cpu_linear.pack(v), v.shape[0]) for k, v in w.items()} for w in layers]

        def run_packed():
            lin = cpu_linear.packed_linear
            for p in packed:
                q, _, _ = lin(x, *zip(p["q"], p["k"], p["v"]))
                lin(q, [p["o"][0]], [p["o"][1]])
                g, u = lin(x, *zip(p["gate"], p["up"]))
                lin(F.silu(g) * u, [p["down"][0]], [p["down"][1]])

        out["safekern_packed"] = run_packed
    return out


def run_layers(args, clock, reps, rows_m):
    """``--layers``: the whole decode step's projections (30 SmolLM2 layers) per M."""
    shapes = TINY_LAYER if args.tiny else LAYER
    layers = [{k: torch.randn(n, kk) / kk ** 0.5 for k, (kk, n) in shapes.items()}
              for _ in range(args.copies)]
    flops = 2 * sum(kk * n for kk, n in shapes.values()) * args.copies
    rows = []
    for M in rows_m:
        x = torch.randn(M, shapes["q"][0])
        med = interleaved_medians(layer_candidates(layers, x), reps=reps, clock=clock)
        for k, sec in med.items():
            rows.append({"M": M, "candidate": k, "ms": sec * 1e3,
                         "GFLOP/s": flops * M / sec / 1e9, "vs_F.linear": sec / med["F.linear"]})
        print(f"layers M={M}: " + "  ".join(f"{k} {v * 1e3:.2f}" for k, v in med.items()),
              flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--copies", type=int, default=None,
                   help="weight copies per shape (layers; default 30, 4 with --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="with --layers: the tiny model's layer shapes (4 layers by default)")
    p.add_argument("--quick", action="store_true", help="M = 1, 2, 8 and 5 reps")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help=f"the row counts M to time (default {' '.join(map(str, ROWS))}); "
                        "vs_M1 is then the ratio to the smallest")
    p.add_argument("--cpu-time", action="store_true",
                   help="time in process CPU time (steadier on a loaded machine; 1 thread)")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--layers", action="store_true",
                   help="time a decode step's projections over --copies layers instead")
    args = p.parse_args(argv)
    if args.copies is None:
        args.copies = 4 if args.tiny else 30
    if args.rows is not None and (args.quick or min(args.rows) < 1):
        p.error("--rows takes row counts >= 1 and does not combine with --quick")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows_m = (1, 2, 8) if args.quick else tuple(sorted(set(args.rows or ROWS)))
    reps = 5 if args.quick else args.reps
    clock = time.process_time if args.cpu_time else time.perf_counter
    load = os.getloadavg()[0]
    if args.layers:
        rows = run_layers(args, clock, reps, rows_m)
        print(f"\n{environment(torch.device('cpu'))['device']} | {args.threads} torch threads | "
              f"{'CPU' if args.cpu_time else 'wall'} time, median of {reps} | {args.copies} "
              f"layers | load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
        print(format_table(rows, ["M", "candidate", "ms", "GFLOP/s", "vs_F.linear"]))
        return 0
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
