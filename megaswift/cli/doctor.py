"""`megaswift doctor`: what this environment can run, and which path each megaswift kernel takes."""
from __future__ import annotations

import argparse
import importlib
import json
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _importable(module: str) -> str:
    try:
        importlib.import_module(module)
        return "yes"
    except Exception as e:  # TE and apex fail in many ways (missing CUDA libs, ABI), all mean "no"
        return f"no ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"


def environment_report() -> dict:
    import torch

    from megaswift.kernels import kernel_report
    from megaswift.platform.versions import installed_version

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda or "no (CPU build)",
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_threads": torch.get_num_threads(),
        "megaswift": installed_version("megaswift"),
        # the installed distribution's version: megatron.core.__version__ appends the git commit of whatever
        # checkout its folder lies in (this repository, for a venv inside it)
        "megatron_core": installed_version("megatron-core"),
        "transformers": installed_version("transformers"),
        "transformer_engine_importable": _importable("transformer_engine.pytorch"),
        "apex_importable": _importable("apex"),
        "kernels": kernel_report(),
    }


def run(args: argparse.Namespace) -> int:
    report = environment_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key != "kernels":
            print(f"{key:32s} {value}")
    print("kernels (op / device -> path):")
    for op, paths in report["kernels"].items():
        for device, path in paths.items():
            print(f"  {op:28s} {device:5s} {path}")
    return 0
