"""What a Slurm job step tells the launcher: its hosts, this node's index, and how many tasks it started."""
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from launchers.errors import LaunchError
from launchers.nodelist import slurm_hostnames

# Ports derived from the job id stay below Linux's ephemeral range (32768+), where NCCL and clients pick ports.
PORT_BASE, PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class SlurmStep:
    job_id: str
    hosts: tuple[str, ...]   # the step's hosts in Slurm's order; the first is the head node
    hosts_source: str
    node_id: int             # SLURM_NODEID: this node's index in the step
    tasks: int               # tasks srun started in the step (one per node is what the launcher needs)

    @property
    def derived_port(self) -> int:
        return PORT_BASE + int(self.job_id) % PORT_SPAN


def _int(env: Mapping[str, str], name: str) -> int:
    text = env[name].strip()
    if not text.isdigit():
        raise LaunchError(f"{name}: expected a number, found {text!r}")
    return int(text)


def slurm_step_from_env(env: Mapping[str, str],
                        hostnames: Callable[[str, str], list[str]] = slurm_hostnames) -> SlurmStep | None:
    """The Slurm step this process runs in; None outside Slurm. Fails where one agent per node cannot be."""
    if not env.get("SLURM_JOB_ID"):
        return None
    job_id = env["SLURM_JOB_ID"].strip()
    if not job_id.isdigit():
        raise LaunchError(f"SLURM_JOB_ID: expected a number, found {job_id!r}")
    in_step = bool(env.get("SLURM_STEP_ID"))
    # Inside `srun` the step's own list is where the agents run; the job's list covers the whole allocation.
    source = "SLURM_STEP_NODELIST" if in_step and env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    if not env.get(source):
        raise LaunchError(f"SLURM_JOB_ID is set but {source} is not: cannot find the head node. "
                          f"Run the launcher from an sbatch/salloc job through srun.")
    hosts = tuple(hostnames(env[source], source))
    count_name = "SLURM_STEP_NUM_NODES" if in_step and env.get("SLURM_STEP_NUM_NODES") else "SLURM_JOB_NUM_NODES"
    if env.get(count_name) and _int(env, count_name) != len(hosts):
        raise LaunchError(f"{source}={env[source]!r} expands to {len(hosts)} host(s) {list(hosts)}, "
                          f"but {count_name}={env[count_name]}; check the host list syntax")
    if not in_step:
        if len(hosts) > 1:
            raise LaunchError(f"this is a {len(hosts)}-node Slurm job but the launcher is not inside an srun "
                              f"step, so only one node would join and the others would never start. Run "
                              f"`srun --ntasks-per-node=1 python -m megaswift launch ...` (see slurm/pretrain.sh).")
        return SlurmStep(job_id, hosts, source, 0, 1)
    tasks = _int(env, "SLURM_STEP_NUM_TASKS") if env.get("SLURM_STEP_NUM_TASKS") else len(hosts)
    if tasks != len(hosts):
        raise LaunchError(f"srun started {tasks} tasks on {len(hosts)} node(s) (SLURM_STEP_NUM_TASKS), but the "
                          f"launcher needs exactly one task per node (each starts the node's processes): "
                          f"use `srun --ntasks-per-node=1`")
    node_id = _int(env, "SLURM_NODEID") if env.get("SLURM_NODEID") else 0
    return SlurmStep(job_id, hosts, source, node_id, tasks)
