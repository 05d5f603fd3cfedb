"""One source of truth for settings: nested dataclasses, seen as YAML files and as `--section.field` flags.

Precedence: dataclass defaults < YAML file (`--config`) < flags. Unknown keys are errors naming the file and key.
"""
import argparse
import copy
import dataclasses
import difflib
import functools
import json
import re
import sys
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A setting is invalid: the message names the setting, what was found and what is allowed."""


def parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, found {text!r}")


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _argparse_kwargs(tp) -> dict:
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        return {"type": parse_bool, "nargs": "?", "const": True, "metavar": "BOOL"}
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (str,)
        return {"type": item, "nargs": "+", "metavar": _METAVARS.get(item, "VALUE")}
    if origin is dict or tp is dict:
        return {"type": json.loads, "metavar": "JSON"}
    if tp in (int, float, str):
        return {"type": tp, "metavar": _METAVARS[tp]}
    return {"type": str, "metavar": "VALUE"}


_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}


def _sections(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe_default(value) -> str:
    """A default as a user would write it in YAML or on the command line."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)) and not value:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _help_with_default(help_text: str, default) -> str:
    """Appends `(default: X)` unless the help already says what the default is. The defaults stay out of
    argparse itself (SUPPRESS), so that only flags actually given override the YAML file."""
    if re.search(r"\bdefault\b", help_text, re.IGNORECASE):
        return help_text
    return f"{help_text} (default: {describe_default(default)})".replace("%", "%%")  # argparse %-formats help


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Adds `--config FILE` and one `--section.field` flag per leaf field of the nested dataclass `cls`,
    each with its help and default."""
    parser.usage = "%(prog)s [--config FILE] [--SECTION.FIELD VALUE ...]  (--help lists every flag and its default)"
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file with the same keys as the flags")
    defaults = cls()
    for section, section_cls in _sections(cls).items():
        metadata = next(f for f in dataclasses.fields(cls) if f.name == section).metadata
        if metadata.get("megatron_passthrough"):
            group = parser.add_argument_group(section, f"{metadata['help']}; values are parsed by the field's "
                                                       f"type, and a field megaswift sets from one of its own "
                                                       f"flags is refused, naming it")
            if isinstance(parser, OnDemandArgumentParser):
                parser.on_demand(f"--{section}.", functools.partial(_add_megatron_arguments, group, section))
            else:
                _add_megatron_arguments(group, section)
            continue
        group = parser.add_argument_group(section, (section_cls.__doc__ or "").strip().splitlines()[0])
        for name, tp in _sections(section_cls).items():
            field = next(f for f in dataclasses.fields(section_cls) if f.name == name)
            help_text = _help_with_default(field.metadata.get("help", ""), getattr(getattr(defaults, section), name))
            group.add_argument(f"--{section}.{name}", dest=f"{section}.{name}", default=argparse.SUPPRESS,
                               help=help_text, **_argparse_kwargs(tp))


def _add_megatron_arguments(group, section: str) -> None:
    """One `--SECTION.FIELD` flag per megatron-core config field (config/megatron_fields.py), kept out of
    --help (there are hundreds) but known to the parser, so a typo gets the closest names. Values stay text
    here; the run's checks parse them by the field's type and name the field in any error. Listing the
    fields imports megatron-core (seconds)."""
    from megaswift.config.megatron_fields import megatron_fields, settable, takes_several_values
    for name, field in megatron_fields().items():
        if not settable(field.annotation):
            continue
        nargs = {"nargs": "+"} if takes_several_values(field.annotation) else \
            {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        group.add_argument(f"--{section}.{name}", dest=f"{section}.{name}", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS, metavar="VALUE", **nargs)


class OnDemandArgumentParser(argparse.ArgumentParser):
    """A parser with arguments registered only when the command line may need them: the `--megatron.*`
    flags cost a megatron-core import (seconds), which `--help` and every run without such a flag skip.
    They are registered when an argument starts with their prefix, and when an argument is unknown, so that
    the parse and the closest names of the error (cli/main.py) are those of the parser with every flag.
    The `megaswift` entry point makes pt/sft/rlhf's parsers of this class; any other parser gets those
    flags up front."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_demand: dict[str, typing.Callable[[], None]] = {}  # flag prefix -> registers its flags

    def on_demand(self, prefix: str, register: typing.Callable[[], None]) -> None:
        """Has `register()` called before parsing a command line with an argument starting with `prefix`."""
        self._on_demand[prefix] = register

    def register_all(self) -> None:
        """Registers every argument still waiting: the parser then knows every flag (for closest names)."""
        self._register(list(self._on_demand))

    def _register(self, prefixes: list[str]) -> None:
        for prefix in prefixes:
            self._on_demand.pop(prefix)()

    def parse_known_args(self, args=None, namespace=None):
        tokens = sys.argv[1:] if args is None else list(args)
        self._register([p for p in self._on_demand if any(str(t).startswith(p) for t in tokens)])
        first = namespace if namespace is None else copy.copy(namespace)  # a retry starts from the caller's
        parsed, unknown = super().parse_known_args(tokens, first)
        if unknown and self._on_demand:
            self.register_all()
            return super().parse_known_args(tokens, namespace)
        if namespace is not None:
            vars(namespace).update(vars(parsed))
            parsed = namespace
        return parsed, unknown


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", text.lower()) if w}


def closest_names(typed: str, known: list[str], limit: int = 3) -> list[str]:
    """Known names a typo most likely meant, best first, or [] when nothing is close. A name is close when
    its last part shares a word with the typed one (`iters`) or it is spelled alike (difflib); among those,
    the most words in common overall win (`--train.iters` -> `--train.train_iters`, whose words are all
    typed, before `--train.eval_iters`), then spelling; names that only tie on words but are spelled
    clearly worse than the best are left out."""
    typed_words = _words(typed)
    typed_last = _words(typed.lstrip("-").split(".")[-1])

    def score(name: str) -> tuple[float, float]:
        words = _words(name)
        return len(typed_words & words) / len(typed_words | words), \
            difflib.SequenceMatcher(None, typed.lower(), name.lower()).ratio()

    close = [(score(name), name) for name in known
             if typed_last & _words(name.lstrip("-").split(".")[-1]) or score(name)[1] >= 0.75]
    close.sort(reverse=True)
    if not close:
        return []
    best = close[0][0]
    return [name for s, name in close if s[0] == best[0] and s[1] >= best[1] - 0.05][:limit]


def _build(cls, values: dict, where: str, section: str | None = None):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        # compared with the section's name in front: `train: {iters: 5}` means train_iters, not eval_iters
        prefix = f"{section}." if section else ""
        hints = "".join(f"; {key}: did you mean {' or '.join(c[len(prefix):] for c in close)}?"
                        for key in sorted(unknown)
                        if (close := closest_names(prefix + key, [prefix + k for k in sorted(known)])))
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}{hints}; allowed: {sorted(known)}")
    kwargs = {}
    for name, tp in _sections(cls).items():
        if name not in values:
            continue
        inner = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            if not isinstance(values[name], dict):
                raise ConfigError(f"{where}.{name}: expected a mapping, found {values[name]!r}")
            kwargs[name] = _build(inner, values[name], f"{where}.{name}", name)
        else:
            kwargs[name] = values[name]
    return cls(**kwargs)


def config_from_dict(cls, values: dict, where: str = "config"):
    return _build(cls, values or {}, where)


def config_to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def load_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, found {type(values).__name__}")
    return values


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """Builds `cls` from defaults, then `base` (e.g. a checkpoint's recorded config), the YAML file, the flags."""
    values = dict(base or {})
    where = "flags"
    if getattr(args, "config", None):
        values = merge(values, load_yaml(args.config))
        where = str(args.config)
    flags: dict = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            flags.setdefault(section, {})[name] = value
    return config_from_dict(cls, merge(values, flags), where)
