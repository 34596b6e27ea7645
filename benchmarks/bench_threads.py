"""Question: how many torch threads should decoding use on a small CPU box (issue 25, item 4)?

Per batch size (1, 4, 16) the engine decodes ``--new-tokens`` tokens with ESS on (schedule
``each``, the costliest) at 1 thread and at every core, A/B interleaved in one process (the two
thread counts alternate rep by rep, so a change of load hits both). With ``--load`` a second
process spins on one core (``python -c "while 1: pass"``) for the whole run: the "shared box"
case. Prints the median wall seconds per ``generate`` call, the spread (max - min over reps, as
a fraction of the median), ms per token and 1-thread time / all-cores time, with the 1-minute
load average before and after; writes ``bench_out/threads_<model>_<idle|load>.csv``.

    python benchmarks/bench_threads.py [--model tiny|smollm2] [--load] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from safekern.evaluation.bench import build, build_real, make_prompts
from safekern.ops.timing import environment, format_table, write_csv
from safekern.runtime.engine import Engine
from safekern.spec import EssConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--load", action="store_true", help="a busy process on one core meanwhile")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    cores = os.cpu_count()
    device = torch.device("cpu")
    model, tok = build("tiny", device, torch.float32) if args.model == "tiny" else \
        build_real(args.model, device, torch.float32)
    engine = Engine(model, tok, ignore_eos=True)
    ess = EssConfig(schedule="each")
    spinner = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if args.load else None
    try:
        time.sleep(2 if args.load else 0)           # let the load average see the spinner
        rows = []
        for B in args.batch:
            prompts = make_prompts(tok, B, 64)
            load0 = os.getloadavg()[0]
            times = {1: [], cores: []}
            for n in times:                                              # warm-up
                torch.set_num_threads(n)
                engine.generate(prompts, max_new_tokens=args.new_tokens, safety=ess)
            for _ in range(args.reps):
                for n in times:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    engine.generate(prompts, max_new_tokens=args.new_tokens, safety=ess)
                    times[n].append(time.perf_counter() - t0)
            med = {n: statistics.median(v) for n, v in times.items()}
            for n, v in times.items():
                rows.append({"model": args.model, "batch": B, "threads": n,
                             "load": "spinner" if args.load else "idle",
                             "s_per_call": med[n], "spread": (max(v) - min(v)) / med[n],
                             "ms_per_token": med[n] / args.new_tokens * 1e3,
                             "one_thread_vs_this": med[1] / med[n],
                             "loadavg_before": round(load0, 2),
                             "loadavg_after": round(os.getloadavg()[0], 2)})
    finally:
        if spinner is not None:
            spinner.kill()
    print(f"{args.model}, ESS each, prompt ~64 tokens, {args.new_tokens} new tokens, median of "
          f"{args.reps}, {cores} cores, {'one busy process' if args.load else 'no extra load'}")
    print(format_table(rows, list(rows[0])))
    stem = os.path.join(args.out, f"threads_{args.model}_{'load' if args.load else 'idle'}")
    print("csv:", write_csv(stem + ".csv", rows, environment(device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
