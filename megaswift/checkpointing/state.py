"""Save and load training state with megatron-core dist_checkpointing (torch_dist, reshardable).

Saving is collective: every rank writes its shards into `iter_N.tmp/`; rank 0 then records the
metadata, renames the folder into place and only then moves `latest` (see layout.py).
"""
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megaswift.checkpointing.layout import (HF_ASSETS, CheckpointError, copy_hf_assets, iteration_dir, read_meta,
                                            write_latest, write_meta)

DIST_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def model_state_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def sharded_training_state(chunks: list, optimizer=None, is_loading: bool = False) -> dict:
    state = {key: _unwrap(chunk).sharded_state_dict() for key, chunk in zip(model_state_keys(chunks), chunks)}
    if optimizer is not None:
        model_state = {}
        for key in model_state_keys(chunks):
            model_state.update(state[key])
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                          metadata=DIST_OPTIMIZER_FORMAT)
    return state


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str | Path, iteration: int, chunks: list, optimizer, scheduler, meta: dict,
                    hf_assets_source: str | None = None) -> Path:
    """Writes iter_N/ atomically and points `latest` at it; returns the final folder."""
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")  # one name on every rank; a stale one is from a crash
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = sharded_training_state(chunks, optimizer)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if rank == 0:
        contents = [*model_state_keys(chunks)] + (["optimizer", "scheduler"] if optimizer is not None else [])
        write_meta(tmp, {**meta, "iteration": iteration, "contents": contents})
        copy_hf_assets(hf_assets_source, tmp / HF_ASSETS)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_latest(root, iteration)
    _barrier()
    return final


def restore_adam_steps(optimizer) -> None:
    """torch's AdamW (megatron's fallback without Apex) keeps a `step` tensor per parameter. megatron's
    distributed optimizer restores the step into ONE tensor shared by every parameter (so each update
    advances it once per parameter), and its per-parameter state load then writes back the placeholder
    steps it was primed with. Either way resumed training silently diverges. The true step is in the
    param groups: give every parameter its own tensor holding it."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:
            continue
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state.get(param, {})
                if "step" in group and group["step"] is not None:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
                elif torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()


def prime_optimizer_state(optimizer) -> None:
    """torch's AdamW creates its state (moments and a per-parameter `step`) on the first step, but megatron's
    distributed optimizer reads that state while building the state dict to load into, and asserts that it
    holds exactly one step value (`assert len(steps) == 1`). Create it empty, one step tensor per parameter."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:
            continue
        inner.init_state_fn(torch_optimizer, inner.config)
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                torch_optimizer.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def load_checkpoint(ckpt_dir: str | Path, chunks: list, optimizer=None, scheduler=None) -> int:
    """Loads model weights (and optimizer/scheduler when given); returns the checkpoint's iteration."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    saved_chunks = [c for c in meta.get("contents", []) if c.startswith("model")]
    if optimizer is not None and "optimizer" not in meta.get("contents", []):
        raise CheckpointError(f"{ckpt_dir} holds no optimizer state (contents: {meta.get('contents')}); "
                              f"load it with checkpoint.finetune=true to start training from its weights")
    if not saved_chunks:
        raise CheckpointError(f"{ckpt_dir}/megaswift.json lists no model state in 'contents'")
    if optimizer is not None:
        prime_optimizer_state(optimizer)
    state = sharded_training_state(chunks, optimizer, is_loading=True)
    # Virtual-pipeline chunks hold layer subsets; on disk every layer has a global key, so any chunking loads.
    # Unexpected keys are fine (a weights-only load skips the optimizer's); a missing key fails the load.
    loaded = dist_checkpointing.load(state, str(ckpt_dir), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    for key, chunk in zip(model_state_keys(chunks), chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_steps(optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(dist_checkpointing.load_common_state_dict(str(ckpt_dir))["scheduler"])
    return int(meta["iteration"])
