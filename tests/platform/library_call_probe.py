"""A notebook-style session: snapshot what the CPU patches could change, call `converters.hf2mcore` and
`converters.mcore2hf` as library functions (with the logit check, which runs megatron-core), snapshot
again, and print `CHANGED [...]`: every difference found, empty when the process is as it was.

The snapshot is not derived from megaswift's list of patches: it records every attribute of the
objects megatron-core looks up (torch.cuda, torch.Tensor, megatron's RNG and collective modules and
classes), the function-mode stack, the RNG state, logging filters, warning filters and the process group.
"""
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.cuda.random  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import mappings, random as mcore_random  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402

from tests.converters.tiny_models import save_tiny_hf_model  # noqa: E402

WATCHED = {"torch.cuda": torch.cuda, "torch.cuda.random": torch.cuda.random, "torch.Tensor": torch.Tensor,
           "megatron.core.tensor_parallel.random": mcore_random, "megatron.core.tensor_parallel.mappings": mappings,
           "mappings._AllToAll": mappings._AllToAll, "WrappedTorchNorm": WrappedTorchNorm}


def snapshot() -> dict:
    # (copyreg caches __slotnames__ on a class the first time one of its objects is copied: not a patch)
    state = {f"{owner}.{attr}": id(value) for owner, obj in WATCHED.items()
             for attr, value in list(vars(obj).items()) if not isinstance(value, type(sys))
             and attr != "__slotnames__"}
    state["function modes"] = [type(m).__name__ for m in torch.overrides._get_current_function_mode_stack()]
    state["torch rng state"] = torch.get_rng_state().tolist()
    state["torch.distributed initialized"] = torch.distributed.is_initialized()
    state["megatron model parallel initialized"] = parallel_state.model_parallel_is_initialized()
    state["warning filters"] = repr(warnings.filters)
    state["default dtype"] = str(torch.get_default_dtype())
    state["grad enabled"] = torch.is_grad_enabled()
    loggers = {"": logging.getLogger(), **{name: logging.getLogger(name) for name in logging.root.manager.loggerDict}}
    state.update({f"logger {name!r} filters": [type(f).__name__ for f in logger.filters]
                  for name, logger in loggers.items() if logger.filters})
    return state


def changes(before: dict, after: dict) -> list[str]:
    found = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            found.append(f"{key}: removed")
        elif key not in before:
            if key.startswith(tuple(WATCHED)) and not key.startswith("torch.cuda."):
                found.append(f"{key}: added")
            elif not key.startswith(tuple(WATCHED)):
                found.append(f"{key}: added {after[key]}")
        elif before[key] != after[key]:
            found.append(f"{key}: changed" if isinstance(before[key], (int, list)) and len(str(before[key])) > 200
                         else f"{key}: {before[key]} -> {after[key]}")
    return found


def main() -> None:
    from converters import hf2mcore, mcore2hf

    work = Path(tempfile.mkdtemp(prefix="library_call_"))
    hf_dir = save_tiny_hf_model("tiny-llama", work / "hf", torch.float32, None)
    torch.manual_seed(7)
    before = snapshot()
    expected_next_draw = torch.rand(3, generator=torch.Generator().set_state(torch.get_rng_state()))
    hf2mcore(hf_dir, work / "mcore", verify=True, progress=False)
    mcore2hf(work / "mcore", work / "exported", verify=True, progress=False)
    after = snapshot()
    found = changes(before, after)
    if not torch.equal(torch.rand(3), expected_next_draw):
        found.append("torch's random stream does not continue where it was")
    print("CHANGED", json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
