"""Coverage checks: every HF tensor consumed exactly once, every megatron tensor produced, shapes as the
config says. Each failure is a ConversionError naming the keys (and files) involved."""
from collections import Counter

import torch

from converters.errors import ConversionError
from converters.mcore_layout import McoreLayout
from megaswift.models.families.rules import TensorMapping
from megaswift.models.families.transforms import Dims

SHOWN = 20  # keys listed in an error before "... and N more"


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_mapping_matches_layout(mappings: list[TensorMapping], layout: McoreLayout, where: str) -> None:
    """The family table produces exactly the tensors megatron-core's GPTModel has."""
    produced = Counter(m.mcore for m in mappings)
    twice = [k for k, n in produced.items() if n > 1]
    unproduced = set(layout.tensors) - set(produced)
    unknown = set(produced) - set(layout.tensors)
    if twice or unproduced or unknown:
        raise ConversionError(f"{where}: the mapping table does not match megatron-core's model: "
                              f"not produced: [{_listing(unproduced)}]; not in the model: [{_listing(unknown)}]; "
                              f"produced twice: [{_listing(twice)}]")
    hf_uses = Counter(k for m in mappings for k in m.hf)
    if any(n > 1 for n in hf_uses.values()):
        used_twice = _listing(k for k, n in hf_uses.items() if n > 1)
        raise ConversionError(f"{where}: HF tensors used by two rules: {used_twice}")


def check_hf_keys(mappings: list[TensorMapping], present: dict[str, str], where: str) -> None:
    """`present`: HF key -> file holding it. Missing and extra tensors are both errors."""
    expected = {k for m in mappings for k in m.hf}
    missing = expected - set(present)
    extra = set(present) - expected
    if missing:
        raise ConversionError(f"{where}: {len(missing)} tensors the model needs are missing: [{_listing(missing)}]")
    if extra:
        raise ConversionError(f"{where}: {len(extra)} tensors are not used by this model "
                              f"(wrong config.json or unsupported variant?): "
                              f"[{_listing(f'{k} (in {present[k]})' for k in extra)}]")


def expected_hf_shapes(mapping: TensorMapping, mcore_shape: tuple[int, ...], dims: Dims) -> list[tuple[int, ...]]:
    """The transform's own inverse applied to a meta tensor: shapes follow from the megatron shape."""
    return [tuple(t.shape) for t in mapping.transform.to_hf(torch.empty(mcore_shape, device="meta"), dims)]


def check_consumed_once(reads: Counter, expected_keys: set[str], where: str) -> None:
    wrong = {k: reads.get(k, 0) for k in expected_keys | set(reads) if reads.get(k, 0) != 1}
    if wrong:
        raise ConversionError(f"{where}: tensors not consumed exactly once (key: times): "
                              f"{_listing(f'{k}: {n}' for k, n in wrong.items())}")
