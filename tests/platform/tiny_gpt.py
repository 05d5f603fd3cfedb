"""Tiny megatron-core GPT models for the CPU-support tests (local layer spec, no TE)."""
import os

import torch

SEQ, VOCAB, MICRO_BATCH = 32, 128, 2


def init_distributed(tp: int = 1, ep: int = 1, etp: int | None = None, pp: int = 1) -> None:
    """Start gloo (single process when not under torchrun) and megatron's parallel state."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        torch.distributed.init_process_group(
            "gloo", rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)))
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpt_config(tp: int = 1, sp: bool = False, ep: int = 1, etp: int | None = None, moe: bool = False):
    from megatron.core.transformer import TransformerConfig

    moe_args = dict(num_moe_experts=8, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                    moe_ffn_hidden_size=64, moe_aux_loss_coeff=0.0) if moe else {}
    return TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, sequence_parallel=sp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp, use_cpu_initialization=True, perform_initialization=True,
        params_dtype=torch.float32, **moe_args)


def build_gpt(config, seed: int = 1234):
    """Same seed, same full weights at any TP size: megatron's CPU init draws full matrices."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope")


def batch(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous()}


def forward_backward(model, data: dict[str, torch.Tensor]) -> float:
    """One megatron schedule step (no pipelining); returns the mean token loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        d = next(data_iterator)
        per_token = model(d["tokens"], d["position_ids"], None, labels=d["labels"])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}
        return per_token, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([data]), model=[model],
        num_microbatches=1, seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=False)
    return float(losses[0]["loss"])
