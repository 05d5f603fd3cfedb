"""Flags + environment -> one node's torchrun invocation, decided before anything starts.

Precedence for each setting: the flag, then the user-style variable (NNODES, NODE_RANK, NPROC_PER_NODE,
MASTER_ADDR, MASTER_PORT), then what Slurm says. Two sources that disagree on the shape of the job are an
error, not a silent choice, since a wrong world size shows up later only as a rendezvous that never completes.
"""
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from launchers.command import torchrun_program
from launchers.devices import cuda_device_count, processes_per_node
from launchers.errors import LaunchError
from launchers.nodelist import slurm_hostnames
from launchers.slurm_env import SlurmStep, slurm_step_from_env

DEFAULT_MULTI_NODE_PORT = 29500
# Environment that users tune for the transport; passed through untouched and named in the banner.
TUNING_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "UCX_", "FI_")


@dataclass
class LaunchFlags:
    """What `megaswift launch` accepts on its command line; None means: from the environment."""
    command: list[str]
    nnodes: int | None = None
    nproc_per_node: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_id: str | None = None
    rdzv_timeout: int = 600       # seconds the rendezvous waits for every node to join
    connect_timeout: float = 120  # seconds a non-head node waits for the head's rendezvous port to open
    shutdown_timeout: int = 30    # seconds workers get after SIGINT or a failed peer before being killed
    allow_loopback: bool = False  # every node runs on this machine (tests, one-machine debugging)


@dataclass(frozen=True)
class LaunchPlan:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int              # 0: single node, the rendezvous store picks a free port
    rdzv_id: str
    rdzv_timeout: int
    connect_timeout: float
    shutdown_timeout: int
    allow_loopback: bool
    program: tuple[str, ...]      # what torchrun runs in every process: `-m megaswift pt ...` or `x.py ...`
    sources: dict = field(default_factory=dict)      # setting -> where its value came from
    passthrough: dict = field(default_factory=dict)  # NCCL_*/GLOO_* variables found, passed on unchanged

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def is_head(self) -> bool:
        return self.node_rank == 0

    @property
    def rdzv_endpoint(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"{host}:{self.master_port}"

    def torchrun_argv(self, python: str = sys.executable) -> list[str]:
        # is_host is explicit: torchrun's own guess compares host names and fails where the head node's
        # name and its rendezvous address differ (a second interface, an alias in /etc/hosts).
        conf = f"join_timeout={self.rdzv_timeout},is_host={'true' if self.is_head else 'false'}"
        # launchers.agent is torchrun with SIGTERM passed to the workers (they save and exit 0)
        return [python, "-m", "launchers.agent", f"--nnodes={self.nnodes}",
                f"--nproc-per-node={self.nproc_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}", f"--rdzv-id={self.rdzv_id}", f"--rdzv-conf={conf}",
                "--max-restarts=0", f"--shutdown-timeout={self.shutdown_timeout}", *self.program]

    def describe(self) -> str:
        lines = [f"megaswift launch: node {self.node_rank} of {self.nnodes}, {self.nproc_per_node} process(es) "
                 f"per node, world size {self.world_size}",
                 f"  rendezvous c10d {self.rdzv_endpoint} id {self.rdzv_id} "
                 f"({'hosts the store' if self.is_head else 'joins the head node'})"]
        lines += [f"  {name}: {source}" for name, source in self.sources.items()]
        if self.passthrough:
            lines.append("  passed through: " + " ".join(f"{k}={v}" for k, v in sorted(self.passthrough.items())))
        return "\n".join(lines)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise LaunchError(f"{name}: expected a non-negative whole number, found {text!r}")
    return int(text)


def _agree(setting: str, candidates: list[tuple[str, int | None]], default: int, hint: str) -> tuple[int, str]:
    """The one value every given source states for `setting`, or an error listing them all."""
    given = [(source, value) for source, value in candidates if value is not None]
    if len({value for _, value in given}) > 1:
        found = ", ".join(f"{source}={value}" for source, value in given)
        raise LaunchError(f"inconsistent {setting}: {found}. {hint}")
    return (given[0][1], given[0][0]) if given else (default, "default")


def _rendezvous_address(env: Mapping[str, str], flags: LaunchFlags, nnodes: int,
                        slurm: SlurmStep | None) -> tuple[str, str, int, str]:
    """(address, its source, port, its source): explicit settings, else loopback on one node, else Slurm's head."""
    master_addr = flags.master_addr or env.get("MASTER_ADDR", "").strip() or None
    addr_source = "--master-addr" if flags.master_addr else "MASTER_ADDR"
    if master_addr is None and nnodes == 1:
        master_addr, addr_source = "127.0.0.1", "single node: loopback"
    elif master_addr is None and slurm is not None:
        master_addr, addr_source = slurm.hosts[0], f"head node, first host of {slurm.hosts_source}"
    elif master_addr is None:
        raise LaunchError(f"a {nnodes}-node launch needs the head node's address: pass --master-addr HOST or set "
                          f"MASTER_ADDR on every node (the same value everywhere: node 0's cluster-network name)")

    master_port = flags.master_port if flags.master_port is not None else _env_int(env, "MASTER_PORT")
    port_source = "--master-port" if flags.master_port is not None else "MASTER_PORT"
    if master_port is None and nnodes == 1:
        master_port, port_source = 0, "single node: a free port"
    elif master_port is None and slurm is not None:
        master_port, port_source = slurm.derived_port, f"derived from SLURM_JOB_ID={slurm.job_id}"
    elif master_port is None:
        master_port, port_source = DEFAULT_MULTI_NODE_PORT, "default"
    if not 0 <= master_port <= 65535 or (master_port == 0 and nnodes > 1):
        raise LaunchError(f"{port_source}: expected a TCP port from 1 to 65535 that every node can reach, "
                          f"found {master_port}")

    return master_addr, addr_source, master_port, port_source


def plan_launch(env: Mapping[str, str], flags: LaunchFlags, *,
                gpu_count: Callable[[], int] = cuda_device_count,
                hostnames: Callable[[str, str], list[str]] = slurm_hostnames) -> LaunchPlan:
    """Decides this node's launch from `flags` and `env`; raises LaunchError for a job that cannot work."""
    program = tuple(torchrun_program(flags.command))
    slurm = slurm_step_from_env(env, hostnames)
    nnodes, nnodes_source = _agree(
        "number of nodes",
        [("--nnodes", flags.nnodes), ("NNODES", _env_int(env, "NNODES")),
         (slurm and slurm.hosts_source, slurm and len(slurm.hosts))],
        1, "Make them agree: under Slurm ask for the nodes with `sbatch --nodes=N` and drop the others.")
    if nnodes < 1:
        raise LaunchError(f"{nnodes_source}: expected at least 1 node, found {nnodes}")
    node_rank, rank_source = _agree(
        "node rank",
        [("--node-rank", flags.node_rank), ("NODE_RANK", _env_int(env, "NODE_RANK")),
         ("SLURM_NODEID", slurm and slurm.node_id)],
        0, "Under Slurm the node rank comes from SLURM_NODEID: unset NODE_RANK and drop --node-rank.")
    if node_rank >= nnodes:
        raise LaunchError(f"node rank {node_rank} ({rank_source}) is out of range for {nnodes} node(s) "
                          f"({nnodes_source}): node ranks run from 0 to {nnodes - 1}")
    nproc, nproc_source = processes_per_node(env, flags.nproc_per_node, gpu_count)
    world = _env_int(env, "WORLD_SIZE")
    if world is not None and world != nnodes * nproc:
        raise LaunchError(f"inconsistent world size: WORLD_SIZE={world} in the environment, but {nnodes} node(s) "
                          f"x {nproc} process(es) = {nnodes * nproc}. Unset WORLD_SIZE (torchrun sets it for "
                          f"each process) or launch a matching shape; do not run the launcher inside torchrun.")

    master_addr, addr_source, master_port, port_source = _rendezvous_address(env, flags, nnodes, slurm)
    rdzv_id = flags.rdzv_id or (slurm.job_id if slurm else "megaswift")
    passthrough = {k: v for k, v in env.items() if k.startswith(TUNING_PREFIXES)}
    sources = {"nodes": nnodes_source, "node rank": rank_source, "processes per node": nproc_source,
               "address": addr_source, "port": port_source}
    return LaunchPlan(nnodes, node_rank, nproc, master_addr, master_port, rdzv_id, flags.rdzv_timeout,
                      flags.connect_timeout, flags.shutdown_timeout, flags.allow_loopback, program, sources,
                      passthrough)
