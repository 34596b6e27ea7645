"""pytest-benchmark suite behind ``safekern bench``: one decode run per provider (P1, P2).

    pytest benchmarks/test_bench_engine.py --benchmark-only --benchmark-group-by=param:batch

Same model, prompts and providers as ``safekern bench`` (``safekern/evaluation/bench.py``); compare the
saved JSON between runs with ``pytest-benchmark compare``.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytest.importorskip("transformers")

from safekern.evaluation.bench import _hf_generate, build, make_prompts, schedules  # noqa: E402
from safekern.runtime.engine import Engine  # noqa: E402

NEW_TOKENS = 32
PROVIDERS = ["off", *schedules(), "transformers"]


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model, tok = build("tiny", torch.device("cpu"), torch.float32)
    return model, tok, Engine(model, tok, ignore_eos=True, max_cache_len=256)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_decode(benchmark, setup, provider, batch):
    model, tok, engine = setup
    prompts = make_prompts(tok, batch, 64)
    if provider == "transformers":
        fn = _hf_generate(model, tok, prompts, NEW_TOKENS, None)
    else:
        ess = None if provider == "off" else schedules()[provider]
        fn = lambda: engine.generate(prompts, max_new_tokens=NEW_TOKENS, safety=ess)  # noqa: E731
    benchmark.extra_info.update(provider=provider, batch=batch, new_tokens=NEW_TOKENS)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
