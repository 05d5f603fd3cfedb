"""LoRA/DoRA adapters between megaswift adapter checkpoints and PEFT folders, and merged into the base.

    mcore2hf runs/lora OUT           OUT/adapter_model.safetensors + adapter_config.json (a PEFT folder)
    mcore2hf runs/lora OUT --merge   OUT = the base exported to HF with every adapter merged in (fp32 math,
                                     the base's dtype on disk) and modules_to_save weights replaced
    hf2mcore BASE OUT --adapter A    OUT/iter_0000000 (the base, as always) + OUT/adapter/ (an adapter
                                     checkpoint recording OUT/iter_0000000 as its base, by a relative path)

Tensor values never change between the two sides (adapter_to_peft / peft_to_adapter in megaswift/tuners
rename, modules_to_save weights go through the family's own vocab-padding transform), so an import then an
export is bit-exact. Everything is checked before anything is written: a bad adapter leaves no output.
"""
import json
from pathlib import Path

import torch

from converters.adapter_layout import adapter_layout, tuner_config_of
from converters.errors import ConversionError
from converters.mcore_layout import McoreLayout
from converters.mcore_reader import McoreCheckpointReader
from converters.mcore_writer import write_mcore_checkpoint
from converters.peft_adapter import (ADAPTER_CONFIG, MODULES_TO_SAVE, PEFT_PREFIX, check_peft_can_load,
                                     read_peft_config, read_peft_tensors, split_modules_to_save,
                                     tuner_from_peft_config, write_peft_adapter)
from megaswift.checkpointing.adapter import (ADAPTER_DIR, adapter_meta, base_record, is_adapter_tensor,
                                             recorded_base_path, recorded_tuner)
from megaswift.checkpointing.integrity import FILES_KEY, record_files
from megaswift.checkpointing.layout import iteration_dir, read_meta, write_latest, write_meta
from megaswift.models.families import family_of
from megaswift.models.families.rules import dims_of

PEFT_BASE_KEY = "peft_base_model_name_or_path"  # kept from an imported adapter_config.json, written back on export
HF_SOURCE_KEY = "hf_source"  # in a converted base's megaswift.json: the HF folder it came from (hf2mcore.py)


def _full_weight_mappings(hf: dict) -> dict:
    """HF name -> the family's mapping, for the weights modules_to_save can name."""
    view = family_of(hf).read(hf)
    wanted = set(MODULES_TO_SAVE.values())
    return {m.hf[0]: m for m in family_of(hf).tensor_mappings(view) if len(m.hf) == 1 and m.hf[0] in wanted}


# --- megaswift adapter checkpoint -> tensors by PEFT name --------------------------------------------------

def peft_tensors_of(ckpt: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter checkpoint, by its PEFT name, values as stored."""
    from converters.mcore2hf import _read_region_of
    from megaswift.tuners import adapter_to_peft

    hf, tuner = meta["hf_config"], recorded_tuner(meta)
    layout = adapter_layout(hf, tuner, where=f"{ckpt / 'megaswift.json'} adapter.tuner")
    reader = McoreCheckpointReader(ckpt)
    view = family_of(hf).read(hf)
    stored = {}
    for name, target in layout.tensors.items():
        md = reader.tensor_metadata(target.key)
        offsets, sizes = _read_region_of(target, tuple(md.size), view.vocab_size, str(ckpt))
        stored[name] = reader.read_region(target.key, offsets, sizes).reshape(sizes[len(sizes) - len(target.shape):])
    peft = adapter_to_peft({n: t for n, t in stored.items() if is_adapter_tensor(n)}, hf)
    dims = dims_of(view)
    for hf_name, mapping in _full_weight_mappings(hf).items():
        if mapping.mcore in stored:
            (peft[PEFT_PREFIX + hf_name],) = mapping.transform.to_hf(stored[mapping.mcore], dims)
    return peft


def peft_config_of(ckpt: Path, meta: dict, base_name_or_path: str | None) -> dict:
    from megaswift.tuners import peft_adapter_config

    recorded = meta["adapter"]
    name = base_name_or_path or recorded.get(PEFT_BASE_KEY) or _hf_source_of_base(ckpt, meta) \
        or meta["hf_config"].get("_name_or_path") or recorded["base"]["path"]
    return peft_adapter_config(tuner_config_of(recorded_tuner(meta)), meta["hf_config"], name)


def _hf_source_of_base(ckpt: Path, meta: dict) -> str | None:
    """The HF folder the base was converted from (hf2mcore records it), where the base is still there."""
    base = recorded_base_path(ckpt, meta)
    return (read_meta(base).get(HF_SOURCE_KEY) if (base / "megaswift.json").is_file() else None)


def export_peft_adapter(ckpt: Path, meta: dict, tmp: Path, base_name_or_path: str | None) -> dict:
    """Writes the PEFT folder into `tmp`; returns what it wrote, for the report."""
    tensors = peft_tensors_of(ckpt, meta)
    check_peft_can_load(tensors, meta["hf_config"].get("model_type"), ckpt)
    write_peft_adapter(tmp, tensors, peft_config_of(ckpt, meta, base_name_or_path))
    return {"adapter_tensors": len(tensors)}


# --- merging into the base ------------------------------------------------------------------------------

def lora_scale(tuner: dict) -> float:
    return tuner["alpha"] / (tuner["rank"] ** 0.5 if tuner["rslora"] else tuner["rank"])


def merged_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """W + scale * B @ A in fp32 (DoRA: rescaled row by row to the magnitude m, m / ||W + scale B A||), cast
    back to W's dtype, as PEFT's merge does."""
    base = weight.float()
    combined = base + scale * (parts["lora_B.weight"].float() @ parts["lora_A.weight"].float())
    if "lora_magnitude_vector" in parts:
        norm = torch.linalg.norm(combined, dim=1)
        combined = (parts["lora_magnitude_vector"].float() / norm).unsqueeze(1) * combined
    return combined.to(weight.dtype)


def merge_into_base(peft: dict[str, torch.Tensor], tuner: dict):
    """A function (HF name, base tensor) -> the tensor to write: merged where the adapter has that module,
    replaced where modules_to_save trained it, else unchanged. It also reports which adapter tensors it used,
    so the caller can check that every one was."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    full = {}
    for key, tensor in peft.items():
        name = key[len(PEFT_PREFIX):]
        for leaf in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
            if name.endswith("." + leaf):
                by_module.setdefault(name[: -len(leaf) - 1], {})[leaf] = tensor
                break
        else:
            full[name] = tensor
    scale, used = lora_scale(tuner), set()

    def replace(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        module = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else None
        if hf_name in full:
            used.add(hf_name)
            return full[hf_name].to(tensor.dtype)
        if module in by_module:
            used.add(module)
            return merged_weight(tensor, by_module[module], scale)
        return tensor

    def unused() -> list[str]:
        return sorted((set(by_module) | set(full)) - used)
    return replace, unused


def mcore_logits_with_adapter(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    """megatron-core's fp32 logits (TP=1, one process) with the adapter checkpoint `ckpt` on its base, loaded
    as training loads it (checkpointing.state.load_checkpoint)."""
    from converters.process_group import single_process_model_parallel
    from megaswift.checkpointing.state import load_checkpoint
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks
    from megaswift.tuners import apply_tuner

    meta = read_meta(ckpt)
    hf = meta["hf_config"]
    with single_process_model_parallel():
        config = hf_to_transformer_config(hf, ParallelConfig(), params_dtype=torch.float32)
        config.perform_initialization = False
        (model,) = build_model_chunks(hf, config, "local")
        apply_tuner([model], tuner_config_of(recorded_tuner(meta)), hf)
        load_checkpoint(ckpt, [model], verify=False)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)
    return logits[..., : hf["vocab_size"]].float()


def verify_merged(ckpt: Path, tmp: Path, out: Path, forced: bool, parameter_count: int, stored_fp32: bool) -> dict:
    """The merge's gate: the merged HF model's logits (transformers) equal megaswift's with the adapter (fp32,
    to verify.LOGITS_MAX_ABS_DIFF). Only for an fp32 base: merging into bf16 rounds every merged weight."""
    from converters.verify import (LOGITS_MAX_ABS_DIFF, SEQUENCE_LENGTH, VerificationError, fits_in_memory,
                                   fixed_tokens, hf_logits)

    hf = read_meta(ckpt)["hf_config"]
    fits, memory_note = fits_in_memory(hf, parameter_count)
    if not stored_fp32:
        report = {"logits": {"skipped": "the base is stored in a half-precision dtype, which rounds the merged "
                                        "weights; the logit check runs for fp32 bases"}}
    elif not forced and not fits:
        report = {"logits": {"skipped": f"model too large to verify in memory ({memory_note}); pass --verify"}}
    else:
        tokens = fixed_tokens(hf["vocab_size"])
        diff = (mcore_logits_with_adapter(ckpt, tokens) - hf_logits(tmp, tokens)).abs().max().item()
        report = {"logits": {"max_abs_diff": diff, "threshold": LOGITS_MAX_ABS_DIFF, "dtype": "float32",
                             "compared": "transformers (merged) vs megatron-core with the adapter",
                             "input": f"{SEQUENCE_LENGTH} tokens", "passed": diff <= LOGITS_MAX_ABS_DIFF}}
    report = {"direction": "mcore2hf --merge", "merged": str(ckpt), **report,
              "passed": report["logits"].get("passed", True)}
    (tmp / "verification.json").write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        raise VerificationError(f"mcore2hf --merge verification failed: max |logits diff| = {diff:.3g} > "
                                f"{LOGITS_MAX_ABS_DIFF}; output left unfinished in {tmp}, not moved to {out}; see "
                                f"{tmp / 'verification.json'}")
    return report


# --- PEFT folder -> megaswift adapter checkpoint beside a converted base ---------------------------------

def _check_against_layout(adapter: dict[str, torch.Tensor], layout: McoreLayout, file: Path, where: str) -> None:
    missing = sorted(set(layout.tensors) - set(adapter))
    extra = sorted(set(adapter) - set(layout.tensors))
    if missing or extra:
        raise ConversionError(
            f"{file}: the adapter's tensors do not match its {ADAPTER_CONFIG} on this base ({where}): "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}; not expected {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''} (megaswift adapters cover every layer of each targeted module)")


def prepare_adapter_import(adapter_dir: Path, hf: dict, hf_where: str):
    """Reads and checks a PEFT adapter for the base `hf`; returns (tuner settings, megatron-named tensors,
    layout, the adapter's config). Raises ConversionError naming the file and key; writes nothing."""
    from megaswift.config import ConfigError
    from megaswift.tuners import peft_to_adapter

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    peft_config = read_peft_config(adapter_dir)
    tuner = tuner_from_peft_config(peft_config, config_file)
    peft, file = read_peft_tensors(adapter_dir)
    lora, full = split_modules_to_save(peft, tuner["modules_to_save"], file)
    try:
        adapter = peft_to_adapter(lora, hf)
    except ConfigError as e:
        raise ConversionError(f"{file}: {e} (is this an adapter for another model family than {hf_where}'s "
                              f"{hf.get('architectures')}?)") from None
    layout = adapter_layout(hf, tuner, where=f"{config_file} target_modules/modules_to_save")
    view = family_of(hf).read(hf)
    dims = dims_of(view)
    for hf_name, mapping in _full_weight_mappings(hf).items():
        if hf_name in full:
            target = layout.tensors[mapping.mcore]
            _check_shape(file, PEFT_PREFIX + hf_name, full[hf_name], mapping.transform.to_hf(
                torch.empty(target.shape, device="meta"), dims)[0].shape, hf_where)
            adapter[mapping.mcore] = mapping.transform.to_mcore([full[hf_name]], dims, target.shape)
    _check_against_layout(adapter, layout, file, hf_where)
    for name, tensor in adapter.items():
        _check_shape(file, name, tensor, layout.tensors[name].shape, hf_where)
    return tuner, adapter, layout, peft_config


def _check_shape(file: Path, key: str, tensor: torch.Tensor, expected, hf_where: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ConversionError(f"{file}: tensor {key!r} has shape {list(tensor.shape)}, but the base model "
                              f"({hf_where}) with this adapter's rank implies {list(expected)}: the adapter was made "
                              f"for another base model")


def write_adapter_checkpoint(out: Path, hf: dict, tuner: dict, adapter: dict[str, torch.Tensor],
                             layout: McoreLayout, base_dir: Path, peft_config: dict) -> Path:
    """OUT/adapter/iter_0000000 + latest: an adapter checkpoint whose base is `base_dir` (inside OUT,
    recorded relative to the adapter's folder so that OUT can move)."""
    root = out / ADAPTER_DIR
    ckpt = iteration_dir(root, 0)
    dtypes = {name: adapter[name].dtype for name in layout.tensors}
    write_mcore_checkpoint(ckpt, layout, dtypes, lambda target: adapter[target.name].contiguous())
    relative = Path("..") / ".." / base_dir.relative_to(out)
    meta = adapter_meta(tuner, base_record(base_dir, str(relative)))
    meta["adapter"][PEFT_BASE_KEY] = peft_config.get("base_model_name_or_path")
    write_meta(ckpt, {"iteration": 0, "hf_config": hf, "contents": ["model"], FILES_KEY: record_files(ckpt),
                      "config": {"model": {"hf_config": None, "preset": None, "overrides": {}}, "tuner": tuner},
                      **meta})
    write_latest(root, 0)
    return ckpt


def describe_import(tuner: dict, adapter: dict) -> dict:
    return {"adapter": {"type": tuner["type"], "rank": tuner["rank"], "tensors": len(adapter),
                        "folder": ADAPTER_DIR}}
