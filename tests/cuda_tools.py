"""Shared by the CUDA tests: finding nvcc, the CUDA headers and g++ (CPU-side checks, no GPU),
and comparing a kernel's ESS step with the reference controller."""
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
