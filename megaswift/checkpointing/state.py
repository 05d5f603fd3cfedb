"""Save and load training state with megatron-core dist_checkpointing (torch_dist, reshardable).

Saving is collective: every rank writes its shards into `iter_N.tmp-<nonce>/` (the nonce from rank 0);
rank 0 then records the metadata (with each file's size and CRC32, integrity.py), renames the folder into
place and only then moves `latest` (see layout.py). Loading first checks those sums (checkpoint.verify).

The distributed optimizer's state is saved as `fully_reshardable` (megatron-core 0.19.2): moments and
main params in model-parameter shapes, keyed like the weights, so a resume may change TP, PP, VPP, EP,
CP and DP. megaswift.json records the sharding type; the load asks for the type the checkpoint was
saved in. What is true in 0.19.2 with torch's AdamW (no Apex/TE):
- `fully_reshardable` saves the Adam step only in the param groups, and its per-parameter load
  (`load_parameter_state_from_fully_reshardable`) raises KeyError 'step' because the target state
  holds a step tensor the loaded state lacks. `load_optimizer_state` therefore loads the param groups
  first, drops the per-parameter steps, loads the parameter state, and gives each parameter its step
  back from the param groups (restore_adam_steps).
- `fully_sharded_model_space` (megatron's default) cannot work: it builds ShardedTensors with
  `flattened_range`, which 0.19 rejects ("ShardedTensor.flattened_range is not supported").
- `dp_reshardable` (what megaswift wrote before; a checkpoint without a recorded type is one) depends
  on the flat buffer layout, so it reshards over DP only. Loading one at another TP/PP/VPP/EP/CP is
  refused before any tensor is read (`check_reshardable`); resume at the saved layout and save again.
- MoE: expert parameters get an optimizer of their own only at EP > 1, so EP 1 <-> EP > 1 changes the
  number of chained optimizers, which megatron-core cannot map; refused before loading
  (`check_optimizer_parts`). EP changes on one side of 1, TP, PP, VPP and DP changes reshard.

LoRA/DoRA runs (adapter.py): a save whose meta carries an "adapter" entry writes only the trainable parameters
(adapters, modules_to_save) and their optimizer state; loading one loads the recorded base's weights first
(after checking its fingerprint), then the adapter's. A full checkpoint loaded into a model with adapters is
its base: every base weight must be there, the adapters keep their initialisation.
"""
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica
from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.dist_checkpointing.optimizer import (get_optim_param_to_id_map, get_param_id_to_sharded_param_map,
                                                        make_sharded_optimizer_tensor, optim_state_to_sharding_state)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

from megaswift.checkpointing import collective
from megaswift.checkpointing.adapter import is_adapter_checkpoint, is_adapter_tensor, resolve_base
from megaswift.checkpointing.collective import broadcast_from_rank0, on_rank0_agreed
from megaswift.checkpointing.integrity import (FILES_KEY, check_weights_finite, damaged_files, intact_checkpoint,
                                               read_naming_damage, record_files)
from megaswift.checkpointing.layout import (HF_ASSETS, CheckpointError, copy_hf_assets, iteration_dir, read_latest,
                                            read_meta, temporary_dir, write_latest, write_meta)
from megaswift.checkpointing.space import free_bytes, human_bytes, is_disk_full, not_enough_space
from megaswift.checkpointing.param_groups import adopt_current_param_groups
from megaswift.checkpointing.rng import RngLoad, sharded_rng_state

SHARDING_TYPE_KEY = "distrib_optim_sharding_type"
RESHARDABLE_TYPE = "fully_reshardable"
SAVED_SHARDING_TYPE = RESHARDABLE_TYPE  # what save_checkpoint writes, read at call time
LEGACY_SHARDING_TYPE = "dp_reshardable"  # checkpoints that record no type were written with it
OPTIMIZER_PARTS_KEY = "distrib_optim_parts"  # how many chained optimizers (dense; dense + expert)
MAIN_COPIES_KEY = "fp32_from_fp16_params"  # the bf16/fp16 optimizer's fp32 main copies of the half weights
# Parallel sizes that change the distributed optimizer's flat buffers (DP does not).
MODEL_LAYOUT_KEYS = ("tensor", "pipeline", "virtual_pipeline", "context", "expert")


def model_state_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _inner_optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def is_distributed_optimizer(optimizer) -> bool:
    return any(isinstance(inner, DistributedOptimizer) for inner in _inner_optimizers(optimizer))


def trainable_names(chunk) -> set[str]:
    """The state-dict names of a chunk's trained parameters: in a LoRA run the adapters and modules_to_save."""
    return {name for name, param in _unwrap(chunk).named_parameters() if param.requires_grad}


def has_adapters(chunks: list) -> bool:
    return any(is_adapter_tensor(name) for chunk in chunks for name, _ in _unwrap(chunk).named_parameters())


def _model_state(chunk, keep) -> dict:
    state = _unwrap(chunk).sharded_state_dict()
    if keep is None:
        return state
    wanted = keep(chunk)
    return {name: value for name, value in state.items() if wanted(name)}


def _trained(chunk):
    return trainable_names(chunk).__contains__


def _base_weight(chunk):
    return lambda name: not is_adapter_tensor(name)


def sharded_training_state(chunks: list, optimizer=None, is_loading: bool = False,
                           sharding_type: str = RESHARDABLE_TYPE, keep=None) -> dict:
    """`keep(chunk)`: a predicate on the chunk's state-dict names choosing what to include (None: everything);
    a LoRA checkpoint keeps `_trained`."""
    state = {key: _model_state(chunk, keep) for key, chunk in zip(model_state_keys(chunks), chunks)}
    if optimizer is not None:
        # Every chunk's dict as it is, as Megatron-LM passes its whole state dict: megatron finds the weights by
        # walking the nested values. Merging the chunks' dicts into one loses all but the last virtual-pipeline
        # chunk's weights, whose local keys (decoder.layers.0...) repeat in every chunk.
        model_state = {key: state[key] for key in model_state_keys(chunks)}
        state["optimizer"] = optimizer_sharded_state(optimizer, model_state, is_loading,
                                                     metadata={SHARDING_TYPE_KEY: sharding_type})
    return state


def optimizer_sharded_state(optimizer, model_state: dict, is_loading: bool, metadata: dict):
    """megatron's optimizer.sharded_state_dict, except that its bf16/fp16 optimizers' part is built by
    float16_optimizer_sharded_state. Chained parts (dense + expert at parallel.expert > 1) are keyed and
    prefixed `chained_N.` as megatron's ChainedOptimizer does for this metadata."""
    inners = _inner_optimizers(optimizer)
    if not any(isinstance(inner, Float16OptimizerWithFloat16Params) for inner in inners):
        return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    if len(inners) > 1:
        optimizer._synchronize_steps()  # as ChainedOptimizer.sharded_state_dict does before saving
    parts = [float16_optimizer_sharded_state(inner, model_state, is_loading)
             if isinstance(inner, Float16OptimizerWithFloat16Params)
             else inner.sharded_state_dict(model_state, is_loading, metadata=metadata) for inner in inners]
    if len(parts) == 1:
        return parts[0]
    for index, part in enumerate(parts):
        add_prefix_for_sharding(part, f"chained_{index}.")
    return dict(enumerate(parts))


def float16_optimizer_sharded_state(inner, model_state: dict, is_loading: bool) -> dict:
    """The sharded state of megatron's bf16/fp16 (non-distributed) optimizer, as its own sharded_state_dict
    builds it but with every optimizer slot matched to its model weight.

    Why: megatron-core 0.19.2 numbers its id->weight map by the half-precision weights alone
    (`chain(self.float16_groups)`), while torch numbers the optimizer state by every parameter of the param
    groups. Megatron-LM casts the whole model to bf16 (Float16Module), so the two agree there; megaswift
    builds the model in bf16 but megatron-core's torch norms keep fp32 weights, which sit in the same param
    groups (fp32_from_fp32_groups). Their slots then match no weight ("Param id 9 does not match any model
    sharded param" at PP=2: 9 bf16 weights, then the norms' no-weight-decay group), or the wrong one where
    fp32 and bf16 weights share a group. Here each slot maps to its model weight: the bf16 weight for a
    main (fp32) copy, the weight itself for an fp32 parameter. The saved keys and layout are megatron's."""
    if is_loading:
        inner.init_state_fn(inner.optimizer, inner.config)
    state_dict = inner.state_dict()
    weight_of_main = {id(main): weight for weights, mains in zip(inner.float16_groups, inner.fp32_from_float16_groups)
                      for weight, main in zip(weights, mains)}
    # torch's state dict numbers the parameters in param-group order; the same walk gives each slot its weight
    slots = [param for group in inner.optimizer.param_groups for param in group["params"]]
    slot_of = get_optim_param_to_id_map(slots)
    sharded_weight = get_param_id_to_sharded_param_map(
        model_state, [weight_of_main.get(id(param), param) for param in slots])
    # Keyed by group index, not a list of groups: a group with no bf16 weight (the norms') is an empty list,
    # and dist_checkpointing's save drops the emptied lists from the common part but keeps that one, so its
    # load cannot merge the two again ("Cannot merge two lists with different lengths"). load_optimizer_state
    # turns the dict back into megatron's list.
    state_dict[MAIN_COPIES_KEY] = {
        index: [make_sharded_optimizer_tensor(sharded_weight[slot_of[id(main)]], main,
                                              prefix="optimizer.state.fp32_param") for main in mains]
        for index, mains in enumerate(state_dict[MAIN_COPIES_KEY])}
    step = inner._extract_common_per_param_step(state_dict["optimizer"])
    # The per-parameter steps are saved once, as megatron does (the load gives each parameter its own again).
    optim_state_to_sharding_state(state_dict["optimizer"], sharded_weight, exclude_keys="step")
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str | Path, iteration: int, chunks: list, optimizer, scheduler, meta: dict,
                    hf_assets_source: str | None = None) -> Path:
    """Writes iter_N/ atomically and points `latest` at it; returns the final folder. Refuses non-finite
    weights and a save that cannot fit; a disk that fills mid-save is a CheckpointError naming the folder.
    On any failure the unfinished folder is removed and `latest` keeps naming the previous checkpoint."""
    check_weights_finite(chunks, iteration)
    final = iteration_dir(root, iteration)
    # Every rank writes into the folder rank 0 names: a fresh nonce, so no other writer's folder is touched.
    tmp = Path(broadcast_from_rank0(str(temporary_dir(final)) if collective.rank() == 0 else None))
    # A LoRA/DoRA run's checkpoint holds what it trains; the frozen base stays in the checkpoint it names.
    keep = _trained if is_adapter_checkpoint(meta) else None
    state = sharded_training_state(chunks, optimizer, sharding_type=SAVED_SHARDING_TYPE, keep=keep)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state.update(sharded_rng_state())  # per rank: a resume with dropout draws what a straight run would
    needed = checkpoint_bytes(root, state)
    on_rank0_agreed(lambda: _make_room(tmp, needed, iteration), CheckpointError)
    try:
        dist_checkpointing.save(state, str(tmp))
        _barrier()
        files = record_files(tmp)
        contents = [*model_state_keys(chunks)] + (["optimizer", "scheduler"] if optimizer is not None else [])
        sharding = {SHARDING_TYPE_KEY: SAVED_SHARDING_TYPE, OPTIMIZER_PARTS_KEY: len(_inner_optimizers(optimizer))} \
            if is_distributed_optimizer(optimizer) else {}
        full_meta = {**meta, **sharding, "iteration": iteration, "contents": contents, FILES_KEY: files}
        on_rank0_agreed(lambda: _finish_save(tmp, final, full_meta, hf_assets_source, needed), CheckpointError)
    except BaseException as error:
        full = is_disk_full(error, tmp)
        if collective.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full and not isinstance(error, CheckpointError):
            raise CheckpointError(_disk_full_message(tmp, iteration, needed)) from error
        raise
    _barrier()
    return final


def _make_room(tmp: Path, needed: int, iteration: int) -> None:
    shortage = not_enough_space(tmp.parent, needed)
    if shortage:
        raise CheckpointError(f"not saving checkpoint iteration {iteration}: {shortage} (estimated from the "
                              f"tensors to save and the previous checkpoint). {_MAKE_ROOM}")
    tmp.mkdir(parents=True)


_MAKE_ROOM = ("Free space there (checkpoint.keep_last N keeps only the newest N checkpoints) or point "
              "checkpoint.save at a larger disk, then rerun the same command to resume from `latest`")


def _disk_full_message(tmp: Path, iteration: int, needed: int) -> str:
    return (f"the disk holding {tmp.parent} ran out of space while writing checkpoint iteration {iteration} "
            f"into {tmp.name}: {human_bytes(free_bytes(tmp.parent))} free now that the unfinished folder is "
            f"removed; this checkpoint needs about {human_bytes(needed)}. `latest` still names the previous "
            f"checkpoint. {_MAKE_ROOM}")


def _finish_save(tmp: Path, final: Path, meta: dict, hf_assets_source, needed: int) -> None:
    """Rank 0: records the metadata, renames the folder into place, and only then moves `latest`."""
    try:
        write_meta(tmp, meta)
        copy_hf_assets(hf_assets_source, tmp / HF_ASSETS)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_latest(final.parent, meta["iteration"])
    except OSError as e:
        if is_disk_full(e, tmp.parent):
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_disk_full_message(tmp, meta["iteration"], needed)) from e
        raise


def checkpoint_bytes(root: str | Path, state: dict) -> int:
    """About how many bytes a save of `state` writes: the tensors' bytes (main replicas only, summed over
    ranks), or the previous checkpoint's size in `root` where that is larger (it counts the file overhead)."""
    local = sum(t.data.nbytes for t in nested_values(state) if isinstance(t, (ShardedTensor, ShardedTensorFactory))
                and torch.is_tensor(t.data) and is_main_replica(t.replica_id))
    total = torch.tensor([float(local)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        total = total.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(total)
    return max(int(total.item()), previous_checkpoint_bytes(root))


def previous_checkpoint_bytes(root: str | Path) -> int:
    try:
        latest = read_latest(root)
    except CheckpointError:
        return 0
    if latest is None:
        return 0
    records = read_meta(iteration_dir(root, latest)).get(FILES_KEY) or {}
    return sum(record["size"] for record in records.values())


def restore_adam_steps(optimizer) -> None:
    """torch's AdamW (megatron's fallback without Apex) keeps a `step` tensor per parameter. megatron's
    distributed optimizer restores the step into ONE tensor shared by every parameter (so each update
    advances it once per parameter), and its per-parameter state load then writes back the placeholder
    steps it was primed with. Either way resumed training silently diverges. The true step is in the
    param groups: give every parameter its own tensor holding it."""
    for inner in _inner_optimizers(optimizer):
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
    for inner in _inner_optimizers(optimizer):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:
            continue
        inner.init_state_fn(torch_optimizer, inner.config)
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                torch_optimizer.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def current_model_layout(chunks: list) -> dict:
    """This run's parallel sizes, named as in ParallelConfig (and in megaswift.json's "parallel")."""
    return {"tensor": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline": len(chunks) if len(chunks) > 1 else None,
            "context": parallel_state.get_context_parallel_world_size(),
            "expert": parallel_state.get_expert_model_parallel_world_size()}


def check_reshardable(ckpt_dir: Path, meta: dict, sharding_type: str, layout: dict) -> None:
    """A dp_reshardable optimizer state loads only at the TP/PP/VPP/CP/EP it was saved at: say so up front,
    instead of megatron-core's global-shape mismatch deep inside the load."""
    saved_with = meta.get("parallel") or {}
    if sharding_type != LEGACY_SHARDING_TYPE or not saved_with.get("distributed_optimizer"):
        return
    saved = {key: saved_with.get(key) for key in MODEL_LAYOUT_KEYS}
    if all(saved[key] == layout[key] or {saved[key], layout[key]} <= {None, 1} for key in MODEL_LAYOUT_KEYS):
        return

    def show(sizes):
        return ", ".join(f"parallel.{key}={sizes[key]}" for key in MODEL_LAYOUT_KEYS)
    raise CheckpointError(
        f"{ckpt_dir} holds distributed-optimizer state in the {LEGACY_SHARDING_TYPE} format, which loads only at "
        f"the model-parallel layout it was saved at ({show(saved)}); this run asks for {show(layout)}. Resume it "
        f"once at the saved layout and save again (megaswift now saves {RESHARDABLE_TYPE}, which reshards), "
        f"or load only its weights with checkpoint.finetune=true")


def check_same_optimizer_kind(ckpt_dir: Path, meta: dict, optimizer) -> None:
    """The distributed and the plain optimizer save different state layouts; megatron-core fails deep in the
    load (or worse) when one is asked to read the other's, so name the mismatch up front."""
    saved = bool((meta.get("parallel") or {}).get("distributed_optimizer"))
    wanted = is_distributed_optimizer(optimizer)
    if saved != wanted:
        raise CheckpointError(
            f"{ckpt_dir} was saved with parallel.distributed_optimizer={str(saved).lower()}, but this run uses "
            f"parallel.distributed_optimizer={str(wanted).lower()}: their optimizer states differ in layout. Resume "
            f"with parallel.distributed_optimizer={str(saved).lower()}, or load only the weights with "
            f"checkpoint.finetune=true")


def check_optimizer_parts(ckpt_dir: Path, meta: dict, optimizer) -> None:
    """megatron-core keeps expert parameters in an optimizer of their own only where they use expert process
    groups (parallel.expert > 1): going between EP=1 and EP>1 changes the chained optimizers' structure,
    which 0.19.2 cannot map (KeyError on the `chained_N.` keys). Refuse that before reading tensors."""
    saved, wanted = meta.get(OPTIMIZER_PARTS_KEY), len(_inner_optimizers(optimizer))
    if saved is None or saved == wanted:
        return
    saved_expert = (meta.get("parallel") or {}).get("expert")
    raise CheckpointError(
        f"{ckpt_dir} holds distributed-optimizer state in {saved} part(s) (dense, and expert parameters apart "
        f"when parallel.expert > 1; saved at parallel.expert={saved_expert}) but this run builds {wanted}: "
        f"megatron-core cannot map one onto the other. Resume with parallel.expert > 1 if it was saved so, "
        f"or 1 if not (any value on the same side works), or load only its weights with checkpoint.finetune=true")


def load_optimizer_state(optimizer, loaded: dict, sharding_type: str) -> None:
    """Loads what dist_checkpointing read into `optimizer`, working around the fully_reshardable step
    KeyError of torch's AdamW (module docstring): param groups (with the step) first, then each distributed
    optimizer's parameter state without per-parameter steps, then one step tensor per parameter."""
    inners = _inner_optimizers(optimizer)
    parts = [loaded] if len(inners) == 1 else [loaded[index] for index in sorted(loaded)]
    param_states = [part.pop("param_state", None) if sharding_type == RESHARDABLE_TYPE else None
                    for part in parts]
    for part in parts:  # the Float16 optimizer's main copies, saved per group index (float16_optimizer_sharded_state)
        if isinstance(part.get(MAIN_COPIES_KEY), dict):
            part[MAIN_COPIES_KEY] = [part[MAIN_COPIES_KEY][index] for index in sorted(part[MAIN_COPIES_KEY])]
    adopt_current_param_groups(inners, parts)  # a changed train.lr etc. wins over the saved one
    with torch.no_grad():
        optimizer.load_state_dict(loaded)
        for inner, param_state in zip(inners, param_states):
            if param_state is None:
                continue
            for state in inner.optimizer.state.values():
                state.pop("step", None)
            inner.load_parameter_state_from_fully_reshardable(param_state)
    restore_adam_steps(optimizer)


def load_checkpoint(ckpt_dir: str | Path, chunks: list, optimizer=None, scheduler=None, verify: bool = True,
                    fallback: bool = False) -> int:
    """Loads model weights (and optimizer/scheduler when given); returns the checkpoint's iteration. `verify`
    checks the files against their recorded sums first; `fallback` then loads the previous complete
    checkpoint instead of a damaged one (the iteration returned is the one loaded)."""
    from megaswift.checkpointing.foreign import is_foreign_checkpoint, load_foreign_checkpoint
    if is_foreign_checkpoint(ckpt_dir):  # Megatron-LM & co. (no megaswift.json): weights only, no recorded sums
        return load_foreign_checkpoint(ckpt_dir, chunks, optimizer)
    ckpt_dir = intact_checkpoint(Path(ckpt_dir), fallback) if verify else Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    adapters, adapter_checkpoint = has_adapters(chunks), is_adapter_checkpoint(meta)
    check_model_kind(ckpt_dir, meta, adapters, optimizer is not None)
    if adapters:  # the frozen base first: the checkpoint itself (a full one) or the one it records
        base = resolve_base(ckpt_dir, meta) if adapter_checkpoint else ckpt_dir
        if adapter_checkpoint and verify:  # callers that verified up front (the Trainer) pass verify=False
            check_base_intact(base, ckpt_dir)
        base_weights = _load_model_weights(base, chunks, _base_weight)
        if not adapter_checkpoint:
            from megaswift.tuners import init_dora_magnitudes
            for key, chunk in zip(model_state_keys(chunks), chunks):
                initial = {k: v for k, v in _unwrap(chunk).state_dict().items() if is_adapter_tensor(k)}
                _unwrap(chunk).load_state_dict({**initial, **base_weights[key]}, strict=True)
            init_dora_magnitudes([_unwrap(chunk) for chunk in chunks])  # DoRA starts at the loaded base's norms
            return int(meta["iteration"])
    saved_chunks = [c for c in meta.get("contents", []) if c.startswith("model")]
    if optimizer is not None and "optimizer" not in meta.get("contents", []):
        raise CheckpointError(f"{ckpt_dir} holds no optimizer state (contents: {meta.get('contents')}); "
                              f"load it with checkpoint.finetune=true to start training from its weights")
    if not saved_chunks:
        raise CheckpointError(f"{ckpt_dir}/megaswift.json lists no model state in 'contents'")
    sharding_type = meta.get(SHARDING_TYPE_KEY, LEGACY_SHARDING_TYPE)
    if optimizer is not None:
        check_same_optimizer_kind(ckpt_dir, meta, optimizer)
    if optimizer is not None and is_distributed_optimizer(optimizer):
        check_reshardable(ckpt_dir, meta, sharding_type, current_model_layout(chunks))
        check_optimizer_parts(ckpt_dir, meta, optimizer)
    if optimizer is not None:
        prime_optimizer_state(optimizer)
    state = sharded_training_state(chunks, optimizer, is_loading=True, sharding_type=sharding_type,
                                   keep=_trained if adapters else None)
    rng = read_naming_damage(lambda: RngLoad(ckpt_dir), ckpt_dir) if optimizer is not None else None  # a full resume continues the random draws
    state.update(rng.request() if rng else {})
    # Virtual-pipeline chunks hold layer subsets; on disk every layer has a global key, so any chunking loads.
    # Unexpected keys are fine (a weights-only load skips the optimizer's); a missing key fails the load.
    loaded = read_naming_damage(
        lambda: dist_checkpointing.load(state, str(ckpt_dir), strict=StrictHandling.ASSUME_OK_UNEXPECTED), ckpt_dir)
    for key, chunk in zip(model_state_keys(chunks), chunks):
        weights = {**base_weights[key], **loaded[key]} if adapters else loaded[key]  # modules_to_save: trained
        _unwrap(chunk).load_state_dict(weights, strict=True)
    if optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"], sharding_type)
        if scheduler is not None:
            common = read_naming_damage(lambda: dist_checkpointing.load_common_state_dict(str(ckpt_dir)), ckpt_dir)
            scheduler.load_state_dict(common["scheduler"])
        rng.restore(loaded, (meta.get("config") or {}).get("train", {}).get("seed", 0), int(meta["iteration"]))
    return int(meta["iteration"])


def check_model_kind(ckpt_dir: Path, meta: dict, adapters: bool, with_optimizer: bool) -> None:
    """An adapter checkpoint needs a model with adapters (it holds no base), and a full checkpoint can seed a
    LoRA run's base but not its optimizer: say which, before reading tensors."""
    if is_adapter_checkpoint(meta) and not adapters:
        kind, base = meta["adapter"]["type"], meta["adapter"]["base"]["path"]
        raise CheckpointError(
            f"{ckpt_dir} is a {kind} adapter checkpoint (the adapters only, on the base {base}), "
            f"but this run trains the full model (tuner.type full). Train it as it was trained (--tuner.type {kind}), "
            f"or export it merged into a full model first (megaswift convert mcore2hf {ckpt_dir} OUT --merge)")
    if adapters and not is_adapter_checkpoint(meta) and with_optimizer:
        raise CheckpointError(
            f"{ckpt_dir} is a full checkpoint; this run trains adapters (tuner.type lora/dora), whose optimizer state "
            f"it cannot hold. Load it as the frozen base: --checkpoint.load {ckpt_dir} with a new checkpoint.save "
            f"(its weights only)")


def check_base_intact(base: Path, adapter_dir: Path) -> None:
    problems = damaged_files(base)
    if problems:
        raise CheckpointError(f"the base checkpoint {base} of the adapter checkpoint {adapter_dir} is damaged: "
                              f"{'; '.join(problems[:5])}. Restore the file from a copy")


def _load_model_weights(ckpt_dir: Path, chunks: list, keep) -> dict:
    """Each chunk's weights that `keep` selects, read from `ckpt_dir` (every one of them must be there)."""
    state = sharded_training_state(chunks, keep=keep)
    loaded = read_naming_damage(
        lambda: dist_checkpointing.load(state, str(ckpt_dir), strict=StrictHandling.ASSUME_OK_UNEXPECTED), ckpt_dir)
    return {key: loaded[key] for key in model_state_keys(chunks)}
