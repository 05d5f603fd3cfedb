"""Builds the csrc extension; all package metadata lives in pyproject.toml.

Always builds `megaswift._kernels_cpu` (C++/OpenMP). Builds `megaswift._kernels_cuda` too when
torch is a CUDA build and a CUDA toolkit with nvcc is found; no GPU is needed to compile it.
Environment knobs:
  MEGASWIFT_BUILD_EXT=0        build no extension (the torch references run, announced at run time)
  MEGASWIFT_BUILD_CUDA=0|1     skip the CUDA extension, or fail loudly if it cannot be built
  TORCH_CUDA_ARCH_LIST         CUDA architectures, default "8.0;9.0" (A100, H100/H200)
  CUDA_HOME                    the toolkit folder (found from nvcc or /usr/local/cuda* otherwise)
"""
import glob
import os
import shutil
import sys

from setuptools import setup


def find_cuda_home() -> str | None:
    """The toolkit folder (with include/cuda_runtime.h), not the folder of an nvcc wrapper script."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for folder in filter(None, candidates):
        if os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")) and \
                os.path.isfile(os.path.join(folder, "bin", "nvcc")):
            return folder
    return None


def extension_build() -> dict:
    if os.environ.get("MEGASWIFT_BUILD_EXT", "1") == "0":
        return {}
    cuda_wanted = os.environ.get("MEGASWIFT_BUILD_CUDA")
    cuda_home = find_cuda_home() if cuda_wanted != "0" else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import time
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # without it the build crashes when no GPU is visible
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("megaswift setup.py: torch is not importable here, so csrc is NOT built (install with "
              "`pip install -e . --no-build-isolation`); the torch reference ops will run", file=sys.stderr)
        return {}
    csrc = "csrc"
    cxx_flags = ["-O3", "-fopenmp"]  # no -std: torch's headers pick their own standard
    extensions = [CppExtension(
        "megaswift._kernels_cpu",
        [f"{csrc}/register_cpu.cpp", f"{csrc}/cross_entropy_cpu.cpp", f"{csrc}/packing_cpu.cpp"],
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])]
    reason = None
    if cuda_wanted == "0":
        reason = "MEGASWIFT_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        reason = "no CUDA toolkit with nvcc found (set CUDA_HOME)"
    if reason is None:
        extensions.append(CUDAExtension(
            "megaswift._kernels_cuda", [f"{csrc}/cross_entropy_cuda.cu"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
        print(f"megaswift setup.py: building CUDA kernels with {cuda_home} for "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    elif cuda_wanted == "1":
        sys.exit(f"megaswift setup.py: MEGASWIFT_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    else:
        print(f"megaswift setup.py: CUDA kernels not built: {reason}", file=sys.stderr)
    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_build())
