"""Finding nvcc, the CUDA headers and g++ for the CPU-side CUDA tests (no GPU involved)."""
import glob
import os
import re
import shutil
import subprocess

import pytest

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
