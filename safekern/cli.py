"""Command line: ``safekern bench | info | train | demo``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch


def _bench_attention(args) -> int:
    """Time ess_attention (ESS mode: [CLS] row + windows + key bias) vs plain causal."""
    from . import ess_attention
    from .benchmarking import environment, format_table, time_fn, write_csv

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    rows = []
    for L in args.seqlens:
        B, Hq, Hkv, D = 1, 8, 2, 64
        q = torch.randn(B, L, Hq, D, device=device, dtype=dtype)
        k = torch.randn(B, L, Hkv, D, device=device, dtype=dtype)
        v = torch.randn(B, L, Hkv, D, device=device, dtype=dtype)
        q_pos = torch.arange(L, device=device, dtype=torch.int32)[None]
        rs = torch.tensor([L // 2], device=device, dtype=torch.int32)
        win = torch.tensor([[[1, L // 4], [L // 2, L]]], device=device, dtype=torch.int32)
        bias = torch.zeros(B, 1, L, device=device)
        for name, kw in (("causal", {}), ("ess", dict(response_start=rs, cls_windows=win,
                                                       key_bias=bias))):
            t = time_fn(lambda: ess_attention(q, k, v, q_pos=q_pos, backend=args.backend, **kw),
                        device=device, reps=args.reps)
            flops = 4 * B * Hq * L * L * D / 2
            rows.append({"seqlen": L, "mode": name, "ms": t["ms"],
                         "gflops": flops / (t["ms"] * 1e-3) / 1e9})
    print(format_table(rows, ["seqlen", "mode", "ms", "gflops"]))
    print("csv:", write_csv(args.csv, rows, environment(device)))
    return 0


def _train(args) -> int:
    """Train the embedded tiny ESS model from scratch (CPU minutes)."""
    if not args.tiny:
        print("only the embedded tiny recipe runs from the CLI (--tiny); for a real checkpoint "
              "use safekern.train.EssTrainer (docs/TRAINING.md)", file=sys.stderr)
        return 2
    from .train import train_tiny

    train_tiny(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    return 0


def _demo(args) -> int:
    """Safety off vs strategic decoding on held-out benign, malicious and prefill prompts."""
    from .demo import run_demo

    run_demo(args.model, per_kind=args.per_kind, max_new_tokens=args.max_new_tokens,
             backend=args.backend)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="safekern", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time ess_attention on the embedded default shapes")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--backend", default="auto")
    b.add_argument("--seqlens", type=int, nargs="+", default=[128, 512])
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--csv", default="bench_out/attention.csv")
    b.set_defaults(fn=_bench_attention)
    i = sub.add_parser("info", help="print versions, device and runnable backends as JSON")
    i.set_defaults(fn=lambda a: print(json.dumps(__import__("safekern").info(), indent=2)) or 0)
    t = sub.add_parser("train", help="train the tiny ESS model on the embedded data (CPU)")
    t.add_argument("--tiny", action="store_true", help="the embedded tiny Llama recipe")
    t.add_argument("--out", default=None, help="output dir (default $SAFEKERN_CACHE or "
                   "~/.cache/safekern/tiny)")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_train)
    d = sub.add_parser("demo", help="safety off vs strategic decoding with the tiny model")
    d.add_argument("--model", default=None, help="dir written by `safekern train --tiny` "
                   "(trained first when missing)")
    d.add_argument("--per-kind", type=int, default=3)
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--backend", default="auto")
    d.set_defaults(fn=_demo)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
