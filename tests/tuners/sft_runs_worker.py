"""Several `megaswift sft` runs in ONE torchrun launch (tests/torchrun.py run_commands_in_one_launch).

Usage (under torchrun): sft_runs_worker.py RUNS.json, a list of flag lists."""
import sys

from tests.torchrun import run_commands_in_one_launch

if __name__ == "__main__":
    sys.exit(run_commands_in_one_launch("sft", sys.argv[1]))
