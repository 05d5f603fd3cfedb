"""megatron-core's local (non-Transformer-Engine) attention, made usable by multi-latent attention.

MLASelfAttention builds its core attention with `k_channels` (q/k head dim: no-rope + rope dims) and
`v_channels` (v head dim), which only Transformer Engine's attention accepts; megatron-core's local
DotProductAttention refuses them. Its scores and softmax take whatever head dims q, k and v have (MLA
passes the softmax scale itself); only the output width is fixed, at heads x kv_channels. This subclass
takes the two arguments and sizes the output by v_channels, so MLA runs on CPU with the local spec.
MlaSelfAttentionWithoutQLora covers MLA without a q bottleneck, which the local spec cannot build.
"""
import dataclasses

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class MlaDotProductAttention(DotProductAttention):
    def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None, name: str | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels


class MlaSelfAttentionWithoutQLora(MLASelfAttention):
    """MLA whose q comes straight from the hidden states (`q_lora_rank` None: DeepSeek-V2-Lite, Moonlight).
    megatron-core's norm resolver then asks for a fused norm+linear q projection (normalising the already
    normalised hidden states a second time, unlike transformers' DeepSeek) and, on the local backend, has
    none to give; here q_proj is the spec's plain linear, and the latent kv norm is the spec's own."""

    def _resolve_qk_norm_config(self, submodules) -> dict:
        return {"linear_q_proj": submodules.linear_q_proj, "linear_q_up_proj": IdentityOp,
                "linear_kv_up_proj": submodules.linear_kv_up_proj, "q_layernorm": IdentityOp,
                "kv_layernorm": submodules.kv_layernorm}


def with_local_mla_attention(layer_spec, q_lora_rank: int | None):
    """`layer_spec` (an MLA layer of megatron-core's local spec) with MlaDotProductAttention as its core
    attention, and MlaSelfAttentionWithoutQLora where q has no low-rank bottleneck; a new spec, the given
    one unchanged."""
    attention = layer_spec.submodules.self_attention
    changes = {}
    if attention.submodules.core_attention is DotProductAttention:
        changes["core_attention"] = MlaDotProductAttention
    module = attention.module
    if q_lora_rank is None and module is MLASelfAttention:
        module, changes["q_layernorm"] = MlaSelfAttentionWithoutQLora, IdentityOp
    if not changes:
        return layer_spec
    attention = dataclasses.replace(attention, module=module,
                                    submodules=dataclasses.replace(attention.submodules, **changes))
    return dataclasses.replace(layer_spec,
                               submodules=dataclasses.replace(layer_spec.submodules, self_attention=attention))
