"""torchrun worker (2 processes): megaswift LoRA/DoRA at several parallel layouts in ONE launch, the
layouts run one after another in the same process group.

    torchrun --nproc-per-node 2 lora_worker.py SPEC_JSON RESULTS_DIR

SPEC_JSON: {"cases": [{"name", "tp", "pp", "ep", "sp", "family", "kind", "ckpt", "adapter" (.pt of PEFT
tensors, or null), "adapter_ckpt_load" (a dist checkpoint of the adapter to load instead), "tokens",
"save_adapter_ckpt" (optional folder), "train" (optional: {"batches", "optim"})}]}
Each case writes, from the rank holding TP rank 0 of the last stage, `{name}.pt`: logits, and for
training the per-step losses and the final adapter as PEFT tensors.
"""
import argparse
import json
import os
from pathlib import Path

import torch


def init_layout(case: dict):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=case["tp"],
                                             pipeline_model_parallel_size=case["pp"],
                                             expert_model_parallel_size=case["ep"])
    model_parallel_cuda_manual_seed(1234)


def adapter_sharded_state(chunks) -> dict:
    from megaswift.checkpointing.state import model_state_keys
    out = {}
    for name, chunk in zip(model_state_keys(chunks), chunks):
        out[name] = {k: v for k, v in chunk.sharded_state_dict().items() if ".adapter." in k}
    return out


def train(chunks, config, batches: list[torch.Tensor], optim: dict) -> tuple[list[float], list[float]]:
    """megatron-core's DDP, optimizer (via megaswift's builders) and schedule; one micro-batch per step."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaswift.config import ParallelConfig, TrainConfig
    from megaswift.train.optimizer import build_optimizer, build_scheduler, wrap_with_ddp

    settings = TrainConfig(lr=optim["lr"], min_lr=optim["lr"], lr_decay_style="constant", lr_warmup_iters=0,
                           weight_decay=optim["weight_decay"], adam_beta1=optim["betas"][0],
                           adam_beta2=optim["betas"][1], adam_eps=optim["eps"], clip_grad=optim["clip_grad"],
                           train_iters=len(batches))
    model = wrap_with_ddp(chunks, config, ParallelConfig(tensor=2, sequence_parallel=config.sequence_parallel))
    optimizer = build_optimizer(model, settings, ParallelConfig(), torch.float32)
    scheduler = build_scheduler(optimizer, settings)
    config.no_sync_func = model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    losses, norms = [], []
    for step, tokens in enumerate(batches, start=1):
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)

        def forward_step(data_iterator, module):
            next(data_iterator)
            out = module(inputs, positions, None, labels=labels)

            def loss_func(per_token):
                loss = per_token.float().sum() / per_token.numel()
                return loss, {"loss": loss.detach()}
            return out, loss_func

        for m in model:
            m.train()
            m.zero_grad_buffer()
        optimizer.zero_grad()
        result = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]),
                                             model=model, num_microbatches=1, seq_length=inputs.shape[1],
                                             micro_batch_size=inputs.shape[0], forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        assert ok, f"step {step} was not applied"
        scheduler.step(1)
        losses.append(float(result[0]["loss"]))
        norms.append(float(grad_norm))
    return losses, norms


def run_case(case: dict, out_dir: Path) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    from megaswift.checkpointing.layout import read_meta
    from megaswift.config import ParallelConfig
    from megaswift.tuners import adapter_state, adapter_to_peft, load_adapter_state
    from tests.converters.layout_worker import forward_logits
    from tests.tuners import support

    init_layout(case)
    ckpt = Path(case["ckpt"]) / "iter_0000000"
    hf = read_meta(ckpt)["hf_config"]
    parallel = ParallelConfig(tensor=case["tp"], pipeline=case["pp"], expert=case["ep"], sequence_parallel=case["sp"])
    adapter = torch.load(case["adapter"]) if case.get("adapter") else None
    chunks, config = support.build_tuned_chunks(hf, ckpt, support.tuner_config(case["kind"]), parallel, adapter)
    if case.get("adapter_ckpt_load"):
        loaded = dist_checkpointing.load(adapter_sharded_state(chunks), case["adapter_ckpt_load"])
        for name, chunk in zip(sorted(loaded), chunks):
            missing, unexpected = chunk.load_state_dict(loaded[name], strict=False)
            assert not unexpected and not [k for k in missing if ".adapter." in k], (unexpected, missing)
    if case.get("save_adapter_ckpt"):
        folder = Path(case["save_adapter_ckpt"])
        if torch.distributed.get_rank() == 0:
            folder.mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save(adapter_sharded_state(chunks), str(folder))
    result = {"logits": forward_logits(chunks, torch.load(case["tokens"]))}
    if case.get("train"):
        batches = torch.load(case["train"]["batches"])
        result["losses"], result["grad_norms"] = train(chunks, config, batches, case["train"]["optim"])
        result["adapter"] = adapter_to_peft(adapter_state(chunks), hf)
        # the API round trip on this layout: loading what adapter_state gathered changes nothing
        before = adapter_state(chunks)
        load_adapter_state(chunks, before)
        assert all(torch.equal(before[k], v) for k, v in adapter_state(chunks).items())
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(result, out_dir / f"{case['name']}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("results")
    args = parser.parse_args()
    from megaswift.platform.cpu import apply_cpu_patches
    apply_cpu_patches()
    torch.distributed.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    for case in json.loads(Path(args.spec).read_text())["cases"]:
        run_case(case, Path(args.results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing.save may spawn a process that re-imports __main__
    main()
