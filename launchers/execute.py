"""Runs a planned launch: the network checks, a banner naming every setting's source, then exec torchrun."""
import os
import sys
from collections.abc import Mapping

from launchers.network import check_rendezvous_address, wait_for_head
from launchers.plan import LaunchPlan


def execute(plan: LaunchPlan, checked: str | None = None, env: Mapping[str, str] | None = None) -> None:
    """Replaces this process with torchrun, so Slurm's and the user's signals reach the agent directly.
    `checked`: what was checked of the command before (named in the banner)."""
    env = dict(os.environ if env is None else env)
    check_rendezvous_address(plan, env)
    wait_for_head(plan)
    print(plan.describe() + (f"\n  {checked}" if checked else ""), file=sys.stderr, flush=True)
    argv = plan.torchrun_argv()
    os.execve(argv[0], argv, env)
