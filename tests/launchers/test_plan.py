"""plan_launch: flags + environment -> one node's torchrun invocation, and the errors for jobs that cannot work."""
import os
import subprocess
import sys

import pytest
import torch

from launchers import LaunchError, LaunchFlags, expand_nodelist, plan_launch
from launchers.command import torchrun_program
from launchers.devices import GPU_DRIVER_PATHS, cuda_device_count
from launchers.slurm_env import PORT_BASE, PORT_SPAN

COMMAND = ["megaswift", "pt", "--config", "run.yaml"]


def plan(env, gpus=0, **flags):
    return plan_launch(env, LaunchFlags(command=list(COMMAND), **flags), gpu_count=lambda: gpus,
                       hostnames=expand_nodelist)


def slurm_step(node_id=0, nodes="node[01-04,07]", count=5, tasks=None, **extra):
    """The variables srun sets in a step (as seen on a real Slurm 22.05 step)."""
    return {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": nodes,
            "SLURM_STEP_NODELIST": nodes, "SLURM_JOB_NUM_NODES": str(count), "SLURM_STEP_NUM_NODES": str(count),
            "SLURM_STEP_NUM_TASKS": str(tasks or count), "SLURM_NODEID": str(node_id),
            "SLURM_PROCID": str(node_id), **extra}


def test_slurm_step_gives_head_port_rank_and_gpus():
    p = plan(slurm_step(node_id=3, SLURM_GPUS_ON_NODE="8"))
    assert (p.nnodes, p.node_rank, p.nproc_per_node, p.world_size) == (5, 3, 8, 40)
    assert p.master_addr == "node01" and not p.is_head
    assert p.master_port == PORT_BASE + 123456 % PORT_SPAN == 23456
    assert p.rdzv_id == "123456"
    argv = p.torchrun_argv(python="py")
    assert argv[:3] == ["py", "-m", "launchers.agent"]
    assert {"--nnodes=5", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:23456",
            "--rdzv-id=123456", "--max-restarts=0"} <= set(argv)
    assert "--rdzv-conf=join_timeout=600,is_host=false" in argv
    assert argv[-5:] == ["-m", "megaswift", "pt", "--config", "run.yaml"]


def test_head_node_hosts_the_rendezvous_store():
    p = plan(slurm_step(node_id=0, SLURM_GPUS_ON_NODE="4"))
    assert p.is_head and "--rdzv-conf=join_timeout=600,is_host=true" in p.torchrun_argv()


def test_derived_ports_stay_below_the_ephemeral_range():
    for job_id in ("1", "9999", "10000", "29999", "4294967295"):
        port = plan(slurm_step(SLURM_JOB_ID=job_id)).master_port
        assert PORT_BASE <= port < PORT_BASE + PORT_SPAN <= 32768


def test_user_style_variables_without_slurm():
    env = {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6000"}
    p = plan(env, gpus=8)
    assert (p.nnodes, p.node_rank, p.nproc_per_node, p.rdzv_endpoint) == (2, 1, 4, "10.1.2.3:6000")
    assert p.sources["processes per node"] == "NPROC_PER_NODE"


def test_flags_win_over_variables_for_address_and_processes():
    p = plan({"MASTER_ADDR": "a", "NPROC_PER_NODE": "4"}, gpus=8, nnodes=2, nproc_per_node=2, master_addr="b",
             master_port=7000)
    assert (p.master_addr, p.nproc_per_node, p.sources["address"]) == ("b", 2, "--master-addr")


def test_single_node_needs_no_network():
    p = plan({}, gpus=2)
    assert (p.rdzv_endpoint, p.nproc_per_node, p.world_size) == ("127.0.0.1:0", 2, 2)


def test_cpu_node_runs_one_process_unless_told():
    assert plan({}).nproc_per_node == 1
    assert plan({"NPROC_PER_NODE": "3"}).nproc_per_node == 3


@pytest.mark.parametrize("visible, count", [("0,1,2", 3), ("", 0), ("-1", 0), ("GPU-abc,GPU-def", 2)])
def test_cuda_visible_devices_counts_gpus(visible, count):
    p = plan({"CUDA_VISIBLE_DEVICES": visible}, gpus=99)
    assert p.nproc_per_node == max(count, 1)


def test_ipv6_head_is_bracketed():
    assert plan({"MASTER_ADDR": "fd00::1"}, nnodes=2).rdzv_endpoint == "[fd00::1]:29500"


def test_tuning_variables_are_passed_through_not_set():
    env = {"NCCL_IB_HCA": "mlx5_0", "GLOO_SOCKET_IFNAME": "eth0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "HOME": "/"}
    p = plan(env)
    assert p.passthrough == {k: v for k, v in env.items() if k != "HOME"}
    assert not any("NCCL" in arg or "GLOO" in arg for arg in p.torchrun_argv())
    assert "NCCL_IB_HCA=mlx5_0" in p.describe()


@pytest.mark.parametrize("env, flags, message", [
    (slurm_step(count=5), {"nnodes": 4}, "inconsistent number of nodes: --nnodes=4, SLURM_STEP_NODELIST=5"),
    ({"NNODES": "2"}, {"nnodes": 3}, "inconsistent number of nodes: --nnodes=3, NNODES=2"),
    (slurm_step(node_id=2, NODE_RANK="0"), {}, "inconsistent node rank: NODE_RANK=0, SLURM_NODEID=2"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, {}, "node rank 2 (NODE_RANK) is out of range for 2"),
    ({"WORLD_SIZE": "16"}, {"nproc_per_node": 2}, "inconsistent world size: WORLD_SIZE=16"),
    (slurm_step(tasks=10), {}, "srun started 10 tasks on 5 node(s)"),
    (slurm_step(count=4), {}, "expands to 5 host(s)"),
    ({"NNODES": "2"}, {}, "needs the head node's address"),
    ({"SLURM_GPUS_ON_NODE": "4"}, {"nproc_per_node": 8}, "this node has 4 GPU(s) (SLURM_GPUS_ON_NODE)"),
    ({"NPROC_PER_NODE": "two"}, {}, "NPROC_PER_NODE: expected a positive number, found 'two'"),
    ({}, {"nproc_per_node": 0}, "expected at least 1 process per node"),
    ({"MASTER_ADDR": "h", "MASTER_PORT": "70000"}, {"nnodes": 2}, "expected a TCP port"),
])
def test_jobs_that_cannot_work_fail_with_the_settings_named(env, flags, message):
    with pytest.raises(LaunchError) as info:
        plan(env, gpus=0, **flags)
    assert message in str(info.value)


def test_multi_node_job_outside_srun_is_refused():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0"}
    with pytest.raises(LaunchError, match="not inside an srun step.*srun --ntasks-per-node=1"):
        plan(env)


def test_single_node_batch_script_without_srun_is_fine():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"}
    assert plan(env, nproc_per_node=2).world_size == 2


@pytest.mark.parametrize("command, program", [
    (["megaswift", "sft", "--config", "c.yaml"], ["-m", "megaswift", "sft", "--config", "c.yaml"]),
    (["--", "python", "-m", "megaswift", "pt"], ["-m", "megaswift", "pt"]),
    (["python3", __file__, "x"], [__file__, "x"]),
    (["-m", "pkg.mod"], ["-m", "pkg.mod"]),
])
def test_command_becomes_torchrun_program(command, program):
    assert torchrun_program(command) == program


@pytest.mark.parametrize("command, message", [
    ([], "no command to launch"), (["megaswift"], "expected a megaswift subcommand"),
    (["megaswift", "launch"], "expected a megaswift subcommand"), (["missing.py"], "script 'missing.py' not found"),
    (["bash", "x.sh"], "found 'bash'"),
])
def test_bad_commands_say_what_is_expected(command, message):
    with pytest.raises(LaunchError, match=message.replace("(", r"\(")):
        torchrun_program(command)


def _child_failed(**exit_codes):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    failures = {int(rank[1:]): ProcessFailure(local_rank=int(rank[1:]), pid=100 + int(rank[1:]), exitcode=code,
                                              error_file="/nonexistent") for rank, code in exit_codes.items()}
    return ChildFailedError("megaswift", failures)


@pytest.mark.parametrize("codes, line, status", [
    # rank 1 was SIGTERMed by torchrun after rank 0 failed (listed first, same second): rank 0 is the cause
    ({"r1": -15, "r0": 2}, "megaswift launch: rank 0 exited with status 2 (its own output above says why); "
                           "then rank 1 stopped too", 2),
    ({"r0": -15, "r1": -9, "r2": -15}, "megaswift launch: rank 1 was stopped by SIGKILL; then ranks 0, 2 stopped "
                                       "too", 1),
])
def test_a_failed_launch_ends_with_one_line_naming_the_cause(codes, line, status):
    from launchers.agent import describe_failure
    assert describe_failure(_child_failed(**codes)) == (line, status)


def test_gpu_count_without_a_driver_agrees_with_torch_and_imports_no_torch(tmp_path):
    """The no-driver shortcut must give torch's own answer: here (no GPU driver on CI) 0, in a fresh process
    that never imports torch; with a driver path present torch is asked."""
    probe = ("import sys; from launchers.devices import cuda_device_count; n = cuda_device_count(); "
             "print(n, 'torch' in sys.modules)")
    count, imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                     check=True).stdout.split()
    torch_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert int(count) == torch_count
    driver = any(os.path.exists(p) for p in GPU_DRIVER_PATHS)
    assert imported == str(driver)  # torch imported exactly when a driver is present
    assert cuda_device_count(driver_paths=(str(tmp_path),)) == torch_count  # "a driver": torch is asked
