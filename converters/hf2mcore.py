"""HF folder -> megaswift checkpoint (megatron-core torch_dist), streaming tensor by tensor.

    OUT/latest                   "0"
    OUT/iter_0000000/            torch_dist checkpoint ("model" = GPTModel.sharded_state_dict() keys)
    OUT/iter_0000000/megaswift.json, hf_assets/   HF config, tokenizer and generation config
    OUT/verification.json        coverage + logit check results (with --verify)
    OUT/adapter/                 with `adapter`: the PEFT adapter as a megaswift adapter checkpoint on
                                 OUT/iter_0000000 (adapter_convert.py), for `--tuner.type lora` to continue
"""
import contextlib
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from converters.adapter_convert import (HF_SOURCE_KEY, describe_import, prepare_adapter_import,
                                        write_adapter_checkpoint)
from converters.conversion_plan import plan_shares, tensor_bytes
from converters.conversion_ranks import ConversionRanks, conversion_ranks
from converters.coverage import check_consumed_once, check_hf_keys, check_mapping_matches_layout, expected_hf_shapes
from converters.errors import ConversionError
from converters.fp8 import fp8_dequantization
from converters.hf_reader import HfCheckpointReader
from converters.mcore_layout import McoreTensor, mcore_layout
from converters.mcore_writer import ReusedMemory, write_mcore_checkpoint
from converters.output_dir import atomic_output_dir, check_output_dir
from megaswift.checkpointing.integrity import FILES_KEY, record_files
from megaswift.checkpointing.layout import copy_hf_assets, iteration_dir, write_latest, write_meta
from megaswift.models.families import family_of
from megaswift.models.families.rules import dims_of, unconverted_hf_tensors
from megaswift.models.families.transforms import empty_placed

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def read_hf_config(hf_dir: Path) -> dict:
    file = hf_dir / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{file}: missing; an HF model folder needs its config.json") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file}: invalid JSON: {e}") from None


def _check_shapes(mappings, layout, reader: HfCheckpointReader, dims, config_file: Path) -> None:
    for m in mappings:
        for key, shape in zip(m.hf, expected_hf_shapes(m, layout.tensors[m.mcore].shape, dims)):
            if reader.shape(key) != shape:
                raise ConversionError(f"{reader.file_of[key]}: tensor {key!r} has shape {list(reader.shape(key))}, "
                                      f"but {config_file} implies {list(shape)}")


TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def _check_fused_dtypes(mappings, reader: HfCheckpointReader, hf_dir: Path) -> None:
    for m in mappings:
        found = {k: reader.dtype(k) for k in m.hf}
        if len(set(found.values())) > 1:
            raise ConversionError(f"{hf_dir}: tensors fused into {m.mcore} have different dtypes: "
                                  + ", ".join(f"{k} ({reader.file_of[k].name}) is {d}" for k, d in found.items()))


def _fingerprint(reader: HfCheckpointReader, key: str) -> str:
    """sha256 of a tensor's bytes, reading one tensor at a time (a peek: it does not count as consuming)."""
    tensor = reader.read(key)
    reader.reads[key] -= 1
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def redundant_tied_head(tied: bool, reader: HfCheckpointReader, where: str, compare: bool = True) -> set[str]:
    """Many saves of tied models also store lm_head.weight, a copy of the embedding. It is accepted (and counted
    as consumed) only when bit-identical to the embedding, so it carries nothing the conversion would drop.
    `compare`: False on all ranks of a multi-process conversion but one, which reads, compares and counts it."""
    if not tied or TIED_HEAD not in reader.file_of or TIED_EMBEDDING not in reader.file_of:
        return set()
    if not compare:
        return {TIED_HEAD}
    if _fingerprint(reader, TIED_HEAD) != _fingerprint(reader, TIED_EMBEDDING):
        raise ConversionError(f"{where}: config.json says tie_word_embeddings=true, but {TIED_HEAD} (in "
                              f"{reader.file_of[TIED_HEAD]}) differs from {TIED_EMBEDDING}: the weights contradict "
                              f"the config")
    reader.reads[TIED_HEAD] += 1
    return {TIED_HEAD}


def _report_skipped(skipped: dict[str, str], hf_dir: Path) -> None:
    """Tensors the family knowingly leaves out (e.g. multi-token-prediction layers) are named, never dropped
    silently: one line per reason, on stderr, and the list in verification.json."""
    by_reason = {}
    for key, reason in sorted(skipped.items()):
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        print(f"megaswift convert: {hf_dir}: not converting {len(keys)} tensors ({keys[0]} ... {keys[-1]}): {reason}",
              file=sys.stderr)


def hf2mcore(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None, verify: bool | None = None,
             overwrite: bool = False, progress: bool = True, adapter: str | Path | None = None,
             direct_io: bool = True) -> dict:
    """Returns the verification report ({} with verify=False). verify=None: verify when it fits in memory.
    `adapter`: a PEFT LoRA/DoRA folder for this base, imported beside it (OUT/adapter/). `direct_io`: write
    the checkpoint with O_DIRECT where the file system allows it (converters/direct_io.py).
    Under torchrun (`megaswift launch --nproc-per-node N -- megaswift convert hf2mcore ...`) each rank reads and
    writes its share of the tensors (conversion_plan.py) into one checkpoint; rank 0 finishes it."""
    with conversion_ranks() as ranks:
        return _hf2mcore(ranks, Path(hf_dir), Path(out_dir), dtype, verify, overwrite, progress, adapter, direct_io)


def _hf2mcore(ranks: ConversionRanks, hf_dir: Path, out_dir: Path, dtype: str | None, verify: bool | None,
              overwrite: bool, progress: bool, adapter: str | Path | None, direct_io: bool) -> dict:
    with ranks.step("checking the input"):
        check_output_dir(out_dir, overwrite)  # fail before any work
        # FP8 weights are dequantized while read; the recorded config no longer claims them.
        hf, fp8 = fp8_dequantization(read_hf_config(hf_dir), hf_dir / "config.json", DTYPES.get(dtype))
        family = family_of(hf, where=str(hf_dir / "config.json"))
        if adapter is not None and ranks.world > 1:
            raise ConversionError(f"--adapter {adapter}: importing an adapter is done by a one-process conversion; "
                                  f"run it without `megaswift launch` (or convert the base with {ranks.world} "
                                  f"processes and the adapter in a second, one-process run)")
        # The adapter is read and checked against this base before anything is written.
        imported = prepare_adapter_import(adapter, hf, str(hf_dir)) if adapter is not None else None
        view = family.read(hf)
        mappings = family.tensor_mappings(view)
        reader = HfCheckpointReader(hf_dir, fp8)
        layout = mcore_layout(hf, replicated=ranks.world > 1)
        dims = dims_of(view)
        check_mapping_matches_layout(mappings, layout, where=view.architecture)
        redundant = redundant_tied_head(view.tied_embeddings, reader, where=str(hf_dir), compare=ranks.is_first)
        skipped = unconverted_hf_tensors(view, reader.keys())
        if ranks.is_first:
            _report_skipped(skipped, hf_dir)
        check_hf_keys(mappings, {k: str(reader.file_of[k]) for k in reader.keys() if k not in redundant | set(skipped)},
                      where=str(hf_dir))
        _check_shapes(mappings, layout, reader, dims, hf_dir / "config.json")
        _check_fused_dtypes(mappings, reader, hf_dir)
    by_name = {m.mcore: m for m in mappings}
    dtypes = {m.mcore: DTYPES[dtype] if dtype and m.cast else reader.dtype(m.hf[0]) for m in mappings}
    sizes = tensor_bytes(layout, dtypes)
    share = plan_shares(sizes, ranks.world)[ranks.rank]
    bar = tqdm(total=len(share), desc="hf2mcore", unit="tensor", disable=not progress or not ranks.is_first)
    # The tensors are read into one buffer the size of the largest (as read, before any cast), reused for
    # each: fresh memory for every tensor (a page fault per 4 KiB) was the largest cost after the writes.
    memory = ReusedMemory(max((torch.Size(layout.tensors[name].shape).numel()
                               * reader.dtype(by_name[name].hf[0]).itemsize for name in share), default=0))

    def produce(target: McoreTensor) -> torch.Tensor:
        mapping = by_name[target.name]
        # Each HF tensor's rows are read from disk straight into their place in the fused tensor.
        placement = mapping.transform.placement(dims, target.shape)
        tensor = empty_placed(target.shape, reader.dtype(mapping.hf[0]), placement, empty=memory.empty)
        for key, blocks in zip(mapping.hf, placement):
            reader.read_rows_into(key, blocks, tensor)
        bar.update()
        return mapping.transform.finish_mcore(tensor).to(dtypes[target.name])

    with contextlib.ExitStack() as output:
        tmp = None
        with ranks.step("creating the output folder"):
            if ranks.is_first:  # rank 0 owns the temporary folder: it renames it into place, or removes it
                tmp = output.enter_context(atomic_output_dir(out_dir, overwrite, needed_bytes=sum(sizes.values())))
        tmp = ranks.shared_folder(tmp, out_dir)
        ckpt = iteration_dir(tmp, 0)
        with ranks.step("writing the checkpoint"):
            summed = write_mcore_checkpoint(ckpt, layout, dtypes, produce, share=share, group=ranks.group,
                                            direct_io=direct_io)
            bar.close()
            memory.release()  # before the verification loads the model
            files = record_files(ckpt, summed)  # collective: each rank's sums of the file it wrote
        reads = sum((Counter(r) for r in ranks.gather(dict(reader.reads))), Counter())  # the union of all ranks
        reader.close()
        ranks.close_group()
        with ranks.on_rank0("finishing the checkpoint") as finishing:
            if finishing:
                check_consumed_once(reads, {k for m in mappings for k in m.hf} | redundant, where=str(hf_dir))
                report = _finish(hf, hf_dir, tmp, out_dir, ckpt, files, imported, dtype, verify, fp8,
                                 {"hf_tensors": len(reads), "mcore_tensors": len(layout.tensors),
                                  "skipped_hf_tensors": sorted(skipped)},
                                 sum(torch.Size(t.shape).numel() for t in layout.tensors.values()))
                output.close()  # the rename into place: its failure is rank 0's outcome too
    if not ranks.is_first:
        return {}
    return {**report, **(describe_import(imported[0], imported[1]) if imported is not None else {})}


def _finish(hf: dict, hf_dir: Path, tmp: Path, out_dir: Path, ckpt: Path, files: dict, imported,
            dtype: str | None, verify: bool | None, fp8, coverage: dict, parameter_count: int) -> dict:
    """What one process adds once the tensors are written: megaswift.json, HF assets, the adapter, the
    verification, `latest`."""
    write_meta(ckpt, {"iteration": 0, "hf_config": hf, "contents": ["model"], FILES_KEY: files,
                      HF_SOURCE_KEY: str(hf_dir.resolve()),  # what an exported adapter names as its base
                      "config": {"model": {"hf_config": None, "preset": None, "overrides": {}}}})
    copy_hf_assets(hf_dir, ckpt / "hf_assets")
    if imported is not None:
        tuner, tensors, adapter_tensors_layout, peft_config = imported
        adapter_ckpt = write_adapter_checkpoint(tmp, hf, tuner, tensors, adapter_tensors_layout, ckpt, peft_config)
        copy_hf_assets(hf_dir, adapter_ckpt / "hf_assets")
    report = {}
    if verify is not False:
        from converters.verify import verify_conversion
        report = verify_conversion(hf, hf_dir=hf_dir, mcore_dir=ckpt, hf_dtype=DTYPES.get(dtype), tmp=tmp,
                                   final=out_dir, direction="hf2mcore", forced=verify is True, coverage=coverage,
                                   parameter_count=parameter_count, fp8=fp8)
    write_latest(tmp, 0)
    return report
