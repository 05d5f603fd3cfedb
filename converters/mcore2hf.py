"""megaswift checkpoint (any TP/PP/VPP/EP that saved it) -> HF folder, streaming tensor by tensor.

Writes config.json (the HF config recorded in megaswift.json, naming the dtype the weights are stored in and
readable by transformers 4.x and 5 alike), the tokenizer and generation
files kept in hf_assets/, sharded safetensors + model.safetensors.index.json, and verification.json.
An adapter checkpoint (a LoRA/DoRA run's) becomes a PEFT adapter folder, or with `merge` its base exported
with the adapter merged in (adapter_convert.py).
"""
import contextlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from converters.adapter_convert import export_peft_adapter, merge_into_base, peft_tensors_of, verify_merged
from converters.conversion_plan import plan_shares
from converters.conversion_ranks import ConversionRanks, conversion_ranks
from converters.coverage import check_mapping_matches_layout, expected_hf_shapes
from converters.errors import ConversionError
from converters.mcore_layout import McoreTensor, mcore_layout
from converters.mcore_reader import McoreCheckpointReader
from converters.output_dir import atomic_output_dir, check_output_dir
from converters.safetensors_writer import PlannedTensor, ShardedSafetensorsWriter, parse_size, plan_shards
from megaswift.checkpointing.adapter import is_adapter_checkpoint, recorded_tuner, resolve_base
from megaswift.checkpointing.foreign import is_foreign_checkpoint, is_megaswift_checkpoint
from megaswift.checkpointing.integrity import damaged_files
from megaswift.checkpointing.layout import (HF_ASSETS, META_FILE, CheckpointError, copy_hf_assets,
                                            read_meta, resolve_checkpoint)
from megaswift.models.families import family_of
from megaswift.models.families.rules import TensorMapping, dims_of

MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # what a GPTModel stores; the rest is training state


def _read_region_of(target: McoreTensor, stored_shape: tuple[int, ...], vocab_size: int,
                    where: str) -> tuple[tuple, tuple]:
    """The region of the stored tensor holding `target`. Vocab-padded tensors may be stored with
    another padding (the padded size depends on the TP that saved them): read the rows both have."""
    sizes = list(target.chunk_sizes)
    if target.allow_shape_mismatch and stored_shape[1:] == target.global_shape[1:]:
        if stored_shape[0] < vocab_size:
            raise ConversionError(f"{where}: tensor {target.key!r} has {stored_shape[0]} vocab rows, fewer than "
                                  f"vocab_size={vocab_size} in the HF config in megaswift.json")
        sizes[0] = min(stored_shape[0], target.global_shape[0])
    elif stored_shape != target.global_shape:
        raise ConversionError(f"{where}: tensor {target.key!r} is stored with global shape {list(stored_shape)}, "
                              f"but the HF config in megaswift.json implies {list(target.global_shape)}")
    return target.offset, tuple(sizes)


def mcore2hf(mcore_dir: str | Path, out_dir: str | Path, max_shard_size: str = "5GB", verify: bool | None = None,
             overwrite: bool = False, progress: bool = True, merge: bool = False,
             base_name_or_path: str | None = None, hf_config: str | Path | None = None, direct_io: bool = True) -> dict:
    """`merge`: for an adapter checkpoint, write the full model with the adapter merged instead of the PEFT
    folder. `base_name_or_path`: the adapter_config.json field (default: what an imported adapter recorded,
    else the base checkpoint's path). `hf_config`: the HF config (folder or config.json) of a checkpoint
    megaswift did not write (Megatron-LM, Megatron-Bridge, ms-swift), which records none. `direct_io`: write
    the safetensors files with O_DIRECT where the file system allows it (converters/direct_io.py)."""
    with conversion_ranks() as ranks:
        return _mcore2hf(ranks, Path(mcore_dir), Path(out_dir), max_shard_size, verify, overwrite, progress, merge,
                         base_name_or_path, hf_config, direct_io)


def _mcore2hf(ranks: ConversionRanks, mcore_dir: Path, out_dir: Path, max_shard_size: str, verify: bool | None,
              overwrite: bool, progress: bool, merge: bool, base_name_or_path: str | None, hf_config,
              direct_io: bool) -> dict:
    """Under torchrun (`megaswift launch`), a megaswift checkpoint's full model is exported by all ranks, each
    writing its share of the safetensors files; everything else is refused there (adapters are small, and
    checkpoints other trainers wrote are checked by a one-process path)."""
    check_output_dir(out_dir, overwrite)  # fail before any work
    max_shard_bytes = parse_size(max_shard_size)
    foreign = hf_config is not None or is_foreign_checkpoint(mcore_dir)
    if ranks.world > 1 and (foreign or merge or is_adapter_checkpoint(_meta_or_empty(mcore_dir))):
        raise ConversionError(f"{mcore_dir}: mcore2hf in {ranks.world} processes exports a megaswift checkpoint's full "
                              f"model; run adapter exports, --merge and --hf-config without `megaswift launch`")
    if foreign:
        return _export_foreign(mcore_dir, hf_config, merge, out_dir, max_shard_bytes, verify, overwrite, progress,
                               direct_io)
    try:
        ckpt = resolve_checkpoint(mcore_dir)
        meta = read_meta(ckpt)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    _check_files_intact(ckpt)
    if not is_adapter_checkpoint(meta):
        if merge:
            raise ConversionError(f"--merge merges an adapter into its base, but {ckpt} is a full checkpoint (no "
                                  f"'adapter' in its megaswift.json); export it without --merge")
        return _export_model(ckpt, meta, out_dir, max_shard_bytes, verify, overwrite, progress, ranks=ranks,
                             direct_io=direct_io)
    if not merge:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            report = export_peft_adapter(ckpt, meta, tmp, base_name_or_path)
            copy_hf_assets(ckpt / HF_ASSETS, tmp)
        return report
    try:
        base = resolve_base(ckpt, meta)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    _check_files_intact(base)
    replace, unused = merge_into_base(peft_tensors_of(ckpt, meta), recorded_tuner(meta))

    def check(tmp: Path, planned: list) -> dict:  # megaswift with the adapter vs transformers on the merged model
        if verify is False:
            return {}
        return verify_merged(ckpt, tmp, out_dir, verify is True, sum(torch.Size(t.shape).numel() for t in planned),
                             all(t.dtype == torch.float32 for t in planned))
    return _export_model(base, read_meta(base), out_dir, max_shard_bytes, False, overwrite, progress,
                         replace=replace, assets=ckpt / HF_ASSETS, check_done=unused, after_write=check,
                         direct_io=direct_io)


def _meta_or_empty(mcore_dir: Path) -> dict:
    try:
        return read_meta(resolve_checkpoint(mcore_dir))
    except CheckpointError:
        return {}  # reported by the one-process path's own checks


def _export_foreign(mcore_dir: Path, hf_config, merge: bool, out_dir: Path, max_shard_bytes: int,
                    verify: bool | None, overwrite: bool, progress: bool, direct_io: bool) -> dict:
    """A Megatron-LM-style checkpoint (converters/foreign_checkpoint.py): checked against the named config."""
    from converters.foreign_checkpoint import open_checked
    if is_megaswift_checkpoint(mcore_dir):
        raise ConversionError(f"{mcore_dir} is a megaswift checkpoint, which records its HF config in "
                              f"{META_FILE}: drop --hf-config")
    if hf_config is None:
        raise ConversionError(f"{mcore_dir} was not written by megaswift (no {META_FILE}; Megatron-LM, "
                              f"Megatron-Bridge or ms-swift write it this way) and records no HF config: name the "
                              f"config of the model it holds with --hf-config DIR_OR_CONFIG_JSON")
    if merge:
        raise ConversionError(f"--merge merges a megaswift LoRA/DoRA checkpoint; {mcore_dir} is a full checkpoint "
                              f"another trainer wrote: export it without --merge")
    ckpt, hf, layout = open_checked(mcore_dir, hf_config)
    # The logit check loads the checkpoint with megaswift's own key layout; other layouts are checked by shape.
    if verify is not False and (ckpt.prefix or ckpt.per_layer):
        verify = False
    assets = Path(hf_config) if Path(hf_config).is_dir() else Path(hf_config).parent
    return _export_model(ckpt.folder, {"hf_config": hf}, out_dir, max_shard_bytes, verify, overwrite, progress,
                         assets=assets, layout=layout, metadata=ckpt.metadata, direct_io=direct_io)


def _export_model(ckpt: Path, meta: dict, out_dir: Path, max_shard_bytes: int, verify: bool | None, overwrite: bool,
                  progress: bool, replace=None, assets: Path | None = None, check_done=None, after_write=None,
                  layout=None, ranks: ConversionRanks | None = None, metadata=None, direct_io: bool = True) -> dict:
    """The full model of `ckpt` as an HF folder. `replace(hf_name, tensor)`: what to write instead of each HF
    tensor (merging); `check_done()`: names left unused by `replace`, which must be none; `after_write(tmp,
    planned)`: a check of the written folder before it is moved into place, returning the report. `layout`:
    a checkpoint another trainer wrote, already checked against the config (foreign_checkpoint.py), and
    `metadata` its .metadata as that check read it. `ranks`:
    several processes, each writing its share of the files (conversion_plan.py), rank 0 the rest."""
    ranks = ranks or ConversionRanks()
    with ranks.step("checking the checkpoint"):
        planned_export = _planned_export(ckpt, meta, layout, ranks.world, metadata)
        hf, layout, mappings, reader, dims, regions, planned = planned_export
    shards = plan_shards(planned, max_shard_bytes)
    mine = plan_shares({i: shard.nbytes for i, shard in enumerate(shards)}, ranks.world)[ranks.rank]
    with contextlib.ExitStack() as output:
        tmp = None
        with ranks.step("creating the output folder"):
            if ranks.is_first:  # rank 0 owns the temporary folder: it renames it into place, or removes it
                tmp = output.enter_context(atomic_output_dir(out_dir, overwrite))
        tmp = ranks.shared_folder(tmp, out_dir)
        with ranks.step("writing the safetensors files"):
            writer = ShardedSafetensorsWriter(tmp, shards, mine=mine, write_index=ranks.is_first, direct_io=direct_io)
            todo = [m for m in mappings if any(writer.wants(k) for k in m.hf)]
            for m in tqdm(todo, desc="mcore2hf", unit="tensor", disable=not progress or not ranks.is_first):
                _write_mapping(m, layout.tensors[m.mcore], regions[m.mcore], reader, writer, dims, replace)
            writer.close()
        ranks.close_group()
        with ranks.on_rank0("finishing the HF folder") as finishing:
            if finishing:
                report = _finish_export(hf, ckpt, tmp, out_dir, layout, planned, verify, assets, check_done,
                                        after_write)
                output.close()  # the rename into place: its failure is rank 0's outcome too
    return report if ranks.is_first else {}


def _planned_export(ckpt: Path, meta: dict, layout, world: int, metadata=None):
    """Everything checked and planned before a byte is written: the HF tensors to write, their shapes and
    dtypes, and where each one's data sits in the checkpoint."""
    hf = meta.get("hf_config")
    if not hf:
        raise ConversionError(f"{ckpt / 'megaswift.json'}: has no 'hf_config'; cannot tell which model it holds")
    family = family_of(hf, where=f"{ckpt / 'megaswift.json'} hf_config")
    view = family.read(hf)
    mappings = family.tensor_mappings(view)
    foreign = layout is not None
    layout = layout or mcore_layout(hf, replicated=world > 1)
    check_mapping_matches_layout(mappings, layout, where=view.architecture)
    reader = McoreCheckpointReader(ckpt, metadata)
    dims = dims_of(view)
    regions, planned = {}, []
    for m in mappings:
        target = layout.tensors[m.mcore]
        md = reader.tensor_metadata(target.key)
        regions[m.mcore] = _read_region_of(target, tuple(md.size), view.vocab_size, str(ckpt))
        read_shape = regions[m.mcore][1][len(target.chunk_sizes) - len(target.shape):]
        planned += [PlannedTensor(k, s, md.properties.dtype)
                    for k, s in zip(m.hf, expected_hf_shapes(m, read_shape, dims))]
    if not foreign:
        _check_no_unused_model_tensors(reader, layout, ckpt)
    return hf, layout, mappings, reader, dims, regions, planned


def _finish_export(hf: dict, ckpt: Path, tmp: Path, out_dir: Path, layout, planned: list, verify: bool | None,
                   assets: Path | None, check_done, after_write) -> dict:
    """What one process adds once the weights are written: config, assets, the checks."""
    left = check_done() if check_done else []
    if left:
        raise ConversionError(f"{ckpt}: adapter tensors for modules the base has no weight for: {left}")
    config = _with_transformers4_rope(_with_saved_dtype(hf, planned))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_hf_assets(assets or ckpt / HF_ASSETS, tmp)
    report = after_write(tmp, planned) if after_write else {}
    if verify is not False:
        from converters.verify import verify_conversion
        report = verify_conversion(hf, hf_dir=tmp, mcore_dir=ckpt, hf_dtype=None, tmp=tmp, final=out_dir,
                                   direction="mcore2hf", forced=verify is True,
                                   coverage={"hf_tensors": len(planned), "mcore_tensors": len(layout.tensors)},
                                   parameter_count=sum(torch.Size(t.shape).numel() for t in planned))
    return report


def _check_files_intact(ckpt: Path) -> None:
    """A bit flip in a weight file need not break the read: it would be exported silently. Checkpoints record
    each file's size and CRC32 in megaswift.json; check them first (older checkpoints record none)."""
    problems = damaged_files(ckpt)
    if problems:
        raise ConversionError(f"checkpoint {ckpt} is damaged, not exporting it: {'; '.join(problems)}. Restore the "
                              f"file from a copy, or export an earlier checkpoint (an iter_N folder in {ckpt.parent})")


def _with_saved_dtype(hf: dict, planned: list) -> dict:
    """config.json must name the dtype the weights are stored in: a recorded `bfloat16` over fp32 weights
    (a CPU run of a bf16 preset) makes `from_pretrained(dtype="auto")` silently round them to bf16. Both
    spellings: transformers 5 reads `dtype`, transformers 4.x (and vLLM on it) only `torch_dtype`."""
    dtypes = {str(t.dtype).removeprefix("torch.") for t in planned}
    name = next(iter(dtypes)) if len(dtypes) == 1 else hf.get("dtype", hf.get("torch_dtype"))
    return hf if name is None else {**hf, "torch_dtype": name, "dtype": name}


def _with_transformers4_rope(hf: dict) -> dict:
    """transformers 5 writes RoPE as one `rope_parameters` dict; transformers 4.x (and vLLM on it) reads the
    top-level `rope_theta`, `rope_scaling` and `partial_rotary_factor`, and without them silently uses its
    defaults (theta 10000, no scaling). Add the fields the config lacks, with the same values. transformers
    5 reads `rope_scaling` in preference to `rope_parameters` and fills `rope_theta` (and the partial factor)
    in from the top level, so it still gets the same dict. Per-layer-type (nested) parameters have no 4.x
    spelling and are left alone."""
    rope = hf.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or any(isinstance(v, dict) for v in rope.values()):
        return hf
    top_level = ("rope_theta", "partial_rotary_factor")
    added = {k: rope[k] for k in top_level if k in rope and k not in hf}
    if rope.get("rope_type", rope.get("type", "default")) != "default" and not hf.get("rope_scaling"):
        added["rope_scaling"] = {k: v for k, v in rope.items() if k not in top_level}
    return {**hf, **added}


def _write_mapping(m: TensorMapping, target: McoreTensor, region, reader: McoreCheckpointReader,
                   writer: ShardedSafetensorsWriter, dims, replace=None) -> None:
    offsets, sizes = region
    tensor = reader.read_region(target.key, offsets, sizes)
    tensor = tensor.reshape(sizes[len(sizes) - len(target.shape):])  # drop the layer / expert axes
    for key, hf_tensor in zip(m.hf, m.transform.to_hf(tensor, dims)):
        if writer.wants(key):  # a fused tensor's HF parts may fall into two ranks' shards: each writes its own
            writer.write(key, replace(key, hf_tensor) if replace else hf_tensor)


def _check_no_unused_model_tensors(reader: McoreCheckpointReader, layout, ckpt: Path) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    used = {t.key for t in layout.tensors.values()}
    unused = sorted(k for k, md in reader.metadata.state_dict_metadata.items()
                    if isinstance(md, TensorStorageMetadata) and k.startswith(MODEL_KEY_PREFIXES) and k not in used)
    if unused:
        raise ConversionError(f"{ckpt}: model tensors the HF config in megaswift.json has no place for "
                              f"(wrong hf_config, or a layer spec megaswift does not convert): {unused}")
