"""The `megaswift` command: a table of subcommands, each imported only when it runs so `--help` stays fast.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
"""
import argparse
import importlib
import sys

SUBCOMMANDS = {
    "pt": ("megaswift.cli.pt", "pre-train on Megatron indexed datasets"),
    "sft": ("megaswift.cli.sft", "fine-tune on chat / agent data"),
    "preprocess": ("megaswift.cli.preprocess", "tokenize jsonl/text/parquet into Megatron indexed datasets"),
    "convert": ("megaswift.cli.convert", "convert checkpoints: hf2mcore / mcore2hf"),
    "launch": ("megaswift.cli.launch", "launch a megaswift command with torchrun (single/multi-node, Slurm)"),
    "doctor": ("megaswift.cli.doctor", "report the environment, the built kernels and which path each op uses"),
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaswift", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == argv_command:  # only the chosen subcommand pays for its imports
            importlib.import_module(module_name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    from megaswift.cli.quiet import silence_known_noise
    silence_known_noise()
    if args.command is None:
        parser.print_help()
        return 2
    return importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
