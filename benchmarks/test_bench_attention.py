"""pytest-benchmark entry for ess_attention (``pytest benchmarks --benchmark-only``).

Small shapes so it also runs on CPU (Triton in the interpreter there: the JSON then records the
interpreter, not kernel speed). ``bench_attention.py`` is the full GPU benchmark with plots.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before safekern defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from safekern import ess_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPE = (2, 4096, 32, 8, 128) if DEVICE == "cuda" else (1, 128, 2, 1, 64)  # B, L, Hq, Hkv, D


def _inputs(Lq):
    B, L, Hq, Hkv, D = SHAPE
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, Lq, Hq, D, device=DEVICE, dtype=DTYPE, generator=g)
    k = torch.randn(B, L, Hkv, D, device=DEVICE, dtype=DTYPE, generator=g)
    v = torch.randn(B, L, Hkv, D, device=DEVICE, dtype=DTYPE, generator=g)
    ess = dict(response_start=torch.full((B,), L // 4, dtype=torch.int32, device=DEVICE),
               cls_windows=torch.tensor([[[1, L // 4], [L - 10, L]]] * B, dtype=torch.int32,
                                        device=DEVICE))
    return q, k, v, ess


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["ess_off", "ess"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_ess_attention(benchmark, backend, mode, phase):
    L = SHAPE[1]
    q, k, v, ess = _inputs(L if phase == "prefill" else 2)
    kw = ess if mode == "ess" else {}
    if phase == "decode":
        kw["q_pos"] = torch.tensor([[L - 1, 0 if mode == "ess" else -1]] * q.shape[0],
                                   dtype=torch.int32, device=DEVICE)
    benchmark.group = f"ess_attention-{phase}"

    def run():
        ess_attention(q, k, v, backend=backend, **kw)
        _sync()

    benchmark.pedantic(run, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1)
