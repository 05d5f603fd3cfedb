"""The training loss function (megaswift.train.forward_step) on a real megatron-core model whose vocabulary
is padded (1000 -> 1024): sum(F.cross_entropy(reduction="none") * mask * weights) over the TRUE vocabulary,
with non-uniform weights, through megatron-core's vocab-parallel cross entropy and through the fused kernel;
the padding rows of the output layer get exactly zero gradient; returned logits are -inf on the padding."""
import pytest
import torch
import torch.nn.functional as F

from megaswift.models.vocab_padding import padding_columns

VOCAB, SEQ, MICRO = 1000, 16, 2


@pytest.mark.parametrize("true_vocab, width, start, expected", [
    (1000, 1024, 0, slice(1000, 1024)),   # TP=1
    (1000, 512, 0, None),                 # TP=2, rank 0: all real
    (1000, 512, 512, slice(488, 512)),    # TP=2, rank 1
    (1000, 1024, 1024, slice(0, 1024)),   # TP=8 (padded to 8192), rank 1: padding only
    (1024, 512, 512, None),               # no padding at all
])
def test_padding_columns_of_a_shard(true_vocab, width, start, expected):
    assert padding_columns(true_vocab, width, start) == expected


@pytest.fixture(scope="module")
def padded_model():
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config, preset_hf_config
    from megaswift.models.builder import build_model_chunks
    from megaswift.train.distributed import init_distributed, shutdown_distributed

    init_distributed(ParallelConfig(), seed=5)
    hf = {**preset_hf_config("tiny-qwen2"), "vocab_size": VOCAB, "num_hidden_layers": 2}
    (model,) = build_model_chunks(hf, hf_to_transformer_config(hf, ParallelConfig()), "local")
    assert model.output_layer.weight.shape[0] == 1024, "the test needs a padded vocabulary"
    with torch.no_grad():  # padding rows as a trained checkpoint might hold them: anything but zero
        model.output_layer.weight[VOCAB:] = torch.randn_like(model.output_layer.weight[VOCAB:])
    yield model
    shutdown_distributed()


def _batch():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    loss_mask = (torch.rand(MICRO, SEQ, generator=g) > 0.3).float()
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "position_ids": torch.arange(SEQ).expand(MICRO, SEQ).contiguous(), "loss_mask": loss_mask,
            "loss_scale": torch.rand(MICRO, SEQ, generator=g) * 3 + 0.1}


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("fused", [False, True], ids=["megatron_vocab_parallel", "fused_kernel"])
def test_loss_function_equals_cross_entropy_times_mask_times_weights(padded_model, fused):
    from megaswift.train.forward_step import make_forward_step
    model, batch = padded_model, _batch()
    model.zero_grad(set_to_none=True)

    output, loss_func = make_forward_step(fused, vocab_size=VOCAB)(iter([batch]), model)
    loss_sum, num_tokens, _ = loss_func(output)
    loss_sum.backward()
    grads = _grads(model)

    logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, padded vocab]
    padding = logits[..., VOCAB:].detach()
    assert torch.equal(padding, torch.full_like(padding, float("-inf"))), "returned logits must hide the padding"
    ce = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="none")
    expected = (ce * batch["loss_mask"].reshape(-1) * batch["loss_scale"].reshape(-1)).sum()
    expected.backward()
    expected_grads = _grads(model)

    assert int(num_tokens) == int(batch["loss_mask"].sum())
    torch.testing.assert_close(loss_sum, expected.detach(), rtol=1e-6, atol=0)
    assert torch.count_nonzero(grads["output_layer.weight"][VOCAB:]) == 0, "padding rows must get no gradient"
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():  # fp32 sums in another order: 1e-5 of the tensor's largest entry
        scale = float(expected_grads[name].abs().max())
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
