"""Two processes: the torch layer spec against megatron-core's local spec, at TP=2 and then PP=2.

    torchrun --nproc-per-node 2 tests/models/torch_attention_worker.py --out DIR

For each layout, builds tiny-llama twice from the same weights (megaswift's builder: the local spec, and
the torch spec loaded with the local model's state dict), then runs one megatron-core forward-backward
schedule over three sets of micro-batches made by megaswift's SFT data source (tests/gpu/packed_thd_worker):
    plain    every sample alone in its row (right padding, causal attention, no mask);
    packed   the samples packed into rows with their block-diagonal masks;
    control  the packed rows without masks, so attention crosses samples: how large a difference a
             leak would make (torch spec only).
Each rank writes DIR/<layout>-rank<r>.json: the losses (the last pipeline stage's; None elsewhere) and,
per compared pair, the relative L2 difference of this rank's gradients (its own TP shard / PP stage).
"""
import argparse
import json
from pathlib import Path

import torch

from tests.gpu.packed_thd_worker import SEED, SEQ, batches, relative_differences, sample_dataset

INIT_STD = 0.2  # attention far from uniform, so a wrong mask shows
MICRO = {"plain": 4, "packed": 1, "control": 1}
LAYOUTS = {"tp2": {"tensor": 2}, "pp2": {"pipeline": 2}}


def micro_batches(batch: dict, micro: int) -> list[dict]:
    rows = batch["tokens"].size(0)
    return [{key: value[i:i + micro] for key, value in batch.items()} for i in range(0, rows, micro)]


def loss_and_grads(model, batch: dict, micro: int, forward_backward) -> tuple[float | None, dict]:
    """One megatron-core schedule over the batch's micro-batches; loss = weighted CE sum / label tokens."""
    from megaswift.objectives.base import TOTALS
    from megaswift.train.forward_step import make_forward_step

    model.zero_grad(set_to_none=True)
    parts = micro_batches(batch, micro)
    records = forward_backward(forward_step_func=make_forward_step(), data_iterator=iter(parts), model=[model],
                               num_microbatches=len(parts), seq_length=SEQ, micro_batch_size=micro,
                               forward_only=False)
    loss = None
    if records:  # the last pipeline stage
        totals = torch.stack([r[TOTALS] for r in records]).sum(0)
        loss = float(totals[0] / totals[1])
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss, grads


def compare_layout(name: str, parallel, data: dict, out: Path, rank: int) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaswift.models import hf_to_transformer_config, preset_hf_config
    from megaswift.models.builder import build_model_chunks

    hf = preset_hf_config("tiny-llama")
    config = hf_to_transformer_config(hf, parallel, init_std=INIT_STD)
    config.batch_p2p_comm = False  # as the trainer on CPU (docs: batched p2p on gloo)
    (local,) = build_model_chunks(hf, config, "local")
    (torch_spec,) = build_model_chunks(hf, config, "torch")
    torch_spec.load_state_dict(local.state_dict())
    run = get_forward_backward_func()
    results = {"attention_class": type(torch_spec.decoder.layers[0].self_attention.core_attention).__name__}
    losses, grads = {}, {}
    for kind in ("plain", "packed"):
        for spec, model in (("local", local), ("torch", torch_spec)):
            losses[f"{spec}_{kind}"], grads[f"{spec}_{kind}"] = loss_and_grads(model, data[kind], MICRO[kind], run)
    losses["torch_control"], grads["torch_control"] = loss_and_grads(torch_spec, data["control"], 1, run)
    pairs = {"torch_vs_local_plain": ("torch_plain", "local_plain"),
             "torch_vs_local_packed": ("torch_packed", "local_packed"),
             "torch_packed_vs_plain": ("torch_packed", "torch_plain"),
             "torch_control_vs_plain": ("torch_control", "torch_plain")}
    results["losses"] = losses
    results["grad_rel_diff"] = {pair: relative_differences(grads[a], grads[b])["__all__"]
                                for pair, (a, b) in pairs.items()}
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from megaswift.config import ParallelConfig
    from megaswift.models import preset_hf_config
    from megaswift.train.distributed import init_distributed, shutdown_distributed

    from megatron.core import parallel_state

    data = batches(sample_dataset(preset_hf_config("tiny-llama")["vocab_size"]), "mask")
    try:
        for name, layout in LAYOUTS.items():
            parallel = ParallelConfig(**layout)
            world = init_distributed(parallel, SEED)  # the process group stays; megatron's groups are new
            compare_layout(name, parallel, data, args.out, world.rank)
            parallel_state.destroy_model_parallel()
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
