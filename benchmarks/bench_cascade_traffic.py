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
[--threads 2] [--kinds benign,benign_long] [--probe-thresholds 0.75 ...] [--steps] [--out bench_out]``
(``cascade@T``: the cascade with the probe's screening threshold set to ``T`` instead of the
delta's). ~6 min at the defaults on 2 cores.

``--steps``: also time every decode step of the timed rounds and print, per batch and config,
the median step and forward time per step kind: ``token`` (the token rows alone), ``compact n``
(the token rows plus ``n`` [CLS] rows, ``safekern.runtime.forward._compact_step``) and ``full``
(all ``2B`` rows). Where a cascade's time goes: its compact steps, or the token-only steps
around them (BENCHMARKS.md, "What bounds the cascade's cost").
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections import defaultdict

import torch

from safekern import EssConfig
from safekern.evaluation import heldout_cases
from safekern.evaluation.bench import _evals_per_step, build_real
from safekern.ops.timing import environment, format_table, interleaved_medians, write_csv
from safekern.runtime import forward as fw
from safekern.runtime.engine import Engine


class StepClock:
    """Per decode step of ``eng``: its kind and wall time, and its forward's time (``--steps``).

    Wraps the engine's ``_decode_step`` (on the instance) and ``forward.forward`` (the module
    global ``decode_step`` calls) while installed; ``current`` names the config that runs."""

    def __init__(self, eng):
        self.eng, self.current, self._last = eng, None, None
        self.steps = defaultdict(list)          # (config, kind) -> [(step s, forward s)]
        self._orig_forward = fw.forward

    def _forward(self, eng, ids, *args, rows=None, **kw):
        t0 = time.perf_counter()
        x = self._orig_forward(eng, ids, *args, rows=rows, **kw)
        self._last = (ids.shape, rows is not None, time.perf_counter() - t0)
        return x

    def _step(self, *args, **kw):
        self._last = None
        t0 = time.perf_counter()
        out = Engine._decode_step(self.eng, *args, **kw)
        dt = time.perf_counter() - t0
        if self.current is not None and self._last is not None:
            (n, width), compact, ft = self._last         # a decode step runs one forward
            kind = "full" if width == 2 else f"compact {n - self.eng.B}" if compact else "token"
            self.steps[(self.current, kind)].append((dt, ft))
        return out

    def install(self):
        fw.forward = self._forward
        self.eng._decode_step = self._step

    def uninstall(self):
        fw.forward = self._orig_forward
        del self.eng._decode_step

    def rows(self, batch):
        out = []
        for (cfg, kind), v in sorted(self.steps.items()):
            out.append({"batch": batch, "provider": cfg, "step kind": kind, "steps": len(v),
                        "step ms": round(statistics.median(d for d, _ in v) * 1e3, 2),
                        "forward ms": round(statistics.median(f for _, f in v) * 1e3, 2)})
        self.steps.clear()
        return out


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
    ap.add_argument("--steps", action="store_true",
                    help="also print the median time per decode-step kind (token / compact n / "
                         "full) of every config")
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
    N, rows, step_rows = args.new_tokens, [], []
    clock = StepClock(eng) if args.steps else None
    load0 = os.getloadavg()[0]
    for B in args.batch:
        ps = prompts[:B]
        def run(k, c, t):
            def f():
                probe.threshold = t
                if clock is not None:
                    clock.current = k
                return eng.generate(ps, max_new_tokens=N, safety=c)
            return f
        fns = {k: run(k, c, t) for k, (c, t) in runs.items()}
        checks = {k: _evals_per_step(fns[k](), N) for k in fns if k != "off"}   # + warm-up
        fns["off"]()
        if clock is not None:
            clock.install()
        try:
            med = interleaved_medians(fns, reps=args.reps, warmup=0)
        finally:
            if clock is not None:
                clock.uninstall()
                step_rows += clock.rows(B)
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
    if step_rows:
        print("\nper decode step (median over the timed rounds; the step includes the LM head "
              "and sampling, the forward does not):")
        print(format_table(step_rows, list(step_rows[0])))
        print("csv:", write_csv(os.path.join(args.out, "cascade_traffic_steps.csv"), step_rows,
                                env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
