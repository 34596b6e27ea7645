"""The CPU decode linear path (``safekern.ops.cpu.linear``, ``safekern.ops.cpu.decode_linear``).

* the kernel vs ``F.linear`` in float64: odd K / N (tails of the 8-lane and 8-row tiles), M = 1..33,
  biases, several weights in one call, error no worse than 2x ``F.linear``'s own fp32 error;
* a row's result does not depend on the other rows (same bits at M = 1 and M = 2B);
* the packed-panel path (``pack`` + ``packed_linear``) the same way, leading dims, repacking
  after a weight change (``.data`` writes too);
* the engine with the kernel gives the same greedy streams and traces as with ``F.linear``,
  safety off and for every schedule, on Llama / Mistral / Qwen2 (biases) tiny models, and on
  SmolLM2-135M when it is installed;
* a clean fallback with a reason when the kernel cannot run.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import safekern
import safekern.models
from safekern import EssConfig
from safekern.ops.cpu.decode_linear import GROUPS, KernelLinears, ModuleLinears, decode_linears
from safekern.ops.cpu import linear as cpu_linear

needs_kernel = pytest.mark.skipif(cpu_linear.unavailable_reason() is not None,
                                  reason=f"cpu_linear: {cpu_linear.unavailable_reason()}")


ISAS = [i for i in cpu_linear.ISAS
        if cpu_linear.unavailable_reason() is None and i in torch.ops.safekern_cpu.isas()]


@pytest.fixture(params=ISAS or [None])
def isa(request, monkeypatch):
    """Each instruction set this CPU runs (AVX2 always, AVX-512 where present)."""
    if request.param is None:
        pytest.skip(f"cpu_linear: {cpu_linear.unavailable_reason()}")
    monkeypatch.setattr(cpu_linear, "_isa", cpu_linear.ISAS.index(request.param))
    return request.param


@needs_kernel
@pytest.mark.parametrize("K", [8, 64, 97, 576])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 33])
def test_kernel_matches_float64_linear(K, M, isa):
    torch.manual_seed(K * 100 + M)
    x = torch.randn(M, K)
    ws = [torch.randn(n, K) / math.sqrt(K) for n in (1, 13, 40)]
    bs = [torch.randn(1), None, torch.randn(40)]
    outs = cpu_linear.linear(x, ws, bs)
    for y, w, b in zip(outs, ws, bs):
        assert torch.isfinite(y).all()
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        err = (y.double() - ref).abs().max().item()
        base = (F.linear(x, w, b).double() - ref).abs().max().item()
        assert err <= 2 * base + 1e-6, (err, base)


@needs_kernel
@pytest.mark.parametrize("M", [2, 3, 6, 9])
@pytest.mark.parametrize("K", [100, 576])
def test_rows_are_independent_and_strided_input(M, K, isa):
    torch.manual_seed(0)
    w = torch.randn(37, K)                               # 4 full 8-row tiles and a tail
    x = torch.randn(M, 2 * K)[:, :K]                     # row stride 2K, unit stride in K
    full, = cpu_linear.linear(x, [w])
    for m in range(M):
        one, = cpu_linear.linear(x[m:m + 1], [w])
        assert torch.equal(one[0], full[m])


@needs_kernel
@pytest.mark.parametrize("K", [8, 97, 576])
@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 17, 33])
def test_packed_matches_float64_linear_and_rows_are_independent(K, M, isa):
    torch.manual_seed(K * 10 + M)
    x = torch.randn(M, 2 * K)[:, :K]                     # strided rows, unit stride in K
    ws = [torch.randn(n, K) / math.sqrt(K) for n in (1, 13, 32, 71)]   # panel tails, exact
    bs = [torch.randn(1), None, torch.randn(32), torch.randn(71)]
    packs = [cpu_linear.pack(w) for w in ws]
    P = cpu_linear.panel_width()
    assert [tuple(p.shape) for p in packs] == [(-(-w.shape[0] // P), K, P) for w in ws]
    outs = cpu_linear.packed_linear(x, packs, [w.shape[0] for w in ws], bs)
    for y, w, b in zip(outs, ws, bs):
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        # One FMA chain over k per output: a sequential sum's error, ~sqrt(K) u sum|x w|
        # (MKL sums in blocks and does better); a wrong element would be off by O(|x w|).
        scale = x.double().abs() @ w.double().abs().T
        assert ((y.double() - ref).abs() <= 4 * math.sqrt(K) * 2 ** -24 * scale + 1e-7).all()
    for m in range(M):                                  # same bits for a row alone
        one = cpu_linear.packed_linear(x[m:m + 1], packs, [w.shape[0] for w in ws], bs)
        assert all(torch.equal(a[0], full[m]) for a, full in zip(one, outs))
    x3 = x.reshape(1, M, K)                             # leading dims kept
    y3, = cpu_linear.packed_linear(x3, packs[3:], [71], bs[3:])
    assert y3.shape == (1, M, 71) and torch.equal(y3[0], outs[3])


@needs_kernel
def test_pack_rejects_bad_input_and_repacks_in_place():
    w = torch.randn(40, 24)
    wp = cpu_linear.pack(w)
    with pytest.raises(ValueError, match="w must be"):
        cpu_linear.pack(w.double())
    with pytest.raises(ValueError, match="out must be"):
        cpu_linear.pack(torch.randn(80, 24), out=wp)
    with pytest.raises(RuntimeError, match="packed weight 0"):
        cpu_linear.packed_linear(torch.randn(2, 24), [wp], [65])
    with pytest.raises(RuntimeError, match="float32"):
        cpu_linear.packed_linear(torch.randn(2, 24, dtype=torch.float64), [wp], [40])
    w2 = torch.randn(40, 24)
    assert cpu_linear.pack(w2, out=wp) is wp
    assert torch.equal(wp, cpu_linear.pack(w2))


@needs_kernel
def test_packed_copies_follow_weight_changes():
    """The packed path reads copies of the weights: every generate repacks them, so a weight
    changed in between (even through ``.data``, which bumps no version) is never read stale."""
    model, tok = _tiny("llama")
    layers = model.model.layers
    lin = KernelLinears(layers)
    assert lin.packed is not None
    x = torch.randn(1, 8, layers[0].self_attn.q_proj.weight.shape[1])
    before = lin._run_path("packed", "qkv", 0, x)[0]
    layers[0].self_attn.q_proj.weight.data[3] += 1.0
    assert torch.equal(lin._run_path("packed", "qkv", 0, x)[0], before)   # stale copy
    lin.refresh()
    after = lin._run_path("packed", "qkv", 0, x)[0]
    ref = F.linear(x, layers[0].self_attn.q_proj.weight)
    assert not torch.equal(after, before) and torch.allclose(after, ref, atol=1e-5)
    from safekern.runtime.engine import Engine

    eng = Engine(model, tok, ignore_eos=True)
    eng._decode_linears.plan = {M: dict.fromkeys(GROUPS, "packed") for M in range(1, 9)}
    ref_eng = Engine(model, tok, ignore_eos=True, cpu_linear=False)
    for _ in range(2):
        a = eng.generate(PROMPTS[:2], max_new_tokens=6, safety=EssConfig(schedule="each"))
        b = ref_eng.generate(PROMPTS[:2], max_new_tokens=6, safety=EssConfig(schedule="each"))
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        with torch.no_grad():
            layers[1].mlp.down_proj.weight.data.mul_(-1.0)            # no version bump


@needs_kernel
def test_isa_choice_and_bad_isa(monkeypatch):
    assert cpu_linear.isa() in torch.ops.safekern_cpu.isas().split(",")
    with pytest.raises(RuntimeError, match="isa must be"):
        torch.ops.safekern_cpu.linear(torch.randn(1, 8), [torch.randn(3, 8)], [None], 7)
    monkeypatch.setattr(cpu_linear, "_reason", None)
    monkeypatch.setattr(cpu_linear, "_loaded", False)
    monkeypatch.setattr(cpu_linear, "_isa", cpu_linear._isa)
    monkeypatch.setenv("SAFEKERN_CPU_LINEAR_ISA", "sse9")
    assert "SAFEKERN_CPU_LINEAR_ISA must be one of" in cpu_linear.unavailable_reason()
    monkeypatch.setattr(cpu_linear, "_reason", None)
    monkeypatch.setenv("SAFEKERN_CPU_LINEAR_ISA", "avx2")
    assert cpu_linear.unavailable_reason() is None and cpu_linear.isa() == "avx2"


@needs_kernel
def test_kernel_rejects_bad_input():
    with pytest.raises(RuntimeError, match="float32"):
        cpu_linear.linear(torch.randn(2, 8, dtype=torch.float64), [torch.randn(3, 8)])
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_linear.linear(torch.randn(2, 8), [torch.randn(8, 3).t()])


def test_linear_modes_are_validated():
    layers = _tiny("llama")[0].model.layers
    with pytest.raises(ValueError, match="mode must be one of"):
        decode_linears(layers, torch.device("cpu"), torch.float32, mode="fast")
    with pytest.raises(ValueError, match="mode must be one of"):
        KernelLinears(layers, mode="fast")
    model, tok = _tiny("llama")
    from safekern.runtime.engine import Engine

    with pytest.raises(ValueError, match="cpu_linear must be"):
        Engine(model, tok, cpu_linear="mkl")


def test_fallback_reasons(monkeypatch):
    layers = _tiny("llama")[0].model.layers
    lin, why = decode_linears(layers, torch.device("cpu"), torch.float32, enabled=False)
    assert isinstance(lin, ModuleLinears) and why == "disabled by the caller"
    lin, why = decode_linears(layers, torch.device("cpu"), torch.float64)
    assert isinstance(lin, ModuleLinears) and "float32 on CPU" in why
    monkeypatch.setattr(cpu_linear, "_reason", None)
    monkeypatch.setattr(cpu_linear, "_loaded", False)
    monkeypatch.setenv("SAFEKERN_CPU_LINEAR", "0")
    assert cpu_linear.unavailable_reason() == "disabled by SAFEKERN_CPU_LINEAR=0"
    lin, why = decode_linears(layers, torch.device("cpu"), torch.float32)
    assert isinstance(lin, ModuleLinears) and "SAFEKERN_CPU_LINEAR" in why


def test_stale_build_lock_is_removed_not_waited_on():
    """A build killed mid-way leaves torch's bare ``lock`` file in the build directory; the next
    process must remove it (with a warning) instead of waiting on it forever."""
    import os
    import subprocess
    import sys

    if cpu_linear.unavailable_reason() is not None:
        pytest.skip(cpu_linear.unavailable_reason())
    from torch.utils.cpp_extension import _get_build_directory
    lock = os.path.join(_get_build_directory(cpu_linear._build_name(), verbose=False), "lock")
    open(lock, "w").close()
    try:
        run = subprocess.run(
            [sys.executable, "-c", "from safekern.ops.cpu import linear; "
             "print(linear.unavailable_reason())"],
            capture_output=True, text=True, timeout=300)
    finally:
        stale = os.path.exists(lock)
        if stale:
            os.remove(lock)
    assert not stale, "the stale lock is still there"
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "None", run.stdout + run.stderr
    assert "stale build lock" in run.stderr


# ---------------------------------------------------------------- engine streams
transformers = pytest.importorskip("transformers")
from safekern.models.tiny import build_tokenizer, tiny_llama_config  # noqa: E402

PROMPTS = ["How do I bake bread at home?", "hi", "Write a long story about a cat, a dog and a fox."]


def _tiny(arch, **over):
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_llama_config(len(tok), arch, **over)).eval()
    safekern.attach(model, tok)
    with torch.no_grad():
        model.safety_head.bias.fill_(-8.0)               # benign: every schedule keeps evaluating
    return model, tok


def _same_generation(model, tok, prompts, n, schedules):
    from safekern.runtime.engine import Engine

    ref = Engine(model, tok, ignore_eos=True, cpu_linear=False)
    engines = [Engine(model, tok, ignore_eos=True, cpu_linear="kernel"),
               Engine(model, tok, ignore_eos=True)]                      # measured per M
    for e in engines:
        assert e.cpu_linear_reason is None and isinstance(e._decode_linears, KernelLinears)
    assert [e._decode_linears.mode for e in engines] == ["kernel", "auto"]
    for sched in schedules:
        ess = None if sched is None else EssConfig(schedule=sched)
        b = ref.generate(prompts, max_new_tokens=n, safety=ess)
        for e in engines:
            a = e.generate(prompts, max_new_tokens=n, safety=ess)
            for x, y in zip(a, b):
                assert x.token_ids == y.token_ids, (sched, e._decode_linears.mode)
                if ess is not None:
                    assert x.trace.eval_steps == y.trace.eval_steps
                    assert x.trace.p_unsafe == pytest.approx(y.trace.p_unsafe, abs=1e-5)
    auto = engines[1]._decode_linears
    B = len(prompts)
    assert {B, 2 * B} <= set(auto.plan)                # token-only and [CLS] steps measured
    for M, plan in auto.plan.items():
        assert set(plan) == set(GROUPS) and set(plan.values()) <= {"kernel", "mkl", "packed"}
        assert f"M={M}:" in auto.describe()


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_engine_streams_equal_with_and_without_kernel(arch):
    model, tok = _tiny(arch)
    _same_generation(model, tok, PROMPTS, 12, [None, "each", "periodic", "annealing", "first"])


@needs_kernel
@pytest.mark.slow
@pytest.mark.skipif(safekern.models.is_available("smollm2") is not None,
                    reason=f"smollm2: {safekern.models.is_available('smollm2')}")
def test_smollm2_streams_equal_with_and_without_kernel():
    model, tok = safekern.models.load("smollm2")
    safekern.attach(model, tok)
    with torch.no_grad():
        model.safety_head.bias.fill_(-8.0)
    _same_generation(model, tok, ["How do I bake bread at home?", "What is 2 + 3?"], 8,
                     [None, "each"])
