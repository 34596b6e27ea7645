"""``safekern``'s argument parser: the description, the argparse types that check every value
(ranges, choices, paths that must exist) and ``build_parser``, which builds every subcommand's
options and binds each to its implementation in ``safekern.cli.commands``."""
from __future__ import annotations

import argparse
import os

from .commands import _bench, _cache, _demo, _export_vllm, _print_info, _serve, _train

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


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _probability(text: str) -> float:
    value = _number(text)
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


def _schedule_list(text: str):
    names = [s.strip() for s in text.split(",") if s.strip()]
    known = ("each", "periodic(10)", "annealing", "first", "cascade")
    bad = [s for s in names if s not in known]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {', '.join(known)}"
                                         f", got {text!r}")
    return names


def _ess_defaults(x) -> None:
    """The default EssConfig options of an exported checkpoint (export-vllm, serve)."""
    x.add_argument("--schedule", default="first",
                   choices=["first", "each", "periodic", "annealing", "cascade"],
                   help="default re-evaluation schedule of requests (first: the export's default, "
                   "the prompt only; the shipped delta's measured operating point is each with "
                   "--policy high; cascade: needs a delta with a screening probe)")
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


def build_parser() -> argparse.ArgumentParser:
    """The ``safekern`` parser; each subcommand sets ``fn`` (its implementation) and ``parser``
    (its own parser, for usage errors)."""
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
    t.add_argument("--probe-unit", choices=("window", "answer"), default="window",
                   help="real model: what the screening probe's 99%% recall counts: harmful "
                   "validation windows (default) or the harmful answers the each schedule "
                   "catches with its response windows (a replay of the cascade: a higher "
                   "threshold, fewer escalations)")
    t.add_argument("--val-split", choices=("prompt", "pattern"), default="prompt",
                   help="real model, rank > 0: the validation split (the kept epoch, the "
                   "calibrated threshold / tau, the probe's threshold): whole prompts (default) "
                   "or whole benign / borderline patterns, which is what the held-out split "
                   "tests (over-refusal on patterns never trained on)")
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
                   "data order; real model, rank > 0: seed of the adapter's initialisation, "
                   "window sampling and validation split (default: 0)")
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
    return p
