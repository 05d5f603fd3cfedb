"""Trains the same run once per setting, all in one torchrun launch, and writes each run's losses.

`python perf_settings_worker.py OUT_JSON PORTS COMMON_FLAGS... -- VARIANT_FLAGS... [-- VARIANT_FLAGS...]`: each
variant is `megaswift pt` (the CLI's own prepare + Trainer.run) with the common flags plus its own; rank 0
writes a list with one {step: loss} per variant. Same seed and layout, so every variant starts from the same
weights and only its setting differs.

Each Trainer.run makes and destroys its own process group. A second group made through torchrun's agent store
finds the first one's keys there and hangs, so every later run meets on a store of its own, which rank 0
serves on the next of PORTS (comma-separated free ports the test picked, one per later run).
"""
import json
import os
import sys


def train(flags: list[str]) -> dict:
    from megaswift.cli.main import parse_command_line
    from megaswift.cli.pt import prepare
    _, trainer = prepare(parse_command_line(["pt", *flags]))
    trainer.prepare_data()
    return trainer.run().losses


def main() -> None:
    out, ports, *rest = sys.argv[1:]
    cuts = [i for i, arg in enumerate(rest) if arg == "--"] + [len(rest)]
    common, variants = rest[:cuts[0]], [rest[a + 1:b] for a, b in zip(cuts, cuts[1:])]
    results = []
    for index, variant in enumerate(variants):
        if index:
            os.environ.update(TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT=ports.split(",")[index - 1])
        results.append(train(common + variant))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":  # dist_checkpointing's spawned writer re-imports __main__
    main()
