"""Each CPU patch is still needed (its megatron-core operation fails without it, with the
documented error) and sufficient (the operation works and gives the right result with it).

When a megatron-core or torch upgrade makes a `without` case pass, the patch has become
unneeded: delete it and its row in docs/cpu-support.md. The probes run in subprocesses.
"""
import pytest

from megaswift.platform.cpu import PATCHES
from tests.platform.conftest import needs_cpu_only, parse_lines
from tests.platform.patch_checks import SINGLE_PROCESS, TWO_PROCESSES

pytestmark = [needs_cpu_only, pytest.mark.timeout(300)]

NO_DRIVER = ("Found no NVIDIA driver", "Torch not compiled with CUDA enabled")  # CUDA / CPU build of torch
# check -> what it raises without its patch (any one of the strings), from docs/mcore-on-cpu.md
EXPECTED_ERRORS = {
    "check_current_device": NO_DRIVER,
    "check_cuda_rng": NO_DRIVER,
    "check_schedule_device_cuda": NO_DRIVER,
    "check_cuda_calls_stay_on_cpu": NO_DRIVER,
    "check_cuda_synchronize": NO_DRIVER,
    "check_sequence_parallel_torch_norm": ("AssertionError: sequence parallel not supported by torch LayerNorm",),
    "check_cuda_streams": ("CUDA driver version is insufficient", "torch.cuda.Stream requires CUDA support"),
    "check_all_to_all_split_sizes": ("TypeError: all_to_all_single(): incompatible function arguments",),
    "check_fp32_optimizer_clip_grads": ("AssertionError",),
    "check_bf16_optimizer_wrapper": ("Wrapped parameters must be one of torch.cuda.FloatTensor",),
    "check_uneven_all_gather": ("ProcessGroupGloo::allgather: invalid tensor size",),
    "check_recompute": NO_DRIVER,
}


def test_every_patch_has_a_check():
    covered = set(SINGLE_PROCESS) | set(TWO_PROCESSES)
    assert covered - {None} == set(PATCHES)
    checks = [c.__name__ for group in (SINGLE_PROCESS, TWO_PROCESSES) for k, cs in group.items() if k for c in cs]
    assert sorted(checks) == sorted(EXPECTED_ERRORS)


def _rows(output: str) -> dict[str, dict]:
    return {row["check"]: row for row in parse_lines(output, "PROBE")}


def _assert_needed_and_works(rows: dict[str, dict], check: str) -> None:
    row = rows[check]
    assert any(expected in (row["without"] or "") for expected in EXPECTED_ERRORS[check]), (
        f"{row['patch']}: {check} without the patch gave {row['without']!r}, expected one of "
        f"{EXPECTED_ERRORS[check]}; if it now passes, the patch may be unneeded")
    assert row["with"] == "ok", f"{row['patch']}: {check} with the patch failed: {row['with']}"


@pytest.mark.parametrize("check", [c.__name__ for k, cs in SINGLE_PROCESS.items() if k for c in cs])
def test_single_process_patch_needed_and_works(single_process_probe, check):
    _assert_needed_and_works(_rows(single_process_probe), check)


@pytest.mark.parametrize("check", [c.__name__ for k, cs in TWO_PROCESSES.items() if k for c in cs])
def test_two_process_patch_needed_and_works(two_process_probe, check):
    _assert_needed_and_works(_rows(two_process_probe), check)


def test_uneven_reduce_scatter_works_on_gloo_without_a_patch(two_process_probe):
    assert _rows(two_process_probe)["check_uneven_reduce_scatter"]["with"] == "ok"


def test_apply_is_idempotent_and_enters_one_function_mode(single_process_probe):
    (row,) = parse_lines(single_process_probe, "APPLY")
    assert row["first"] is True and row["second"] is True
    assert row["mode_stack_depth"] == 1, "a second apply must not push a second function mode"
    assert row["applied"] == row["all"]
    assert row["current_device"] == "cpu"


def test_cpu_patches_context_undoes_only_what_it_applied(single_process_probe):
    (row,) = parse_lines(single_process_probe, "CONTEXT")
    inside, after, nested = row["inside"], row["after"], row["nested_in_applied"]
    assert inside["active"] is True and inside["mode_stack_depth"] == 1 and inside["zeros_on_cuda"] == "ok"
    assert sorted(inside["applied"]) == sorted(row_all(single_process_probe))
    assert after["applied"] == [] and after["mode_stack_depth"] == 0 and after["tensor_type_restored"]
    assert any(e in after["zeros_on_cuda"] for e in NO_DRIVER), after  # torch is plain torch again
    # inside a process whose entry point applied them, the context leaves them applied
    assert sorted(nested["applied"]) == sorted(row_all(single_process_probe)) and nested["mode_stack_depth"] == 1


def row_all(output: str) -> list[str]:
    (row,) = parse_lines(output, "APPLY")
    return row["all"]


def test_other_threads_need_cpu_device_mode(single_process_probe):
    (row,) = parse_lines(single_process_probe, "THREAD")
    assert any(e in row["bare"] for e in NO_DRIVER), row  # documents that the mode is thread-local
    assert row["in_cpu_device_mode"] == "ok"
