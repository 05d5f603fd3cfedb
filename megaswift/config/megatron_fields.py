"""The `megatron` pass-through: any megatron-core `TransformerConfig` / `DistributedDataParallelConfig` field
megaswift does not set itself, as `--megatron.FIELD VALUE` or a `megatron:` mapping in YAML.

A value is parsed by the field's own annotation (bool, int, float, str, Literal choices, lists, unions, torch
dtypes, enums), so a typo or a wrong type is a ConfigError before any process starts, never a bare assert
inside megatron-core after they all have. The run's config keeps the value in a JSON form (dtypes and enums by
name) so checkpoints record it; `megatron_value` turns it into the object megatron-core expects.

megatron-core is imported only when these functions run (a few seconds), never by `import megaswift.config`.
"""
import argparse
import dataclasses
import difflib
import enum
import functools
import types
import typing

from megaswift.config.flags import ConfigError, parse_bool

TRANSFORMER, DDP = "TransformerConfig", "DistributedDataParallelConfig"


@dataclasses.dataclass(frozen=True)
class MegatronField:
    name: str
    annotation: object
    owners: tuple[str, ...]  # which of megatron-core's configs have it (delay_wgrad_compute: both)


@functools.cache
def megatron_fields() -> dict[str, MegatronField]:
    """Every field of megatron-core's TransformerConfig and DistributedDataParallelConfig, by name."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig
    found: dict[str, MegatronField] = {}
    for owner, cls in ((TRANSFORMER, TransformerConfig), (DDP, DistributedDataParallelConfig)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            known = found.get(f.name)
            found[f.name] = MegatronField(f.name, hints[f.name], (known.owners if known else ()) + (owner,))
    return found


# ------------------------------------------------------------------ value parsing, by annotation

def _is_list(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple) or tp in (list, tuple)


def _union_arms(tp) -> list:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return [tp]


def _is_dtype(tp) -> bool:
    import torch
    return tp is torch.dtype


def settable(tp) -> bool:
    """Whether a value of this annotation can be written on a command line or in YAML."""
    if typing.get_origin(tp) is typing.Literal or tp in (bool, int, float, str, type(None)) or _is_dtype(tp):
        return True
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return True
    if _is_list(tp):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return all(settable(a) for a in args) if args else True
    arms = _union_arms(tp)
    return len(arms) > 1 and all(settable(a) for a in arms)


def takes_several_values(tp) -> bool:
    """A list-valued field takes several values after its flag (`--megatron.recompute_modules a b`)."""
    return any(_is_list(arm) for arm in _union_arms(tp))


def describe_type(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if _is_dtype(tp):
        return "a dtype (fp32, bf16, fp16)"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.name for m in tp)
    if _is_list(tp):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {describe_type(args[0]) if args else 'values'}"
    arms = _union_arms(tp)
    if len(arms) > 1:
        return " or ".join("null" if a is type(None) else describe_type(a) for a in arms)
    return {bool: "true/false", int: "an integer", float: "a number", str: "text"}.get(tp, str(tp))


_DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "float": "float32", "bf16": "bfloat16",
                "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16"}


def _parse(tp, value):
    """The JSON form of `value` (text from a flag, or what YAML gave) for annotation `tp`; ValueError if it
    does not fit."""
    if typing.get_origin(tp) is typing.Literal:
        for choice in typing.get_args(tp):
            if value == choice or str(value) == str(choice):
                return choice
        raise ValueError("not one of the choices")
    if tp is type(None):
        if value is None or str(value).lower() in ("none", "null"):
            return None
        raise ValueError("not null")
    if tp is bool:
        return value if isinstance(value, bool) else parse_bool(value)
    if tp is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("not a number")
        return float(value)
    if tp is str:
        if isinstance(value, (list, dict)):
            raise ValueError("not text")
        return str(value)
    if _is_dtype(tp):
        name = str(value).lower().removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError("not a dtype")
        return _DTYPE_NAMES[name]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        name = str(value).split(".")[-1]
        for member in tp:
            if name.lower() == member.name.lower():
                return member.name
        raise ValueError("not a member")
    if _is_list(tp):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_parse(args[0], item) if args else item for item in items]
    arms = _union_arms(tp)
    if len(arms) > 1:
        # From a flag, one value is a scalar (`moe_layer_freq 1` is not `[1]`); lists come last.
        if isinstance(value, list) and len(value) == 1 and not all(map(_is_list, arms)):
            scalar = _try_arms([a for a in arms if not _is_list(a)], value[0])
            if scalar is not _NO_MATCH:
                return scalar
        found = _try_arms(sorted(arms, key=_is_list), value)
        if found is not _NO_MATCH:
            return found
        raise ValueError("fits none of the types")
    raise ValueError("cannot be set from a flag or YAML")


_NO_MATCH = object()
_PARSE_ERRORS = (ValueError, TypeError, argparse.ArgumentTypeError)  # parse_bool raises the last


def _try_arms(arms, value):
    for arm in arms:
        if isinstance(value, list) and not _is_list(arm):
            continue
        try:
            return _parse(arm, value)
        except _PARSE_ERRORS:
            continue
    return _NO_MATCH


def parse_megatron_value(name: str, value, where: str):
    """The JSON form of `megatron.NAME` = value, checked against the field's annotation."""
    field = megatron_fields()[name]
    if not settable(field.annotation):
        raise ConfigError(f"{where}: megatron.{name} ({' and '.join(field.owners)}) holds "
                          f"{describe_type(field.annotation)}, which cannot be set from a flag or YAML")
    try:
        return _parse(field.annotation, value)
    except _PARSE_ERRORS as e:
        raise ConfigError(f"{where}: megatron.{name}={value!r} is invalid: expected "
                          f"{describe_type(field.annotation)} ({' and '.join(field.owners)}.{name}; {e})") from None


def megatron_value(name: str, parsed):
    """The object megatron-core expects for a value in JSON form (a dtype or enum by name, a tuple)."""
    import torch
    tp = megatron_fields()[name].annotation
    arms = _union_arms(tp)
    if parsed is None:
        return None
    if any(_is_dtype(a) for a in arms):
        return getattr(torch, parsed)
    for arm in arms:
        is_enum = isinstance(arm, type) and issubclass(arm, enum.Enum)
        if is_enum and isinstance(parsed, str) and parsed in arm.__members__:
            return arm[parsed]
    if isinstance(parsed, list) and any(typing.get_origin(a) is tuple or a is tuple for a in arms):
        return tuple(parsed)
    return parsed


def unknown_field_message(name: str, where: str) -> str:
    close = difflib.get_close_matches(name, list(megatron_fields()), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(f'megatron.{c}' for c in close)}?" if close else ""
    return (f"{where}: megatron.{name} is not a field of megatron-core's TransformerConfig or "
            f"DistributedDataParallelConfig{hint}")


def split_by_owner(parsed: dict) -> tuple[dict, dict]:
    """(TransformerConfig fields, DistributedDataParallelConfig fields) with megatron-core's own objects."""
    fields = megatron_fields()
    transformer = {k: megatron_value(k, v) for k, v in parsed.items() if TRANSFORMER in fields[k].owners}
    ddp = {k: megatron_value(k, v) for k, v in parsed.items() if DDP in fields[k].owners}
    return transformer, ddp
