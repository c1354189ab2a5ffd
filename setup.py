"""Builds the extension mamba_ext._C against the torch already installed.

CPU kernels are always built. CUDA kernels are built when torch has CUDA and nvcc is found
(MAMBA_EXT_CUDA=0/1 forces either way); the arch list comes from TORCH_CUDA_ARCH_LIST,
default "8.0;9.0a". The sources are every .cpp and .cu under csrc/, found by the same globs
that CMakeLists.txt uses, so no source list is written by hand.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(suffix):
    pattern = os.path.join(HERE, "csrc", "**", "*" + suffix)
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(pattern, recursive=True))


def with_cuda():
    forced = os.environ.get("MAMBA_EXT_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    # No trapping math and no errno: without them GCC will not vectorise loops with float
    # compares or libm calls; neither changes a result.
    cxx_flags = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-Wall",
                 "-Wno-unknown-pragmas"]
    common = dict(
        name="mamba_ext._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda():
        return CppExtension(sources=sources(".cpp"), extra_compile_args={"cxx": cxx_flags}, **common)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DMAMBA_EXT_WITH_CUDA"]
    return CUDAExtension(
        sources=sources(".cpp") + sources(".cu"),
        extra_compile_args={"cxx": cxx_flags + ["-DMAMBA_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
        **common,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
