"""What megatron-core expects on disk for a model, read off a GPTModel built on the meta device.

The model is built at TP=PP=EP=1 with the local spec (no memory: meta tensors), and its own
`sharded_state_dict()` says, for each state-dict tensor, the on-disk key (layers stacked along a
prepended axis, experts along a second one), the global shape and this tensor's offset in it. Writing
exactly these makes the checkpoint loadable by `dist_checkpointing.load` at any TP/PP/VPP/EP.
"""
from dataclasses import dataclass

import torch

from converters.process_group import single_process_model_parallel


@dataclass(frozen=True)
class McoreTensor:
    name: str                       # GPTModel state-dict name, e.g. decoder.layers.3.mlp.linear_fc1.weight
    key: str                        # on-disk key, e.g. decoder.layers.mlp.linear_fc1.weight
    global_shape: tuple[int, ...]   # e.g. (layers, 2*ffn, hidden)
    offset: tuple[int, ...]         # where this tensor sits in the global one, e.g. (3, 0, 0)
    shape: tuple[int, ...]          # this tensor's own shape, e.g. (2*ffn, hidden)
    allow_shape_mismatch: bool      # vocab-padded tensors: the padded size depends on TP

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        return (1,) * (len(self.global_shape) - len(self.shape)) + self.shape


@dataclass(frozen=True)
class McoreObject:
    key: str      # ShardedObject.unique_key, e.g. decoder.layers.self_attention.linear_qkv._extra_state/shard_0_4
    data: object  # what the local spec stores (None): written as mcore does, torch.save([data])


@dataclass(frozen=True)
class McoreLayout:
    tensors: dict[str, McoreTensor]
    objects: list[McoreObject]


def _describe(name: str, chunks: list, shape: tuple[int, ...]) -> McoreTensor:
    """At TP=1 a tensor is one chunk, or two for megatron's swiglu fc1 (gate and up halves)."""
    first = chunks[0]
    prepend = len(first.global_shape) - len(shape)
    if any(c.key != first.key or c.global_offset[:prepend] != first.global_offset[:prepend] for c in chunks):
        raise AssertionError(f"{name}: unexpected chunking at TP=1: {chunks}")
    return McoreTensor(name=name, key=first.key, global_shape=tuple(first.global_shape),
                       offset=tuple(first.global_offset[:prepend]) + (0,) * len(shape), shape=shape,
                       allow_shape_mismatch=first.allow_shape_mismatch)


def build_meta_model(hf: dict):
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks

    config = hf_to_transformer_config(hf, ParallelConfig())
    config.perform_initialization = False
    with torch.device("meta"):
        (model,) = build_model_chunks(hf, config)
    return model


def mcore_layout(hf: dict, metadata: dict | None = None, prefix: str = "", replicated: bool = False) -> McoreLayout:
    """`metadata`, `prefix`: passed to sharded_state_dict(), for checkpoints other tools wrote (per-layer keys
    with {'non_homogeneous_layers': True}, a key prefix); the tensors stay named by their state-dict name.
    `replicated`: every rank of a multi-process conversion's group computes it at once (see process_group)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    with single_process_model_parallel(replicated):
        model = build_meta_model(hf)
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
        sharded = {name.removeprefix(prefix): value
                   for name, value in model.sharded_state_dict(prefix=prefix, metadata=metadata).items()}
        apply_factories(sharded)
    tensors, objects = {}, []
    for name, value in sharded.items():
        items = value if isinstance(value, list) else [value]
        if all(isinstance(v, ShardedObject) for v in items):
            objects += [McoreObject(v.unique_key, v.data) for v in items]
        elif all(isinstance(v, ShardedTensor) for v in items):
            tensors[name] = _describe(name, items, shapes[name])
        else:
            raise AssertionError(f"{name}: unexpected sharded state dict entry {items}")
    # dist_checkpointing.save stores the non-sharded part of the state dict (empty for a model) as this
    # object, and dist_checkpointing.load requires it.
    objects.append(McoreObject(ShardedObject("common_state", None, (1,), (0,)).unique_key, {}))
    return McoreLayout(tensors, objects)
