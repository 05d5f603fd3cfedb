"""Checkpoints megaswift did not write: Megatron-LM, Megatron-Bridge and ms-swift save with Megatron-LM's
conventions, in megatron-core's torch_dist format.

    ROOT/
      latest_checkpointed_iteration.txt   the newest iteration as digits ("100"), or "release"
      iter_0000100/  (or release/)        a dist_checkpointing folder: .metadata, *.distcp, common.pt, metadata.json

Megatron-LM's state dict nests each model chunk under "model" (or "model0", "model1", ... for virtual
pipeline chunks), beside "optimizer", "rng_state", "args", "iteration"; dist_checkpointing stores every tensor
under its ShardedTensor key, so on disk the chunk names are gone and the model's keys are GPTModel's own
(embedding., decoder., output_layer.). How the decoder layers are keyed depends on how the model's
sharded_state_dict() was asked: stacked along a leading layer axis (decoder.layers.mlp.linear_fc1.weight with
shape (layers, ...), megatron-core's default for homogeneous layers) or one key per layer
(decoder.layers.3.mlp.linear_fc1.weight: non_homogeneous_layers, which megatron-core forces for mixed
dense/MoE stacks and for singleton_local_shards). Some wrappers prefix every key (NeMo: "module."). The layout
is read off the stored keys; megatron-core itself then produces the matching sharded state dict.

Such a folder carries no HF config, so the user names it; only the weights are used (the optimizer, RNG and
data position of another trainer are not megaswift's to resume).
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from megaswift.checkpointing.layout import LATEST_FILE, META_FILE, CheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's name for `latest`
RELEASE_DIR = "release"
DCP_METADATA = ".metadata"
BACKEND_FILE = "metadata.json"  # dist_checkpointing's record of the format
KEY_PREFIXES = ("", "model.", "module.")
MODEL_KEY_STARTS = ("embedding.", "decoder.", "output_layer.")
# Entries of a training state that are not the model's: another trainer's optimizer, RNG and rerun state.
TRAINING_STATE_STARTS = ("optimizer.", "rng_state", "rerun_state_machine")
_PER_LAYER_KEY = re.compile(r"decoder\.layers\.\d+\.")
_ITERATION_NAME = re.compile(r"^iter_(\d{7})$")


@dataclass(frozen=True)
class ForeignCheckpoint:
    folder: Path          # the iter_* (or release) folder holding the torch_dist files
    iteration: int        # 0 for a release folder
    prefix: str           # what precedes GPTModel's keys on disk ("" for Megatron-LM)
    per_layer: bool       # decoder.layers.N.* keys instead of tensors stacked along a layer axis
    tensors: dict         # stored key -> TensorStorageMetadata (global shape, dtype), optimizer entries included
    # The .metadata as read (torch.distributed.checkpoint's Metadata): a reader of the tensors takes it
    # instead of reading the file again.
    metadata: object = field(default=None, repr=False, compare=False)

    @property
    def sharded_metadata(self) -> dict | None:
        """What GPTModel.sharded_state_dict() takes to produce this checkpoint's keys."""
        return {"non_homogeneous_layers": True} if self.per_layer else None

    @property
    def model_keys(self) -> list[str]:
        return sorted(k for k in self.tensors if not k.startswith(TRAINING_STATE_STARTS))

    def describe(self) -> str:
        layers = "one key per layer (decoder.layers.N.*)" if self.per_layer else "layers stacked along a leading axis"
        return f"{self.folder}: torch_dist, {layers}, key prefix {self.prefix!r}"


def is_megaswift_checkpoint(path: str | Path) -> bool:
    """A folder megaswift wrote: a run's checkpoint.save root (its `latest`) or an iter_* folder (megaswift.json)."""
    path = Path(path)
    return (path / META_FILE).is_file() or (path / LATEST_FILE).is_file()


def is_foreign_checkpoint(path: str | Path) -> bool:
    """A Megatron-LM-style root (its tracker file) or iteration folder (torch_dist files, no megaswift.json)."""
    path = Path(path)
    if is_megaswift_checkpoint(path):
        return False
    return (path / TRACKER_FILE).is_file() or (path / DCP_METADATA).is_file() or \
        any(path.glob("mp_rank_*")) or any(path.glob("iter_*/mp_rank_*"))


def _iteration_folder(path: Path) -> tuple[Path, int]:
    """Megatron-LM's own rule: the tracker names an iteration (iter_%07d) or "release"."""
    tracker = path / TRACKER_FILE
    if not tracker.is_file():
        match = _ITERATION_NAME.match(path.name)
        return path, int(match.group(1)) if match else 0
    text = tracker.read_text().strip()
    if text == RELEASE_DIR:
        folder, iteration = path / RELEASE_DIR, 0
    elif text.isdigit():
        folder, iteration = path / f"iter_{int(text):07d}", int(text)
    else:
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
    if not folder.is_dir():
        raise CheckpointError(f"{tracker} names iteration {text}, but {folder} does not exist: pass the iter_* "
                              f"folder to use instead of {path}")
    return folder, iteration


def _check_torch_dist(folder: Path) -> None:
    if any(folder.glob("mp_rank_*")):
        raise CheckpointError(f"{folder} is in Megatron-LM's legacy 'torch' format (mp_rank_*/model_optim_rng.pt), "
                              f"which megaswift does not read; re-save it as torch_dist (Megatron-LM: "
                              f"--ckpt-convert-format torch_dist --ckpt-convert-save DIR)")
    backend_file = folder / BACKEND_FILE
    if backend_file.is_file():
        try:
            backend = json.loads(backend_file.read_text()).get("sharded_backend")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{backend_file}: not dist_checkpointing's metadata ({e})") from None
        if backend != "torch_dist":
            raise CheckpointError(f"{backend_file}: sharded_backend={backend!r}; megaswift reads 'torch_dist' "
                                  f"checkpoints (re-save it with --ckpt-format torch_dist)")
    if not (folder / DCP_METADATA).is_file():
        raise CheckpointError(f"{folder} has no {DCP_METADATA}: not a torch_dist checkpoint (an unfinished save?)")


def _read_metadata(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader
    try:
        return FileSystemReader(str(folder)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{folder / DCP_METADATA}: cannot read the checkpoint's metadata: {e}") from e


def _stored_tensors(metadata) -> dict:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    return {k: md for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}


def open_foreign_checkpoint(path: str | Path) -> ForeignCheckpoint:
    """The iteration folder of a Megatron-LM-style checkpoint (root or iter_* folder) and its key layout."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    folder, iteration = _iteration_folder(path)
    _check_torch_dist(folder)
    metadata = _read_metadata(folder)
    tensors = _stored_tensors(metadata)
    model = [k for k in tensors if not k.startswith(TRAINING_STATE_STARTS)]
    prefixes = [p for p in KEY_PREFIXES if any(k.startswith(tuple(p + s for s in MODEL_KEY_STARTS)) for k in model)]
    if len(prefixes) != 1:
        found = f"keys under several of {prefixes}" if prefixes else ", ".join(sorted(model)[:8]) or "no tensors"
        raise CheckpointError(f"{folder}: cannot tell where megatron-core GPTModel's tensors are: expected keys "
                              f"starting with {', '.join(MODEL_KEY_STARTS)} (optionally after one of "
                              f"{', '.join(repr(p) for p in KEY_PREFIXES[1:])}); found {found}")
    (prefix,) = prefixes
    per_layer = any(_PER_LAYER_KEY.match(k.removeprefix(prefix)) for k in model)
    return ForeignCheckpoint(folder, iteration, prefix, per_layer, tensors, metadata)


def load_foreign_weights(ckpt: ForeignCheckpoint, chunks: list) -> None:
    """Loads each model chunk's weights from `ckpt` with megatron-core's own loader, whatever TP/PP/VPP saved
    it: megatron-core's sharded_state_dict, asked for this checkpoint's key layout, says where each local
    shard is. The checkpoint's other entries (optimizer, RNG) are left unread."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megaswift.checkpointing.state import _unwrap, model_state_keys
    names = model_state_keys(chunks)
    state = {name: _unwrap(chunk).sharded_state_dict(prefix=ckpt.prefix, metadata=ckpt.sharded_metadata)
             for name, chunk in zip(names, chunks)}
    loaded = dist_checkpointing.load(state, str(ckpt.folder), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    for name, chunk in zip(names, chunks):
        _unwrap(chunk).load_state_dict({k.removeprefix(ckpt.prefix): v for k, v in loaded[name].items()}, strict=True)


def load_foreign_checkpoint(path: str | Path, chunks: list, optimizer=None) -> int:
    """checkpointing/state.py's load_checkpoint for such a checkpoint: weights only; returns its iteration."""
    if optimizer is not None:
        raise CheckpointError(f"{path} was not written by megaswift: only its weights can be loaded, not "
                              f"another trainer's optimizer state; load it with checkpoint.finetune=true")
    ckpt = open_foreign_checkpoint(path)
    load_foreign_weights(ckpt, chunks)
    return ckpt.iteration
