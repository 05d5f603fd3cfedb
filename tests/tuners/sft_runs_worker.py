"""Several `megaswift sft` runs in ONE torchrun launch (a 2-process launch costs seconds of start-up each).

Usage (under torchrun): sft_runs_worker.py RUNS.json, a list of flag lists. Each run is the real command
(`megaswift.cli.sft.run`); between runs only megatron-core's model-parallel groups are torn down: the process
group torchrun set up stays (the trainer would destroy it, and a second rendezvous is not what is tested)."""
import json
import sys

from megatron.core import parallel_state


def main(path: str) -> int:
    import megaswift.train.trainer as trainer
    from megaswift.cli import sft
    from megaswift.cli.main import parse_command_line
    trainer.shutdown_distributed = parallel_state.destroy_model_parallel
    for flags in json.loads(open(path).read()):
        status = sft.run(parse_command_line(["sft", *flags]))
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
