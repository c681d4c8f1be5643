"""Build script: the Python package always; the compiled extension ``nepenthe._C`` when sources exist
and torch is importable.

The extension is built against the torch installed where pip runs, so build with
``pip install --no-build-isolation .``. A default build (``pip install .``, ``pip wheel .``,
``python -m build``) runs in an isolated environment without torch: it makes the pure-Python
package, which works everywhere (the ops fall back to their PyTorch reference) and says so; rerun
with ``--no-build-isolation`` for the fused C++ / CUDA kernels.

Switches (environment variables):
  NEPENTHE_NO_EXT=1       pure-Python install, no compiled code at all (the package works without it)
  NEPENTHE_NO_CUDA=1      build the C++ CPU ops only, even where CUDA is available
  MAX_JOBS=N              parallel compile jobs (default: from cores and free memory, ~3 GiB a job)
C++ CPU ops are built from csrc/*.cpp + csrc/cpu/*.cpp (OpenMP, -O3 -g0); CUDA ops from
csrc/cuda/*.cu only when torch was built with CUDA and CUDA_HOME is set. Kernels written in
Triton are the subpackage ``nepenthe.kernels``.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gib = 8.0
    return str(max(1, min(cores, int(free_gib // 3))))


def extensions():
    if os.environ.get("NEPENTHE_NO_EXT") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:  # no compiled ops in this tree yet
        return [], {}
    try:
        import torch
    except ImportError:  # an isolated build environment: no torch to compile against
        print("nepenthe: torch is not importable in this build environment, so the compiled kernels are not "
              "built (the package falls back to its PyTorch reference ops). For the fused kernels: "
              "pip install --no-build-isolation .", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", _default_jobs())
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++17"]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = bool(cuda_sources) and torch.version.cuda and CUDA_HOME and os.environ.get("NEPENTHE_NO_CUDA") != "1"
    if use_cuda:
        # No --use_fast_math: the kernels must match PyTorch's arithmetic (IEEE division/sqrt, no flush to zero).
        nvcc = ["-O3", "-lineinfo", "-std=c++17"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # else torch adds the listed architectures itself
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]  # + PTX, compiled by the driver on newer GPUs
        cuda_cpp = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        ext = CUDAExtension("nepenthe._C", sources + cuda_sources + cuda_cpp,
                            extra_compile_args={"cxx": cxx + ["-DNEPENTHE_WITH_CUDA"], "nvcc": nvcc},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("nepenthe._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(
    # every package under nepenthe/ (a new subpackage cannot be forgotten)
    packages=find_packages(include=["nepenthe", "nepenthe.*"]),
    # the experiment configurations shipped with the package (nepenthe experiment --list)
    package_data={"nepenthe": ["py.typed"], "nepenthe.experiment": ["configs/*.toml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
