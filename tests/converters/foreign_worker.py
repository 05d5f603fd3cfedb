"""torchrun worker: write checkpoints the way Megatron-LM's save_checkpoint does (torch_dist), from a GPTModel
at TP/PP holding a tiny model's weights, for tests/converters/test_foreign_checkpoint.py.

    torchrun --nproc-per-node 4 foreign_worker.py SOURCE_CKPT OUT_ROOT --tp 2 --pp 2 --iteration 100

SOURCE_CKPT: a megaswift checkpoint (hf2mcore output) the weights are loaded from. OUT_ROOT/stacked,
OUT_ROOT/per_layer and OUT_ROOT/prefixed each get Megatron-LM's layout (latest_checkpointed_iteration.txt and
iter_%07d/), saved by megatron-core's dist_checkpointing.save from a state dict shaped as Megatron-LM's
generate_state_dict shapes it ("args", "checkpoint_version", "iteration", "model", "optimizer", "rng_state"):
with megatron-core's default stacked layer keys, with per-layer keys (metadata non_homogeneous_layers=True),
and with every key behind "module.". No megaswift file is written.
"""
import argparse
import os
from pathlib import Path

import torch

# name -> (sharded_state_dict metadata, key prefix): megatron-core's default, its per-layer form, and a wrapper's
# prefix on every key (as NeMo's "module.").
VARIANTS = {"stacked": (None, ""), "per_layer": ({"non_homogeneous_layers": True}, ""), "prefixed": (None, "module.")}


def megatron_lm_state(chunk, args, iteration: int, metadata: dict | None, prefix: str) -> dict:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank())
    return {
        "args": args, "checkpoint_version": 3.0, "iteration": iteration,
        "model": chunk.sharded_state_dict(prefix=prefix, metadata=metadata),
        # Optimizer moments are keyed after the parameters they belong to (optimizer.state.exp_avg.<param key>);
        # their values do not matter here, only that readers skip them.
        "optimizer": {"state": {"exp_avg": chunk.sharded_state_dict(prefix="optimizer.state.exp_avg.",
                                                                    metadata=metadata)}},
        "rng_state": [ShardedObject("rng_state", {"random_rng_state": torch.get_rng_state()}, (pp, tp), rank,
                                    replica_id=parallel_state.get_data_parallel_rank())],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--iteration", type=int, default=100)
    args = parser.parse_args()
    from megaswift.platform.cpu import apply_cpu_patches
    apply_cpu_patches()
    torch.distributed.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megaswift.checkpointing.layout import read_meta
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    model_parallel_cuda_manual_seed(1234)
    source = Path(args.source) / "iter_0000000"
    hf = read_meta(source)["hf_config"]
    config = hf_to_transformer_config(hf, ParallelConfig(tensor=args.tp, pipeline=args.pp))
    config.perform_initialization = False
    (chunk,) = build_model_chunks(hf, config)
    loaded = dist_checkpointing.load({"model": chunk.sharded_state_dict()}, str(source))
    chunk.load_state_dict(loaded["model"], strict=True)
    saved_args = argparse.Namespace(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                    num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                                    ckpt_format="torch_dist")
    for name, (metadata, prefix) in VARIANTS.items():
        root = Path(args.out) / name
        folder = root / f"iter_{args.iteration:07d}"
        if torch.distributed.get_rank() == 0:
            folder.mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save(megatron_lm_state(chunk, saved_args, args.iteration, metadata, prefix), str(folder))
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:  # Megatron-LM writes the tracker last, as plain digits
            (root / "latest_checkpointed_iteration.txt").write_text(str(args.iteration))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing.save spawns a process that re-imports __main__
    main()
