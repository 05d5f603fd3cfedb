"""What each process runs: the command after `--` turned into torchrun's program arguments."""
import os

from launchers.errors import LaunchError

_PYTHONS = ("python", "python3")


def torchrun_program(command: list[str]) -> list[str]:
    """`megaswift pt ...` -> `-m megaswift pt ...`; `[python] x.py ...` -> `x.py ...`; `[python] -m m` -> `-m m`.

    torchrun starts every process with its own Python, so a leading `python` is dropped and megaswift
    subcommands run as `-m megaswift`, which needs no console script on the PATH of every node.
    """
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if args and os.path.basename(args[0]) in _PYTHONS + ("python3.12",):
        args = args[1:]
    if not args:
        raise LaunchError("no command to launch: put it after `--`, e.g. "
                          "`megaswift launch --nproc-per-node 2 -- megaswift pt --config run.yaml`")
    head = os.path.basename(args[0])
    if head == "megaswift":
        if len(args) < 2 or args[1] in ("launch", "-h", "--help"):
            raise LaunchError(f"expected a megaswift subcommand to launch (pt, sft, ...) after `megaswift`, "
                              f"found {args[1:2] or 'nothing'}")
        return ["-m", "megaswift", *args[1:]]
    if args[0] == "-m":
        if len(args) < 2:
            raise LaunchError("`-m` needs a module name, e.g. `-- -m megaswift pt --config run.yaml`")
        return args
    if args[0].endswith(".py"):
        if not os.path.isfile(args[0]):
            raise LaunchError(f"script {args[0]!r} not found (relative to {os.getcwd()}); every node must see it")
        return args
    raise LaunchError(f"expected `megaswift SUBCOMMAND ...`, a Python script (.py) or `-m module` after `--`, "
                      f"found {args[0]!r}")
