"""Flags + environment (explicit, user-style variables or Slurm) -> a torchrun launch that works or says why not."""
from launchers.errors import LaunchError
from launchers.execute import execute
from launchers.nodelist import expand_nodelist, slurm_hostnames
from launchers.plan import LaunchFlags, LaunchPlan, plan_launch

__all__ = ["LaunchError", "LaunchFlags", "LaunchPlan", "execute", "expand_nodelist", "plan_launch",
           "slurm_hostnames"]
