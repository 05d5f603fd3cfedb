"""For each CPU patch: revert it, run its checks (expect errors), re-apply it, run them again.

Run directly for the single-process checks, or under torchrun with --distributed for the
two-process ones. Rank 0 prints one line per check, `PROBE {"patch", "check", "without",
"with"}`, where "without"/"with" is "ok" or "<ExceptionType>: <message>" ("without" is null
for checks that belong to no patch). The single-process run also prints `CONTEXT {...}`,
`APPLY {...}` and `THREAD {...}` lines about cpu_patches() and apply_cpu_patches themselves.
"""
import argparse
import json
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from megaswift.platform import cpu  # noqa: E402
from tests.platform import patch_checks  # noqa: E402
from tests.platform.tiny_gpt import init_distributed  # noqa: E402


def outcome(check) -> str:
    try:
        check()
        return "ok"
    except Exception as e:  # the point is to record what megatron-core raises
        return f"{type(e).__name__}: {e}"


def report(tag: str, row: dict) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{tag} {json.dumps(row)}", flush=True)


def mode_stack_depth() -> int:
    return len(torch.overrides._get_current_function_mode_stack())


def probe_context() -> None:
    """cpu_patches(): everything applied inside, nothing left after; inside an applied process it undoes
    nothing (run before probe_apply, which applies for good)."""
    original_type = torch.Tensor.type
    with cpu.cpu_patches() as active:
        inside = {"active": active, "applied": cpu.applied_patches(), "mode_stack_depth": mode_stack_depth(),
                  "zeros_on_cuda": outcome(lambda: torch.zeros(1, device="cuda"))}
    after = {"applied": cpu.applied_patches(), "mode_stack_depth": mode_stack_depth(),
             "tensor_type_restored": torch.Tensor.type is original_type,
             "zeros_on_cuda": outcome(lambda: torch.zeros(1, device="cuda"))}
    cpu.apply_cpu_patches()
    with cpu.cpu_patches():
        pass
    nested = {"applied": cpu.applied_patches(), "mode_stack_depth": mode_stack_depth()}
    report("CONTEXT", {"inside": inside, "after": after, "nested_in_applied": nested})


def probe_apply() -> None:
    """apply_cpu_patches: True twice, one function mode entered, every patch applied."""
    first, second = cpu.apply_cpu_patches(), cpu.apply_cpu_patches()
    report("APPLY", {"first": first, "second": second, "mode_stack_depth": mode_stack_depth(),
                     "applied": cpu.applied_patches(), "all": list(cpu.PATCHES),
                     "current_device": str(torch.cuda.current_device())})


def probe_other_thread() -> None:
    """The function mode is thread-local: a new thread needs cpu_device_mode()."""
    result = {}

    def work():
        result["bare"] = outcome(lambda: torch.zeros(2, device="cuda"))
        with cpu.cpu_device_mode():
            result["in_cpu_device_mode"] = outcome(lambda: torch.zeros(2, device="cuda"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    report("THREAD", result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--distributed", action="store_true")
    distributed = parser.parse_args().distributed
    if distributed:
        assert cpu.apply_cpu_patches(), "expected a machine without CUDA"
    else:
        probe_context()
        probe_apply()
        probe_other_thread()
    init_distributed(tp=2 if distributed else 1)
    checks = patch_checks.TWO_PROCESSES if distributed else patch_checks.SINGLE_PROCESS
    for name, patch_checks_ in checks.items():
        for check in patch_checks_:
            without = None
            if name is not None:
                cpu.revert_patch(name)
                without = outcome(check)
                cpu.PATCHES[name]()
            report("PROBE", {"patch": name, "check": check.__name__, "without": without,
                             "with": outcome(check)})


if __name__ == "__main__":
    main()
