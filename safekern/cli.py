"""Command line: ``safekern bench | info | train | demo``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional



def _bench(args) -> int:
    from .bench import run

    return run(args)


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
    b = sub.add_parser("bench", help="strategic decoding overhead per token (P1) and engine vs "
                       "transformers generate (P2) on the embedded default model")
    b.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    b.add_argument("--model", default="tiny", choices=["tiny", "smollm2"],
                   help="tiny (default): the embedded tiny Llama (or --shape), random weights; "
                   "smollm2: SmolLM2-135M-Instruct when installed (safekern.models)")
    b.add_argument("--shape", default="tiny", choices=["tiny", "small", "llama3-8b"],
                   help="model shape, random weights (default: the embedded tiny Llama; small: "
                   "hidden 1024, 8 layers, vocab 32000)")
    b.add_argument("--backend", default="auto")
    b.add_argument("--batch", type=int, nargs="+", help="batch sizes (cpu: 1 4, cuda: 1 16 64)")
    b.add_argument("--prompt-tokens", type=int, help="prompt length (cpu: 64, cuda: 1024)")
    b.add_argument("--new-tokens", type=int, help="tokens per sequence (cpu: 64, cuda: 256)")
    b.add_argument("--reps", type=int, help="timed repetitions per provider (default 15, --quick 3)")
    b.add_argument("--quick", action="store_true", help="batch 1, 32 tokens, 3 reps")
    b.add_argument("--out", default="bench_out", help="directory for the CSV and PNG")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the tiny model, whose matmuls are "
                   "too small to gain from more; 2 for smollm2; 0 = torch default)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(fn=_bench)
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
