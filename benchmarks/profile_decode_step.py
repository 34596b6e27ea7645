"""Question: where does a decode step's time go, safety off vs schedule ``each``?

cProfile over ``--runs`` generate calls per provider (same engine, prompts and benign-leaning
head as ``safekern bench``); per component the cumulative ms per decode step, off and each,
and the difference. Components are the engine's and ops' own functions, so the table reads as
"the [CLS] row's GEMMs", "attention masks", "controller", "bookkeeping".

    python benchmarks/profile_decode_step.py [--model tiny|smollm2] [--batch 1] [--threads 1]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch

from safekern.evaluation.bench import build, build_real, make_prompts, schedules
from safekern.ops.timing import format_table
from safekern.runtime.engine import Engine

# component -> (module path suffix, "/"-separated, function name); cumulative time of that
# function.
COMPONENTS = {
    "decode step (all)": ("safekern/runtime/forward.py", "decode_step"),
    "forward: layers (all)": ("safekern/runtime/forward.py", "forward"),
    "linear: cpu_linear kernel": ("safekern/ops/cpu/linear.py", "linear"),
    "linear: nn.Linear (modules)": ("torch/nn/modules/linear.py", "forward"),
    "attention (torch backend)": ("safekern/ops/attention.py", "_sdpa_masked"),
    "attention: mask build": ("safekern/ops/attention.py", "_sdpa_mask"),
    "head_sample (LM head + controller)": ("safekern/ops/head_sample.py", "_torch_backend"),
    "controller: plan_step": ("safekern/reference/controller.py", "plan_step"),
    "controller: update_state": ("safekern/reference/controller.py", "update_state"),
    "controller: forced_tokens": ("safekern/reference/controller.py", "forced_tokens"),
    "fused controller: plan_step": ("safekern/ops/cpu/controller.py", "plan_step"),
    "fused controller: update": ("safekern/ops/cpu/controller.py", "update"),
    "_sample_fused (score + LM head + fused update)": ("safekern/runtime/controller.py",
                                                       "sample_fused"),
    "safety score": ("safekern/reference/sampling.py", "safety_score_ref"),
    "bookkeeping (_sample)": ("safekern/runtime/controller.py", "sample"),
}


def profile(fn, runs):
    prof = cProfile.Profile(time.process_time)  # CPU time: other jobs do not count
    prof.enable()
    for _ in range(runs):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats
    out = {}
    for name, (suffix, func) in COMPONENTS.items():
        out[name] = sum(v[3] for (f, _, fn_name), v in stats.items()
                        if f.replace(os.sep, "/").endswith(suffix) and fn_name == func)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or (1 if args.model == "tiny" else 2))
    cpu = torch.device("cpu")
    model, tok = build("tiny", cpu, torch.float32) if args.model == "tiny" else \
        build_real(args.model, cpu, torch.float32)
    engine = Engine(model, tok, ignore_eos=True, max_cache_len=256)
    prompts = make_prompts(tok, args.batch, 64)
    n = args.new_tokens
    fns = {"off": lambda: engine.generate(prompts, max_new_tokens=n, safety=None),
           "each": lambda: engine.generate(prompts, max_new_tokens=n,
                                           safety=schedules()["each"])}
    for f in fns.values():
        f()
    res = {k: profile(f, args.runs) for k, f in fns.items()}
    steps = args.runs * (n - 1)
    rows = [{"component": c, "off_ms_per_step": res["off"][c] / steps * 1e3,
             "each_ms_per_step": res["each"][c] / steps * 1e3,
             "delta_ms": (res["each"][c] - res["off"][c]) / steps * 1e3} for c in COMPONENTS]
    print(f"model {args.model} | batch {args.batch} | {torch.get_num_threads()} torch thread(s) | "
          f"{n} new tokens x {args.runs} runs | linear path "
          f"{engine.cpu_linear_reason or 'cpu_linear'} | load average {os.getloadavg()[0]:.1f} "
          f"| cProfile, process CPU time (it inflates small-op costs: read the deltas)")
    print(format_table(rows, ["component", "off_ms_per_step", "each_ms_per_step", "delta_ms"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
