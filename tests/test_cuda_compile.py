"""CI checks of the CUDA backend (csrc/) that need nvcc and g++ but no GPU.

* Every csrc/*.cu is compiled to an object for sm_80 and sm_90a with the flags setup.py uses,
  so a syntax, type, template or ptxas error (e.g. too much static shared memory) fails CI.
* bindings.cpp is syntax-checked with g++ against the installed torch headers.
* The kernels' ESS logic (csrc/ess_logic.cuh: key visibility, controller update, refusal
  forcing, sampling noise) is compiled for the host and run against safekern.reference.
Skipped when nvcc is absent, unless SAFEKERN_REQUIRE_NVCC=1 (then missing nvcc fails).
About 80 s on 2 cores.
"""
import glob
import os
import re
import subprocess
import sysconfig

import pytest
import torch

from cuda_tools import (CSRC, NVCC, ROOT, assert_state_equal, build, cuda_include,
                        require_gxx, require_nvcc)

CU_SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
ARCHS = ("80", "90a")
# The nvcc flags of setup.py (which lets torch add -std; C++17 is the oldest torch uses).
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]


def test_csrc_present_and_framework_free():
    assert CU_SOURCES, "csrc/ holds no .cu sources"
    for path in CU_SOURCES + glob.glob(os.path.join(CSRC, "*.h")) + \
            glob.glob(os.path.join(CSRC, "*.cuh")):
        text = open(path).read()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10|pybind11)/", text), \
            f"{os.path.basename(path)} includes framework headers; only bindings.cpp may"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [os.path.basename(s) for s in CU_SOURCES])
def test_cu_compiles(source, arch, tmp_path):
    require_nvcc()
    out = tmp_path / (source + f".sm{arch}.o")
    cmd = [NVCC, "-c", *NVCC_FLAGS, "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-I", CSRC, os.path.join(CSRC, source), "-o", str(out)]
    build(cmd, f"nvcc {source} for sm_{arch}")
    assert out.stat().st_size > 0


def test_bindings_syntax():
    require_nvcc()  # needs the CUDA runtime headers that c10/cuda includes
    gxx = require_gxx()
    from torch.utils.cpp_extension import include_paths

    torch_inc = include_paths()
    cmd = [gxx, "-fsyntax-only", "-Wall",
           "-std=c++20" if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 10)
           else "-std=c++17",
           *[f"-I{p}" for p in torch_inc], f"-I{cuda_include()}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    # CPU torch wheels ship c10/cuda headers but not their generated cuda_cmake_macros.h;
    # it only defines export macros, which a syntax check does not need.
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
               for p in torch_inc):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    cmd.append(os.path.join(CSRC, "bindings.cpp"))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-6000:]}"
    errors = [ln for ln in res.stderr.splitlines() if "bindings.cpp" in ln and "warning" in ln]
    assert not errors, "\n".join(errors)


# ----------------------------------------------------------------------------------------------
# The kernels' ESS logic (csrc/ess_logic.cuh, __host__ __device__) run on the CPU through
# tests/cuda_host_check.cu, against safekern.reference: visibility, controller, sampling noise.

@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    require_nvcc()
    import ctypes

    so = tmp_path_factory.mktemp("host_check") / "host_check.so"
    cmd = [NVCC, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "-I", CSRC,
           os.path.join(ROOT, "tests", "cuda_host_check.cu"), "-o", str(so)]
    build(cmd, "nvcc tests/cuda_host_check.cu")
    lib = ctypes.CDLL(str(so))
    lib.host_ess_step.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 12 + [
        ctypes.c_int, ctypes.c_int, ctypes.c_float] + [ctypes.c_int] * 5 + [ctypes.c_double] + \
        [ctypes.c_void_p] * 2
    lib.host_gumbel_argmax.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_float, ctypes.c_uint64, ctypes.c_void_p]
    return lib


def _ptr(t):
    return None if t is None else t.data_ptr()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", ["plain", "ess", "ess_windows"])
def test_host_visibility_matches_reference(host_lib, causal, mode):
    from safekern.reference import ess_visibility

    g = torch.Generator().manual_seed(7 + causal)
    B, Lq, Lk, W = 16, 4, 37, 2
    q_pos = torch.randint(-1, Lk + 4, (B, Lq), generator=g, dtype=torch.int32)
    q_pos[:, 0] = 0  # a [CLS] row (ESS) / a row at position 0 (plain) in every sequence
    seqlens = torch.randint(0, Lk + 1, (B,), generator=g, dtype=torch.int32)
    resp = torch.randint(0, Lk + 4, (B,), generator=g, dtype=torch.int32) if mode != "plain" \
        else None
    win = torch.randint(0, Lk + 1, (B, W, 2), generator=g, dtype=torch.int32) \
        if mode == "ess_windows" else None
    out = torch.empty(B, Lq, Lk, dtype=torch.uint8)
    end = torch.empty(B, Lq, dtype=torch.int32)
    import ctypes
    host_lib.host_visibility(B, Lq, Lk, ctypes.c_void_p(q_pos.data_ptr()),
                             ctypes.c_void_p(seqlens.data_ptr()), ctypes.c_void_p(_ptr(resp)),
                             ctypes.c_void_p(_ptr(win)), W, int(causal),
                             ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(end.data_ptr()))
    want = ess_visibility(q_pos, seqlens, Lk, causal=causal, response_start=resp,
                          cls_windows=win)
    assert torch.equal(out.bool(), want)
    j = torch.arange(Lk)
    assert not (want & (j >= end[..., None])).any(), "row_key_end cut off a visible key"


@pytest.mark.parametrize("policy", ["low", "medium", "high"])
@pytest.mark.parametrize("schedule", ["first", "each", "periodic", "annealing"])
def test_host_controller_matches_reference_over_random_traces(host_lib, policy, schedule):
    from safekern.reference import forced_tokens, plan_step, update_state
    from safekern.spec import POLICIES, SCHEDULES, EssConfig, EssState

    ess = EssConfig(policy=policy, schedule=schedule, tau=2, period=3, anneal_growth=1.5,
                    anneal_stop=40, first_at=1, threshold=0.5)
    g = torch.Generator().manual_seed(sum(map(ord, policy + schedule)))
    B = 64
    P = torch.randint(3, 12, (B,), generator=g)
    ref = EssState.create(P.tolist(), [1] * B, (P - 1).tolist(), [11, 12, 13, 14], ess,
                          refusal_skip=1)
    ours = ref.clone()
    rate = torch.rand(B, generator=g)
    for step in range(120):
        t = (P + step + (torch.rand(B, generator=g) < 0.1).int() * 5).int()  # some jump ahead
        for s in (ref, ours):
            s.seq_len.copy_(torch.maximum(s.seq_len, t))
        plan_step(ref, ess)
        plan_step(ours, ess)
        p = torch.where(torch.rand(B, generator=g) < rate, torch.rand(B, generator=g) * 0.5 + 0.5,
                        torch.rand(B, generator=g) * 0.5)
        p[torch.rand(B, generator=g) < 0.05] = 0.5  # the threshold itself flags
        p = torch.where(ref.evaluating, p, torch.full_like(p, float("nan")))
        update_state(ref, ess, p)
        forced_ref, tok_ref = forced_tokens(ref, ess)
        forced = torch.empty(B, dtype=torch.int64)
        fields = [ours.prompt_len, ours.seq_len, ours.mode, ours.flags, ours.switch_step,
                  ours.next_eval, ours.interval, ours.forced_idx, ours.trigger_step,
                  ours.evaluating, ours.finished, ours.refusal_ids]
        host_lib.host_ess_step(B, *[f.data_ptr() for f in fields], ours.refusal_ids.numel(),
                               ours.refusal_skip,
                               ess.threshold, ess.tau, POLICIES.index(policy),
                               SCHEDULES.index(schedule), ess.period, ess.anneal_stop,
                               ess.anneal_growth, p.data_ptr(), forced.data_ptr())
        assert_state_equal(ours, ref, step)
        assert torch.equal(forced >= 0, forced_ref)
        assert torch.equal(forced[forced_ref], tok_ref[forced_ref])


def test_host_gumbel_max_samples_softmax(host_lib):
    import ctypes

    V, n, temp = 23, 40000, 0.7
    logits = torch.linspace(-2, 2, V, dtype=torch.float32) ** 3
    draws = torch.empty(n, dtype=torch.int32)
    host_lib.host_gumbel_argmax(n, 3, V, ctypes.c_void_p(logits.data_ptr()), temp, 12345,
                                ctypes.c_void_p(draws.data_ptr()))
    freq = torch.bincount(draws.long(), minlength=V).double() / n
    probs = torch.softmax(logits.double() / temp, 0)
    bound = 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-4
    assert ((freq - probs).abs() <= bound).all(), (freq - probs).abs().max()
    other_row = torch.empty(n, dtype=torch.int32)
    host_lib.host_gumbel_argmax(n, 4, V, ctypes.c_void_p(logits.data_ptr()), temp, 12345,
                                ctypes.c_void_p(other_row.data_ptr()))
    agree = (draws == other_row).double().mean().item()
    assert abs(agree - (probs ** 2).sum().item()) < 0.02, "rows' noise streams are correlated"
