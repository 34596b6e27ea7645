"""vLLM + safekern plugin: safety off vs ESS ``each`` / ``annealing`` per decode step (SmolLM2).

Thin wrapper: the benchmark lives in ``safekern.evaluation.bench_vllm`` so ``safekern bench``
reports it too when vLLM is installed. ``python benchmarks/bench_vllm.py --help``.
"""
import sys

from safekern.evaluation.bench_vllm import main

if __name__ == "__main__":
    sys.exit(main())
