"""Slurm host lists (`node[01-04,07]`, `a[1-2],b3`, `rack[1-2]-n[1-2]`) expanded into host names.

`expand_nodelist` is our own parser (zero padding kept, several bracket groups multiply); `slurm_hostnames`
prefers `scontrol show hostnames`, which knows every site extension, and falls back to the parser.
"""
import itertools
import shutil
import subprocess

from launchers.errors import LaunchError


def _split_top_level(text: str, where: str) -> list[str]:
    """Splits at commas outside brackets: `a[1,2],b` -> [`a[1,2]`, `b`]."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"{where}: nested '[' in host list {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"{where}: ']' without '[' in host list {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise LaunchError(f"{where}: '[' without ']' in host list {text!r}")
    parts.append("".join(current))
    return parts


def _expand_range(item: str, text: str, where: str) -> list[str]:
    """`07` -> [`07`]; `01-04` -> [`01`, ..., `04`]: the lower bound's width is kept as zero padding."""
    low, _, high = item.partition("-")
    if not low.isdigit() or (high and not high.isdigit()):
        raise LaunchError(f"{where}: expected numbers or ranges like 01-04 inside brackets, found {item!r} "
                          f"in {text!r}")
    if not high:
        return [low]
    if int(high) < int(low):
        raise LaunchError(f"{where}: range {item!r} in {text!r} runs backwards")
    return [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]


def _expand_one(pattern: str, text: str, where: str) -> list[str]:
    """One comma-free host pattern, possibly with several bracket groups: their product, in order."""
    pieces: list[list[str]] = []
    rest = pattern
    while "[" in rest:
        prefix, _, rest = rest.partition("[")
        inside, _, rest = rest.partition("]")
        if not inside:
            raise LaunchError(f"{where}: empty brackets in host list {text!r}")
        pieces.append([prefix])
        pieces.append([h for item in inside.split(",") for h in _expand_range(item, text, where)])
    pieces.append([rest])
    return ["".join(combo) for combo in itertools.product(*pieces)]


def expand_nodelist(text: str, where: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expands a Slurm host list into host names, keeping order; `where` names its source in errors."""
    text = text.strip()
    if not text:
        raise LaunchError(f"{where} is empty; expected a Slurm host list such as node[01-04,07]")
    hosts = []
    for pattern in _split_top_level(text, where):
        if not pattern:
            raise LaunchError(f"{where}: empty entry in host list {text!r}")
        hosts.extend(_expand_one(pattern, text, where))
    return hosts


def slurm_hostnames(text: str, where: str = "SLURM_JOB_NODELIST", timeout: float = 10) -> list[str]:
    """`scontrol show hostnames` where Slurm's tools are installed (exact for every site), our parser otherwise."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            done = subprocess.run([scontrol, "show", "hostnames", text], capture_output=True, text=True,
                                  timeout=timeout)
            if done.returncode == 0 and done.stdout.split():
                return done.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass  # a broken scontrol must not block the launch; the parser knows the standard syntax
    return expand_nodelist(text, where)
