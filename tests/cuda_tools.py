"""Shared by the CUDA tests: finding nvcc, the CUDA headers and g++ (CPU-side checks, no GPU),
building the g++ emulation of the csrc/ kernels (tests/cuda_emulator.cpp) and routing
``backend="cuda"`` of head_sample to it, and comparing a kernel's ESS step with the reference
controller."""
import ctypes
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def find_nvcc():
    cands = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "nvcc"))
    cands += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


NVCC = find_nvcc()


def require_nvcc():
    """Skip without nvcc, unless SAFEKERN_REQUIRE_NVCC=1 (then fail)."""
    if NVCC is not None:
        return
    if os.environ.get("SAFEKERN_REQUIRE_NVCC", "0") == "1":
        pytest.fail("SAFEKERN_REQUIRE_NVCC=1 but nvcc was not found on PATH, CUDA_HOME or "
                    "/usr/local/cuda*/bin")
    pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda*): CUDA sources not compiled")


def require_gxx():
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    return gxx


def cuda_include():
    """The CUDA headers of NVCC (which may be a wrapper script, so ask it for its -I path)."""
    res = subprocess.run([NVCC, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                         text=True, timeout=60)
    cands = re.findall(r'INCLUDES="?\s*-I"?([^"\s]+)', res.stdout + res.stderr)
    cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include"))
    found = next((c for c in cands if os.path.exists(os.path.join(c, "cuda_runtime.h"))), None)
    if found is None:
        pytest.fail(f"cuda_runtime.h not found next to {NVCC} (looked in {cands})")
    return found


def build(cmd, what):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, f"{what} failed:\n{' '.join(cmd)}\n{res.stdout}\n{res.stderr[-6000:]}"


def assert_state_equal(ours, ref, step):
    """Every field of an EssState equals the reference controller's after ``step``."""
    for name, a in ours.__dict__.items():
        b = getattr(ref, name)
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert same, f"step {step}: state.{name} differs"


def assert_step_matches(ours, ref, tokens, ref_tokens, p, ref_p, step, atol, rtol):
    """One head_sample step equals the reference: state, which rows scored, scores, tokens."""
    assert_state_equal(ours, ref, step)
    assert torch.equal(torch.isnan(p), torch.isnan(ref_p))
    ev = ~torch.isnan(ref_p)
    torch.testing.assert_close(p[ev], ref_p[ev], atol=atol, rtol=rtol)
    assert torch.equal(tokens, ref_tokens), f"step {step}: tokens differ"


# --------------------------------------------------------------------------- the emulator
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc sk_dtype


def build_emulator(out_dir):
    """tests/cuda_emulator.cpp (the csrc/ kernels and launchers on CPU threads) built with g++
    into ``out_dir``, loaded with ctypes. Skips without nvcc (for the CUDA headers) or g++."""
    require_nvcc()
    gxx = require_gxx()
    so = os.path.join(str(out_dir), "cuda_emulator.so")
    build([gxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{cuda_include()}",
           f"-I{CSRC}", os.path.join(ROOT, "tests", "cuda_emulator.cpp"), "-o", so],
          "building the emulator")
    lib = ctypes.CDLL(so)
    lib.emu_ess_decode_attention.argtypes = [ctypes.c_void_p] * 14 + [
        ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.emu_head_sample.argtypes = [ctypes.c_void_p] * 13 + [ctypes.c_int, ctypes.c_int,
                                                             ctypes.c_float] + \
        [ctypes.c_int] * 5 + [ctypes.c_double] + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 4 + \
        [ctypes.c_void_p] * 2 + [ctypes.c_float, ctypes.c_void_p]
    return lib


def _ptr(t):
    return None if t is None else t.data_ptr()


def emu_head_sample_raw(lib, h, w, h_cls, sw, sb, temperature, seed, state, refusal_skip, cfg,
                        logprobs, nonfinite, probe_w=None, probe_b=None, probe_threshold=1.0,
                        probe_out=None):
    """What bindings.cpp's head_sample does, over host tensors, with outputs and workspaces
    poisoned: ``state`` is [] or the 12 tensors in bindings.cpp's order, ``cfg`` (threshold,
    tau, policy, schedule, period, anneal_stop, anneal_growth), ``nonfinite`` a (B,) int32
    tensor or None (NULL: off); ``probe_*``: the cascade's probe (fp32 weight (Dm,), bias (1,),
    threshold, (B,) scores out) or None. Returns (tokens, p_unsafe, token logprobs or None)."""
    B, Dm = h.shape
    V = w.shape[0]
    tiles = -(-V // 256)
    nan = float("nan")
    tokens = torch.full((B,), -7, dtype=torch.int64)
    p_unsafe = torch.full((B,), -7.0)
    cand_v, cand_i = torch.full((B, tiles), nan), torch.full((B, tiles), -7, dtype=torch.int32)
    lp = torch.full((B,), nan) if logprobs else None
    lse_m, lse_s = (torch.full((B, tiles), nan), torch.full((B, tiles), nan)) if logprobs \
        else (None, None)
    fields = (ctypes.c_void_p * 11)(*[t.data_ptr() for t in state[:11]]) if state else None
    rc = lib.emu_head_sample(
        _ptr(h), _ptr(w), _ptr(h_cls), _ptr(sw), _ptr(sb), _ptr(temperature), _ptr(seed),
        _ptr(tokens), _ptr(p_unsafe), _ptr(cand_v), _ptr(cand_i),
        ctypes.cast(fields, ctypes.c_void_p) if fields is not None else None,
        _ptr(state[11]) if state else None, state[11].numel() if state else 0,
        refusal_skip, *cfg, B, Dm, V, DTYPE_CODE[h.dtype], _ptr(lp), _ptr(lse_m), _ptr(lse_s),
        _ptr(nonfinite), _ptr(probe_w), _ptr(probe_b), float(probe_threshold), _ptr(probe_out))
    assert rc == 0, f"launcher returned cudaError {rc}"
    return tokens, p_unsafe, lp


def route_cuda_head_sample_to_emulator(monkeypatch, lib):
    """``head_sample(..., backend="cuda")`` on CPU tensors, for the test's duration: the Python
    backend (safekern.ops.cuda_backend) unchanged, ``torch.ops.safekern.cuda_head_sample`` (the
    schema of bindings.cpp) running the emulated kernel, and ``can_run`` keeping every rule of
    the backend except the device and the compiled extension."""
    from safekern.ops import cuda_backend, dispatch

    def op(h_tok, lm_head_weight, h_cls, safety_weight, safety_bias, temperature, seed, state,
           refusal_skip, threshold, tau, policy, schedule, period, anneal_stop, anneal_growth,
           logprobs, nonfinite, probe_weight=None, probe_bias=None, probe_threshold=1.0,
           probe_out=None):
        tokens, p, lp = emu_head_sample_raw(
            lib, h_tok, lm_head_weight, h_cls, safety_weight, safety_bias, temperature, seed,
            list(state), refusal_skip,
            (threshold, tau, policy, schedule, period, anneal_stop, anneal_growth), logprobs,
            nonfinite, probe_weight, probe_bias, probe_threshold, probe_out)
        return tokens, p, lp if lp is not None else torch.empty(0)

    def can_run(device, **ctx):
        why = cuda_backend.head_sample_can_run(torch.device("cuda"), **ctx)
        return None if why == cuda_backend.extension_error() else why

    monkeypatch.setattr(torch.ops.safekern, "cuda_head_sample", op, raising=False)
    monkeypatch.setitem(dispatch._REGISTRY["head_sample"], "cuda",
                        dispatch.Impl(cuda_backend._head_sample_cuda, can_run))
