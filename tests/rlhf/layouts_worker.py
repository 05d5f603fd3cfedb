"""Several `megaswift rlhf` runs in ONE torchrun launch (2-process layouts cost a launch each otherwise).

Usage (under torchrun): layouts_worker.py RUNS.json, a list of flag lists. Each run is the real command
(`megaswift.cli.rlhf.run`); between runs only megatron-core's model-parallel groups are torn down, the
process group torchrun set up stays (the trainer would destroy it, and a second rendezvous on the same
port is not what is being tested)."""
import json
import sys

from megatron.core import parallel_state


def main(path: str) -> int:
    import megaswift.train.trainer as trainer
    from megaswift.cli import rlhf
    from megaswift.cli.main import parse_command_line
    trainer.shutdown_distributed = parallel_state.destroy_model_parallel
    for flags in json.loads(open(path).read()):
        status = rlhf.run(parse_command_line(["rlhf", *flags]))
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
