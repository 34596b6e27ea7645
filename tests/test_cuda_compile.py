"""CI compile check of the CUDA backend (csrc/): no GPU needed, only nvcc and g++.

Every csrc/*.cu is compiled to an object for sm_80 and sm_90a with the flags setup.py uses, so a
syntax, type, template or ptxas error (e.g. too much static shared memory) fails CI.
bindings.cpp is syntax-checked with g++ against the installed torch headers. Skipped when nvcc
is absent, unless SAFEKERN_REQUIRE_NVCC=1 (then missing nvcc fails). About a minute on 2 cores.
"""
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
ARCHS = ("80", "90a")
# The nvcc flags of setup.py (which lets torch add -std; C++17 is the oldest torch uses).
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]


def _find_nvcc():
    cands = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "nvcc"))
    cands += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


NVCC = _find_nvcc()


def _require_nvcc():
    if NVCC is not None:
        return
    if os.environ.get("SAFEKERN_REQUIRE_NVCC", "0") == "1":
        pytest.fail("SAFEKERN_REQUIRE_NVCC=1 but nvcc was not found on PATH, CUDA_HOME or "
                    "/usr/local/cuda*/bin")
    pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda*): CUDA sources not compiled")


def _cuda_include():
    """The CUDA headers of NVCC (which may be a wrapper script, so ask it for its -I path)."""
    res = subprocess.run([NVCC, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                         text=True, timeout=60)
    cands = re.findall(r'INCLUDES="?\s*-I"?([^"\s]+)', res.stdout + res.stderr)
    cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include"))
    found = next((c for c in cands if os.path.exists(os.path.join(c, "cuda_runtime.h"))), None)
    if found is None:
        pytest.fail(f"cuda_runtime.h not found next to {NVCC} (looked in {cands})")
    return found


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
    _require_nvcc()
    out = tmp_path / (source + f".sm{arch}.o")
    cmd = [NVCC, "-c", *NVCC_FLAGS, "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-I", CSRC, os.path.join(CSRC, source), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert out.stat().st_size > 0


def test_bindings_syntax():
    _require_nvcc()  # needs the CUDA runtime headers that c10/cuda includes
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: bindings.cpp not syntax-checked")
    from torch.utils.cpp_extension import include_paths

    torch_inc = include_paths()
    cmd = [gxx, "-fsyntax-only", "-Wall",
           "-std=c++20" if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 10)
           else "-std=c++17",
           *[f"-I{p}" for p in torch_inc], f"-I{_cuda_include()}",
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
