"""safekern as a user installs it: a built wheel, in a fresh virtual environment outside the
source tree, keeps every fast path (issue 25).

An editable install reads the source tree, so a file missing from the package data (the C++
headers the CPU kernels include, say) goes unnoticed there; a wheel lacking it falls back to the
slow paths at run time without failing. Building the C++ kernels from the installed copy
(a fresh ``TORCH_EXTENSIONS_DIR``) and running the main job is the check. ~1-3 min on 2 cores.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a source checkout holds besides the package: never part of a wheel.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                    "__pycache__", "*.so", ".pytest_cache", "bench_out",
                                    "gpu_out", ".benchmarks")

pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel ``pip wheel`` builds offline from a copy of the source tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    env = {**os.environ, "SAFEKERN_SKIP_CUDA_BUILD": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp / "dist"), str(src)], env=env)
    (path,) = (tmp / "dist").glob("safekern-*.whl")
    return path


def test_wheel_ships_every_non_python_file_of_the_package(wheel):
    package = os.path.join(ROOT, "safekern")
    want = {os.path.relpath(os.path.join(d, f), ROOT)
            for d, dirs, files in os.walk(package) if "__pycache__" not in d
            for f in files if not f.endswith((".py", ".pyc", ".so"))}
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {"safekern/ops/cpu/cpu_linear_tile.h", "safekern/ops/cpu/cpu_linear_packed.h"} <= want
    assert want - shipped == set(), "package data missing from the wheel (pyproject.toml)"


@pytest.mark.skipif(sys.platform != "linux", reason="the C++ CPU kernels are built on Linux")
def test_installed_wheel_builds_the_cpu_kernels_and_runs_the_main_job(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                ).stdout.strip()
    # torch, transformers, ... come from this test's environment (a .pth line: its editable
    # safekern is not activated, and the venv's own site-packages, holding the wheel, come
    # first); installing them again would cost minutes and gigabytes.
    with open(os.path.join(site, "deps_from_test_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
          str(wheel)])
    home = tmp_path / "user"            # outside the source tree: no ./safekern to import
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"), PATH=f"{venv}/bin:"
               + env.get("PATH", ""), SAFEKERN_CACHE=str(tmp_path / "cache"))
    code = ("import json, safekern; print(safekern.__file__); "
            "print(json.dumps(safekern.info('cpu')['cpu_linear']))")
    where, cpu_linear = _run([str(py), "-c", code], cwd=home, env=env).stdout.split("\n")[:2]
    assert where.startswith(site), f"imported {where}, not the installed wheel"
    if cpu_linear.startswith('"the kernel is x86-64') or "lacks AVX2" in cpu_linear:
        pytest.skip(f"no C++ CPU kernels on this machine: {cpu_linear}")
    assert cpu_linear == '"available"'
    bench = _run([str(venv / "bin" / "safekern"), "bench", "--quick", "--reps", "1",
                  "--new-tokens", "8", "--no-progress", "--vllm", "off", "--out",
                  str(tmp_path / "out")], cwd=home, env=env)
    assert "controller: fused C++" in bench.stdout and "linear path: modules" not in bench.stdout
    assert "cpu_linear not used" not in bench.stdout
    help_text = _run([str(venv / "bin" / "safekern"), "--help"], cwd=home, env=env).stdout
    assert ".md" not in help_text


def test_load_jit_outside_a_source_checkout_says_what_to_do(monkeypatch, tmp_path):
    from safekern.ops import cuda_backend

    monkeypatch.setattr(cuda_backend, "CSRC", str(tmp_path / "csrc"))
    monkeypatch.setattr(cuda_backend, "_ops_registered", lambda: False)
    with pytest.raises(FileNotFoundError, match="load_jit builds csrc/ of a source checkout"):
        cuda_backend.load_jit()
