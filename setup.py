"""Build script: pure-Python package, plus the optional CUDA extension ``safekern._C``.

The extension is built with torch.utils.cpp_extension + ninja only when all of these hold:
  * ``SAFEKERN_SKIP_CUDA_BUILD`` is not ``1``;
  * torch is importable in the build environment and is a CUDA build
    (``pip install -e . --no-build-isolation`` uses the installed torch);
  * ``nvcc`` is found (CUDA_HOME or PATH);
  * ``csrc/`` holds CUDA sources.
Otherwise safekern installs as pure Python and the Triton/torch backends serve every op.
Environment: ``SAFEKERN_CUDA_ARCHS`` (default "80;90a"), ``MAX_JOBS`` (default: sized to memory).
"""
import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _max_jobs() -> str:
    # nvcc on these kernels peaks near 2-3 GB per job; do not let ninja exhaust memory.
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 3))))


def cuda_extension_kwargs():
    if os.environ.get("SAFEKERN_SKIP_CUDA_BUILD", "0") == "1":
        return {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + \
        sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not any(s.endswith(".cu") for s in sources):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None or (CUDA_HOME is None and shutil.which("nvcc") is None):
        return {}
    archs = os.environ.get("SAFEKERN_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    gencode = []
    for a in filter(None, (x.strip() for x in archs)):
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    ext = CUDAExtension(
        name="safekern._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # No -std flag: torch adds the standard its headers need (C++20 since torch 2.10).
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                                     "--expt-relaxed-constexpr"] + gencode},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(
        use_ninja=True)}}


setup(**cuda_extension_kwargs())
