"""What does the cascade cost on requests like production traffic? (issue 27)

``safekern bench`` times every schedule on one synthetic prompt (a pangram, rotated). For
``each`` or ``annealing`` the text does not matter: they evaluate on fixed steps. The cascade
evaluates where its probe flags, so its cost depends on the text: on the pangram the shipped
probe flags about a quarter of the row-tokens. This script times safety off, ``each`` and
``cascade`` on held-out benign requests (``safekern.evaluation.heldout_cases``: ``benign`` and
``benign_long`` by default, the same prompts as the safety table; ``--kinds`` adds e.g.
``borderline``), A/B interleaved in one process, with the same model set-up as ``safekern bench``
(the shipped delta, a benign-leaning head so that no row stops evaluating).

Usage: ``python benchmarks/bench_cascade_traffic.py [--batch 1 4 16] [--new-tokens 64] [--reps 3]
[--threads 2] [--kinds benign,benign_long] [--probe-thresholds 0.75 ...] [--out bench_out]``
(``cascade@T``: the cascade with the probe's screening threshold set to ``T`` instead of the
delta's). ~6 min at the defaults on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import random

import torch

from safekern import EssConfig
from safekern.evaluation import heldout_cases
from safekern.evaluation.bench import _evals_per_step, build_real
from safekern.ops.timing import environment, format_table, interleaved_medians, write_csv
from safekern.runtime.engine import Engine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", default="benign,benign_long")
    ap.add_argument("--probe-thresholds", type=float, nargs="*", default=[],
                    help="also time the cascade with the probe's threshold set to each of these")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or args.reps < 1 or min(args.batch) < 1 or args.threads < 1:
        ap.error("--new-tokens must be >= 2, --reps, --batch and --threads >= 1")
    if any(not 0 <= t <= 1 for t in args.probe_thresholds):
        ap.error("--probe-thresholds must be values in [0, 1]")
    kinds = args.kinds.split(",")
    torch.set_num_threads(args.threads)
    model, tok = build_real(args.model, torch.device("cpu"), torch.float32)
    prompts = [c.prompt for c in heldout_cases() if c.kind in kinds]
    if len(prompts) < max(args.batch):
        ap.error(f"--kinds {args.kinds} has {len(prompts)} prompts, fewer than the batch")
    random.Random(0).shuffle(prompts)
    eng = Engine(model, tok, ignore_eos=True)
    from safekern.safety.probe import probe_of

    probe = probe_of(model)
    if probe is None:
        ap.error(f"--model {args.model}: its delta has no screening probe, so no cascade to time "
                 "(safekern train --model NAME --probe-only adds one)")
    shipped = probe.threshold
    cascade = EssConfig(schedule="cascade")
    configs = {"off": None, "each": EssConfig(schedule="each"), "cascade": cascade}
    # (config, probe threshold): the engine reads the probe's threshold at every generate
    runs = {k: (c, shipped) for k, c in configs.items()}
    runs.update({f"cascade@{t:g}": (cascade, t) for t in args.probe_thresholds})
    N, rows = args.new_tokens, []
    load0 = os.getloadavg()[0]
    for B in args.batch:
        ps = prompts[:B]
        def run(c, t):
            def f():
                probe.threshold = t
                return eng.generate(ps, max_new_tokens=N, safety=c)
            return f
        fns = {k: run(c, t) for k, (c, t) in runs.items()}
        checks = {k: _evals_per_step(fns[k](), N) for k in fns if k != "off"}   # + warm-up
        fns["off"]()
        med = interleaved_medians(fns, reps=args.reps, warmup=0)
        off = med["off"]
        for k in fns:
            rows.append({"batch": B, "provider": k, "ms/token": round(med[k] / N * 1e3, 1),
                         "time vs safety off": round(med[k] / off, 3),
                         "[CLS] checks per row-token": "" if k == "off" else
                         round(checks[k], 3)})
    env = environment(torch.device("cpu"))
    probe.threshold = shipped
    print(f"model {args.model} | held-out {args.kinds} requests | {args.threads} thread(s) | "
          f"{N} new tokens | median of {args.reps} | load average {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(format_table(rows, list(rows[0])))
    print("csv:", write_csv(os.path.join(args.out, "cascade_traffic.csv"), rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
