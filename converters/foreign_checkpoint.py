"""A checkpoint another trainer wrote (megaswift/checkpointing/foreign.py) checked against the model the user
says it holds: the family's mapping and megatron-core's GPTModel, built from the named HF config, say which
tensors must be stored with which global shape; the checkpoint's .metadata says what is. Used before
exporting (mcore2hf --hf-config) and before training from it (--checkpoint.load ... --checkpoint.finetune)."""
from pathlib import Path

from converters.coverage import _listing, check_mapping_matches_layout
from converters.errors import ConversionError
from converters.mcore_layout import McoreLayout, mcore_layout
from megaswift.checkpointing.foreign import ForeignCheckpoint, open_foreign_checkpoint
from megaswift.checkpointing.layout import CheckpointError
from megaswift.models.families import family_of
from megaswift.models.hf_config import load_hf_config

# megaswift's layer specs store the norms fused into the next linear layer (linear_qkv.layer_norm_weight), as
# Transformer Engine's spec (Megatron-LM's default) does; megatron-core's local spec keeps them as modules.
_LOCAL_SPEC_NORM_NAMES = ("input_layernorm.weight", "pre_mlp_layernorm.weight")


def _shape_problem(key: str, found: tuple, expected: tuple, vocab_padded: bool, vocab_size: int) -> str | None:
    if found == expected:
        return None
    if vocab_padded and found[1:] == expected[1:] and found[0] >= vocab_size:
        return None  # vocab rows padded for another TP: the first vocab_size rows are what is read
    return f"{key}: expected {list(expected)}, found {list(found)}"


def check_foreign_tensors(ckpt: ForeignCheckpoint, layout: McoreLayout, vocab_size: int, config_file: str) -> None:
    """Missing, extra and mis-shaped model tensors, all of them in one error; optimizer/RNG entries are ignored."""
    expected = {t.key: t for t in layout.tensors.values()}  # on-disk keys, the prefix included
    stored = set(ckpt.model_keys)
    missing = sorted(set(expected) - stored)
    extra = sorted(stored - set(expected))
    misshaped = [p for k in sorted(set(expected) & stored)
                 if (p := _shape_problem(k, tuple(ckpt.tensors[k].size), expected[k].global_shape,
                                         expected[k].allow_shape_mismatch, vocab_size))]
    if not (missing or extra or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors the model needs are missing: ["
                     f"{_listing(f'{k} {list(expected[k].global_shape)}' for k in missing)}]")
    if extra:
        listed = _listing(f"{k} {list(ckpt.tensors[k].size)}" for k in extra)
        parts.append(f"{len(extra)} tensors have no place in it: [{listed}]")
    if misshaped:
        parts.append(f"{len(misshaped)} tensors have another global shape: [{_listing(misshaped)}]")
    hint = (" It was saved with megatron-core's local layer spec (Megatron-LM --transformer-impl local: separate "
            "norm modules), which megaswift does not read; megaswift reads Transformer Engine's names (norms in "
            "linear_qkv/linear_fc1.layer_norm_weight, Megatron-LM's default)."
            if any(k.endswith(_LOCAL_SPEC_NORM_NAMES) for k in extra) else
            f" Is {config_file} the config of the model this checkpoint holds (layers, sizes, vocab, MoE)?")
    raise ConversionError(f"{ckpt.describe()} does not hold the model of {config_file}: {'; '.join(parts)}.{hint}")


def config_file_of(hf_config: str | Path) -> str:
    return str(Path(hf_config) / "config.json" if Path(hf_config).is_dir() else hf_config)


def open_checked(path: str | Path, hf_config: str | Path | dict,
                 config_file: str | None = None) -> tuple[ForeignCheckpoint, dict, McoreLayout]:
    """The checkpoint at `path` (root or iter_* folder), the HF config (a folder or config.json, or the dict
    itself with `config_file` saying where it came from), and the layout its tensors were found to match."""
    try:
        ckpt = open_foreign_checkpoint(path)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    hf = hf_config if isinstance(hf_config, dict) else load_hf_config(hf_config)
    config_file = config_file or config_file_of(hf_config)
    family = family_of(hf, where=config_file)
    view = family.read(hf)
    layout = mcore_layout(hf, metadata=ckpt.sharded_metadata, prefix=ckpt.prefix)
    check_mapping_matches_layout(family.tensor_mappings(view), layout, where=view.architecture)
    check_foreign_tensors(ckpt, layout, view.vocab_size, config_file)
    return ckpt, hf, layout
