"""Rule groups shared by the families: each family's conversion rules are a few of these.

HF side: `model.layers.N.*` as in the checkpoints on the hub (per-expert MoE weights, which is also
what transformers' save_pretrained writes). megatron side: GPTModel state-dict names (local spec).
"""
from megaswift.models.families.hf_view import HfConfigView
from megaswift.models.families.rules import Rule
from megaswift.models.families.transforms import FUSED_GATE_UP, FUSED_QKV, PADDED_VOCAB

L = "decoder.layers.{layer}"
H = "model.layers.{layer}"


def untied(view: HfConfigView) -> bool:
    return not view.tied_embeddings


def has_qkv_bias(view: HfConfigView) -> bool:
    return view.qkv_bias


EMBEDDING = (Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), PADDED_VOCAB),)

ATTENTION = (
    Rule(f"{L}.input_layernorm.weight", (f"{H}.input_layernorm.weight",)),
    Rule(f"{L}.self_attention.linear_qkv.weight",
         (f"{H}.self_attn.q_proj.weight", f"{H}.self_attn.k_proj.weight", f"{H}.self_attn.v_proj.weight"),
         FUSED_QKV),
    Rule(f"{L}.self_attention.linear_qkv.bias",
         (f"{H}.self_attn.q_proj.bias", f"{H}.self_attn.k_proj.bias", f"{H}.self_attn.v_proj.bias"),
         FUSED_QKV, when=has_qkv_bias),
    Rule(f"{L}.self_attention.linear_proj.weight", (f"{H}.self_attn.o_proj.weight",)),
)

QK_NORM = (
    Rule(f"{L}.self_attention.q_layernorm.weight", (f"{H}.self_attn.q_norm.weight",)),
    Rule(f"{L}.self_attention.k_layernorm.weight", (f"{H}.self_attn.k_norm.weight",)),
)

PRE_MLP_NORM = (Rule(f"{L}.pre_mlp_layernorm.weight", (f"{H}.post_attention_layernorm.weight",)),)

DENSE_MLP = PRE_MLP_NORM + (
    Rule(f"{L}.mlp.linear_fc1.weight", (f"{H}.mlp.gate_proj.weight", f"{H}.mlp.up_proj.weight"), FUSED_GATE_UP),
    Rule(f"{L}.mlp.linear_fc2.weight", (f"{H}.mlp.down_proj.weight",)),
)


def moe(router: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Router + per-expert SwiGLU MLPs; HF names relative to `model.layers.N.`, `{expert}` inside."""
    expert = f"{L}.mlp.experts.local_experts.{{expert}}"
    return PRE_MLP_NORM + (
        Rule(f"{L}.mlp.router.weight", (f"{H}.{router}",)),
        Rule(f"{expert}.linear_fc1.weight", (f"{H}.{gate}", f"{H}.{up}"), FUSED_GATE_UP),
        Rule(f"{expert}.linear_fc2.weight", (f"{H}.{down}",)),
    )


SHARED_EXPERT = (
    Rule(f"{L}.mlp.shared_experts.linear_fc1.weight",
         (f"{H}.mlp.shared_expert.gate_proj.weight", f"{H}.mlp.shared_expert.up_proj.weight"), FUSED_GATE_UP),
    Rule(f"{L}.mlp.shared_experts.linear_fc2.weight", (f"{H}.mlp.shared_expert.down_proj.weight",)),
    Rule(f"{L}.mlp.shared_experts.gate_weight", (f"{H}.mlp.shared_expert_gate.weight",)),
)

FINAL = (
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), PADDED_VOCAB, when=untied),
)


# DeepSeek-V3 / GLM-4.5 MoE: the router's learned per-expert bias (fp32 on both sides: transformers keeps
# `e_score_correction_bias` in fp32, megatron-core its `expert_bias` buffer), and ungated shared experts
# fused into one MLP (`shared_experts`, plural, in HF).
ROUTER_BIAS = (Rule(f"{L}.mlp.router.expert_bias", (f"{H}.mlp.gate.e_score_correction_bias",), cast=False),)

SHARED_EXPERTS = (
    Rule(f"{L}.mlp.shared_experts.linear_fc1.weight",
         (f"{H}.mlp.shared_experts.gate_proj.weight", f"{H}.mlp.shared_experts.up_proj.weight"), FUSED_GATE_UP),
    Rule(f"{L}.mlp.shared_experts.linear_fc2.weight", (f"{H}.mlp.shared_experts.down_proj.weight",)),
)

SIGMOID_MOE = moe(router="mlp.gate.weight",
                  gate="mlp.experts.{expert}.gate_proj.weight",
                  up="mlp.experts.{expert}.up_proj.weight",
                  down="mlp.experts.{expert}.down_proj.weight") + ROUTER_BIAS + SHARED_EXPERTS
