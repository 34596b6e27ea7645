"""Host cost per decode step of the vLLM plugin's controller glue (no vLLM needed).

``safekern.integrations.vllm._controller``: ``plan`` + ``commit`` + ``escalate`` over a batch of
ESS requests, 64 steps, threshold 1.0 (nothing is refused: every request is evaluated whenever
its schedule says), no [CLS] forward — the Python / small-tensor work vLLM's step pays on top of
the model. Median over steps, 1 torch thread.

    python benchmarks/bench_vllm_controller.py [--batch 8 32] [--steps 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from safekern.integrations.vllm import _batch, _controller
from safekern.spec import EssConfig


def step_ms(schedule: str, batch: int, steps: int) -> float:
    ess = EssConfig(schedule=schedule, threshold=1.0)
    reqs = {r: _batch.Request(ess=ess, layout=_batch.Layout(30, 5, 25), n_prompt=29, output=[],
                              refusal_ids=[1, 2, 3], refusal_skip=1, eos_id=2)
            for r in range(batch)}
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, 576, generator=g)
    w, b = torch.randn(576, generator=g) * 0.05, torch.zeros(1)   # the probe flags some rows
    times = []
    for _ in range(steps):
        seq = [q.n_prompt + len(q.output) for q in reqs.values()]
        t0 = time.perf_counter()
        pl = _controller.plan(reqs, seq)
        _controller.commit(pl, torch.zeros(len(pl.rows)) if pl.rows else None)
        _controller.escalate(pl, h, w, b[0], 0.9)
        times.append(time.perf_counter() - t0)
        for q in reqs.values():
            q.output.append(5)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("schedule   batch  ms/step (host: plan + commit + escalate)")
    for schedule in ("each", "annealing", "cascade"):
        for batch in args.batch:
            print(f"{schedule:10s} {batch:5d}  {step_ms(schedule, batch, args.steps):.3f}")


if __name__ == "__main__":
    main()
