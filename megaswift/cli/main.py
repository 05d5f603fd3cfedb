"""The `megaswift` command: a table of subcommands, each imported only when it runs so `--help` stays fast.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
"""
import argparse
import importlib
import sys

SUBCOMMANDS = {
    "pt": ("megaswift.cli.pt", "pre-train on Megatron indexed datasets"),
    "sft": ("megaswift.cli.sft", "fine-tune on chat / agent data"),
    "rlhf": ("megaswift.cli.rlhf", "preference training (DPO, SimPO, ORPO) on chosen / rejected pairs"),
    "preprocess": ("megaswift.cli.preprocess", "tokenize jsonl/text/parquet into Megatron indexed datasets"),
    "convert": ("megaswift.cli.convert", "convert checkpoints: hf2mcore / mcore2hf"),
    "launch": ("megaswift.cli.launch", "launch a megaswift command with torchrun (single/multi-node, Slurm)"),
    "doctor": ("megaswift.cli.doctor", "report the environment, the built kernels and which path each op uses"),
    "infer": ("megaswift.cli.infer", "generate answers for a dataset, or chat, with an exported model (+ adapters)"),
    "deploy": ("megaswift.cli.deploy", "serve a model and its LoRA adapters with an OpenAI-compatible API"),
    "eval": ("megaswift.cli.eval", "score a model or a server on multiple-choice (CSV), QA (jsonl) and lm-eval tasks"),
    "export": ("megaswift.cli.export", "quantize an exported model (bitsandbytes NF4 / int8), size and perplexity"),
}
CONFIG_COMMANDS = ("pt", "sft", "rlhf")  # settings as --SECTION.FIELD flags (config/flags.py)


def build_parser(argv_command: str | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The top-level parser and its subcommand parsers by name."""
    parser = argparse.ArgumentParser(prog="megaswift", description=__doc__.splitlines()[0])
    parser_class = argparse.ArgumentParser
    if argv_command in CONFIG_COMMANDS:  # their --megatron.* flags are registered only if the command line has one
        from megaswift.config.flags import OnDemandArgumentParser as parser_class
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)
    parsers = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        parsers[name] = sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == argv_command:  # only the chosen subcommand pays for its imports
            importlib.import_module(module_name).add_arguments(sp)
    return parser, parsers


def _known_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


def describe_unknown(unknown: list[str], known_flags: list[str]) -> str:
    """`unknown flag --train.iters (did you mean --train.train_iters?)`; a value right after an unknown flag
    is taken as that flag's value and not listed."""
    from megaswift.config.flags import closest_names

    items, after_flag = [], False
    for arg in unknown:
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            close = closest_names(name, known_flags)
            items.append(f"{name} (did you mean {' or '.join(close)}?)" if close else name)
            after_flag = "=" not in arg
        elif not after_flag:
            items.append(repr(arg))
    flags = sum(a.startswith("-") for a in unknown)
    return f"unknown {'flag' if flags == len(items) else 'argument'}{'s' if len(items) > 1 else ''} " + ", ".join(items)


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """Parses `megaswift COMMAND ...`; an unknown flag is reported by COMMAND (not by the top-level parser,
    whose usage says nothing about it), with the closest known flags. Exits 2 on bad usage, as argparse does."""
    command = next((a for a in argv if not a.startswith("-")), None)
    parser, parsers = build_parser(command if command in SUBCOMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        owner = parsers.get(args.command, parser)
        from megaswift.config.flags import OnDemandArgumentParser
        if isinstance(owner, OnDemandArgumentParser):  # an unknown flag before the command: the closest
            owner.register_all()                       # names are still among all of the command's flags
        defaults = " and its default" if args.command in CONFIG_COMMANDS else ""
        sys.stderr.write(f"{owner.prog}: error: {describe_unknown(unknown, _known_flags(owner))}\n"
                         f"(`{owner.prog} --help` lists every flag{defaults})\n")
        sys.exit(2)
    return args


def main(argv: list[str] | None = None) -> int:
    """`argv` None: the process's own command line (the `megaswift` program); a list: an in-process call."""
    owns_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    from megaswift.cli.quiet import silence_known_noise
    silence_known_noise()  # before parsing: a --megatron.* flag makes parsing import megatron-core, which warns
    args = parse_command_line(argv)
    args.owns_process = owns_process  # process-wide start-up settings only then (cli/startup.py)
    if args.command is None:
        build_parser()[0].print_help()
        return 2
    return importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
