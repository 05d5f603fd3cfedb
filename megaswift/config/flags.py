"""One source of truth for settings: nested dataclasses, seen as YAML files and as `--section.field` flags.

Precedence: dataclass defaults < YAML file (`--config`) < flags. Unknown keys are errors naming the file and key.
"""
import argparse
import dataclasses
import json
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
        return {"type": item, "nargs": "+"}
    if origin is dict or tp is dict:
        return {"type": json.loads, "metavar": "JSON"}
    if tp in (int, float, str):
        return {"type": tp}
    return {"type": str}


def _sections(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Adds `--config FILE` and one `--section.field` flag per leaf field of the nested dataclass `cls`."""
    parser.add_argument("--config", type=Path, help="YAML file with the same keys as the flags")
    for section, section_cls in _sections(cls).items():
        group = parser.add_argument_group(section, (section_cls.__doc__ or "").strip().splitlines()[0])
        for name, tp in _sections(section_cls).items():
            field = next(f for f in dataclasses.fields(section_cls) if f.name == name)
            help_text = field.metadata.get("help", "")
            group.add_argument(f"--{section}.{name}", dest=f"{section}.{name}", default=argparse.SUPPRESS,
                               help=help_text, **_argparse_kwargs(tp))


def _build(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    kwargs = {}
    for name, tp in _sections(cls).items():
        if name not in values:
            continue
        inner = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            if not isinstance(values[name], dict):
                raise ConfigError(f"{where}.{name}: expected a mapping, found {values[name]!r}")
            kwargs[name] = _build(inner, values[name], f"{where}.{name}")
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
