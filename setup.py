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
import logging
import os
import shutil
import sys
import warnings

from setuptools import setup

# pip runs this file three times (build requirements, metadata, the build itself); only the build compiles
BUILD_COMMANDS = ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install")
# torch's import-time notices are about running torch, not about building against it; this file says what it
# builds and why. The NumPy one appears when pip builds megaswift before installing numpy; the CUDA runtime
# one on any machine without a GPU driver, where the CUDA kernels still compile.
TORCH_IMPORT_NOTICES = ("Failed to initialize NumPy", "No CUDA runtime is found")


class _DropTorchImportNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in TORCH_IMPORT_NOTICES)


def import_torch_build_tools():
    """(torch, BuildExtension, CppExtension, CUDAExtension), without torch's import-time notices."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(_DropTorchImportNotices())
    with warnings.catch_warnings():
        for text in TORCH_IMPORT_NOTICES:
            warnings.filterwarnings("ignore", message=f".*{text}")
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    return torch, BuildExtension, CppExtension, CUDAExtension


def note(message: str) -> None:
    """Says what is (not) built once, in the run that builds."""
    if any(command in sys.argv[1:] for command in BUILD_COMMANDS):
        print(f"megaswift setup.py: {message}", file=sys.stderr)


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
        torch, BuildExtension, CppExtension, CUDAExtension = import_torch_build_tools()
    except ImportError:
        note("torch is not importable here, so csrc is NOT built (install with "
             "`pip install -e . --no-build-isolation`); the torch reference ops will run")
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
        note(f"building CUDA kernels with {cuda_home} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    elif cuda_wanted == "1":
        sys.exit(f"megaswift setup.py: MEGASWIFT_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    else:
        note(f"CUDA kernels not built: {reason}")
    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_build())
