"""One process: the loss and gradients of packed rows against the same samples one per row.

    python tests/gpu/packed_thd_worker.py --layer-spec te --precision bf16 --out result.json

Builds the tiny-llama model (megaswift's own builder, the chosen layer spec), then runs one forward and
backward through megaswift's forward step for three batches made by megaswift's SFT data source:
    plain    every sample alone in its row (right padding, causal attention);
    packed   the samples packed into rows; with TE a THD micro-batch (PackedSeqParams, no mask),
             with the local spec the block-diagonal mask: attention never crosses samples;
    control  the same packed rows with plain causal attention, which does cross samples: it shows
             how large a difference the comparison would see if packing leaked attention.
Writes the losses, and per parameter the relative L2 difference of packed and control gradients
from the plain ones, as JSON; the test asserts on them.
"""
import argparse
import json

import datasets
import torch

SEQ = 128
SEED = 1234
INIT_STD = 0.2  # large enough that attention is far from uniform, so leaking across samples shows
# Varied lengths (1..SEQ), so rows mix long and short samples and most rows end in padding.
LENGTHS = [37, 5, 64, 12, 90, 3, 50, 28, 77, 9, 41, 16, 128, 1, 60, 33]


def sample_dataset(vocab: int) -> datasets.Dataset:
    """Token rows as SFT preprocessing leaves them: the first third of each sample untrained (-100),
    the rest trained with weight 1 or 2."""
    g = torch.Generator().manual_seed(SEED)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        targets = torch.randint(1, vocab, (n,), generator=g).tolist()
        prompt = n // 3
        labels = [-100] * prompt + targets[prompt:]
        scale = [0.0] * prompt + [1.0 + (k % 2) for k in range(n - prompt)]
        rows.append({"input_ids": ids, "labels": labels, "loss_scale": scale, "length": n})
    return datasets.Dataset.from_list(rows)


def batches(samples, packed_attention: str) -> dict[str, dict]:
    from megaswift.data.micro_batches import stack_rows
    from megaswift.data.sft.packing import collate_thd
    from megaswift.data.sft.training_source import TrainingRows

    def all_rows(packing, attention="mask"):
        rows = TrainingRows(samples, SEQ, 0, packing, SEED, attention)
        return [rows[i] for i in range(rows.epoch_size)]

    packed_rows = all_rows(True, packed_attention)
    packed = collate_thd(packed_rows) if packed_attention == "thd" else stack_rows(packed_rows)
    control = stack_rows(all_rows(True, "mask"))
    control.pop("attention_mask")  # no mask: causal over the whole row, across samples
    return {"plain": stack_rows(all_rows(False)), "packed": packed, "control": control,
            "rows": {"plain": len(samples), "packed": len(packed_rows)}}


def loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    from megaswift.train.forward_step import make_forward_step

    model.zero_grad(set_to_none=True)
    output, loss_func = make_forward_step(use_fused_loss=False)(iter([batch]), model)
    loss_sum, num_tokens, _ = loss_func(output)
    loss = loss_sum / num_tokens
    loss.backward()
    grads = {name: p.grad.detach().float().cpu().clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def relative_differences(grads: dict, reference: dict) -> dict[str, float]:
    out = {name: float((grads[name] - ref).norm() / ref.norm().clamp_min(1e-30)) for name, ref in reference.items()}
    flat = lambda g: torch.cat([g[name].flatten() for name in reference])
    out["__all__"] = float((flat(grads) - flat(reference)).norm() / flat(reference).norm())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer-spec", default="te", choices=["te", "local"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from megaswift.config import ParallelConfig
    from megaswift.config.validate import packed_attention
    from megaswift.models import hf_to_transformer_config, preset_hf_config
    from megaswift.models.builder import build_model_chunks, resolve_layer_spec
    from megaswift.train.distributed import init_distributed, shutdown_distributed

    parallel = ParallelConfig()
    init_distributed(parallel, SEED)
    try:
        attention = packed_attention(True, resolve_layer_spec(args.layer_spec), args.precision, parallel,
                                     on_gpu=torch.cuda.is_available())
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
        hf = preset_hf_config("tiny-llama")
        on_gpu = torch.cuda.is_available()
        config = hf_to_transformer_config(hf, parallel, dtype, init_std=INIT_STD, on_gpu=on_gpu)
        model = build_model_chunks(hf, config, args.layer_spec)[0]
        if on_gpu:
            model.cuda()
        data = batches(sample_dataset(hf["vocab_size"]), attention)
        losses, grads = {}, {}
        for name in ("plain", "packed", "control"):
            losses[name], grads[name] = loss_and_grads(model, data[name])
        result = {
            "layer_spec": args.layer_spec, "precision": args.precision, "packed_attention": attention,
            "attention_class": type(model.decoder.layers[0].self_attention.core_attention).__name__,
            "rows": data["rows"], "packed_shape": list(data["packed"]["tokens"].shape),
            "has_packed_seq_params": "packed_seq_params" in data["packed"],
            "losses": losses,
            "grad_rel_diff": {name: relative_differences(grads[name], grads["plain"])
                              for name in ("packed", "control")},
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
