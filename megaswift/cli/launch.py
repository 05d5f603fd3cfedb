"""`megaswift launch [flags] -- COMMAND`: start COMMAND under torchrun on this node (single/multi-node, Slurm).

Every flag may be left out: it then comes from NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT,
or from the Slurm step the launcher runs in. See docs/clusters.md.
"""
import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # `program`, not `command`: the top-level parser keeps the subcommand name in args.command
    add = parser.add_argument
    add("--nnodes", type=int, help="number of nodes (default: NNODES, the Slurm step's nodes, or 1)")
    add("--nproc-per-node", type=int, help="processes per node (default: NPROC_PER_NODE, the node's GPUs, or 1)")
    add("--node-rank", type=int, help="this node's index (default: NODE_RANK, SLURM_NODEID, or 0)")
    add("--master-addr", help="head node's address (default: MASTER_ADDR, the first Slurm host, or loopback)")
    add("--master-port", type=int, help="rendezvous port (default: MASTER_PORT, derived from the Slurm job id, "
                                        "a free port on one node, or 29500)")
    add("--rdzv-id", help="rendezvous id, the same on every node (default: the Slurm job id or 'megaswift')")
    add("--rdzv-timeout", type=int, default=600, help="seconds to wait for every node to join (default 600)")
    add("--connect-timeout", type=float, default=120,
        help="seconds a non-head node waits for the head's port to open (default 120)")
    add("--shutdown-timeout", type=int, default=30,
        help="seconds processes get to exit after SIGINT or a failed peer before they are killed (default 30); "
             "SIGTERM is passed to them instead, to save and stop")
    add("--allow-loopback-rdzv", action="store_true",
        help="allow a multi-node rendezvous on a loopback address: only when every node is this machine")
    add("--dry-run", action="store_true",
        help="check the command (a megaswift pt/sft command: its settings and layout for this world size), print "
             "the plan and the torchrun command; start nothing")
    add("program", nargs=argparse.REMAINDER, metavar="-- COMMAND",
        help="after `--`: `megaswift pt --config run.yaml`, `script.py ARGS` or `-m module ARGS`")


def run(args: argparse.Namespace) -> int:
    from launchers import LaunchError, LaunchFlags, execute, plan_launch
    from megaswift.cli.preflight import PreflightError, check_launched_command

    flags = LaunchFlags(command=args.program, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                        node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
                        rdzv_id=args.rdzv_id, rdzv_timeout=args.rdzv_timeout, connect_timeout=args.connect_timeout,
                        shutdown_timeout=args.shutdown_timeout, allow_loopback=args.allow_loopback_rdzv)
    try:
        plan = plan_launch(os.environ, flags)
        # the settings and layout the processes would find wrong, found once, before any of them starts
        checked = check_launched_command(plan.program, plan.world_size)
        if args.dry_run:
            print(plan.describe())
            if checked:
                print(f"  {checked}")
            print(" ".join(plan.torchrun_argv()))
            return 0
        execute(plan, checked)  # does not return: the process becomes torchrun
    except LaunchError as e:
        print(f"megaswift launch: error: {e}", file=sys.stderr)
        return 2
    except PreflightError as e:
        sys.stderr.write(f"{e} (megaswift launch checked this before starting any process)\n")
        return 2
    return 0
