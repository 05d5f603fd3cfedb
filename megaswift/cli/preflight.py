"""`megaswift launch`'s check of the command it is about to start. A megaswift training command is parsed and
checked here, once, for the launch's world size, by the code its processes will run (each subcommand's
`prepare`), so a bad layout or setting is one error line before any process starts, not one per rank after
they all started.
"""
import importlib

CHECKED = {"pt": "megaswift.cli.pt", "sft": "megaswift.cli.sft", "rlhf": "megaswift.cli.rlhf"}


class PreflightError(Exception):
    """The launched command would fail; the message is the line its rank 0 would print."""


def megaswift_subcommand(program: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """("pt", its arguments) for `-m megaswift pt ...` (what the launcher runs); None for anything else."""
    if len(program) >= 3 and tuple(program[:2]) == ("-m", "megaswift") and program[2] in CHECKED:
        return program[2], list(program[3:])
    return None


def check_launched_command(program: tuple[str, ...], world_size: int) -> str | None:
    """Checks a `megaswift pt|sft` command for `world_size` processes; returns what was checked, or None for
    a command it cannot check (a script, another module). Raises PreflightError; a bad command line exits
    as the command itself would (argparse's SystemExit, its message already printed)."""
    found = megaswift_subcommand(program)
    if found is None:
        return None
    from megaswift.checkpointing.layout import CheckpointError
    from megaswift.cli.main import parse_command_line
    from megaswift.config import ConfigError

    command, argv = found
    args = parse_command_line([command, *argv])
    try:
        _, trainer = importlib.import_module(CHECKED[command]).prepare(args, world_size=world_size)
    except (ConfigError, CheckpointError, ValueError) as e:  # ValueError: SFT data and template errors
        raise PreflightError(f"megaswift {command}: error: {e}") from None
    return f"checked `megaswift {command}` for world size {world_size} (data-parallel size {trainer.dp_size})"
