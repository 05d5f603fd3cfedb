"""Several `megaswift rlhf` runs, one per layout, in ONE torchrun launch (tests/torchrun.py
run_commands_in_one_launch).

Usage (under torchrun): layouts_worker.py RUNS.json, a list of flag lists."""
import sys

from tests.torchrun import run_commands_in_one_launch

if __name__ == "__main__":
    sys.exit(run_commands_in_one_launch("rlhf", sys.argv[1]))
