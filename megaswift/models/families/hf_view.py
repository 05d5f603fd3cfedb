"""A typed view of an HF config: each fact megaswift uses, derived once from the raw dict.

The dict stays the one description of a model (it is recorded in every checkpoint and written back
unchanged by mcore2hf); everything that reads sizes, heads or experts reads them from this view, which
the model's family builds (`family.read(hf)`), since some defaults are the family's (e.g. whether
Qwen2 has q/k/v biases, whether an MoE router renormalises its top-k).
"""
from dataclasses import dataclass

from megaswift.config import ConfigError


def require(hf: dict, key: str):
    if key not in hf:
        raise ConfigError(f"HF config: missing key {key!r} (needed to build a {hf.get('architectures')} model)")
    return hf[key]


def rope_parameters(hf: dict) -> dict:
    """RoPE settings from either config style: transformers < 5 writes `rope_theta` + `rope_scaling`,
    transformers 5 writes one `rope_parameters` dict (holding `rope_theta` and `rope_type`)."""
    params = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
    params.update(hf.get("rope_parameters") or {})
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _probability(hf: dict, key: str) -> float:
    """HF's dropout probabilities; an absent field (or None) means 0, as in transformers."""
    value = 0.0 if hf.get(key) is None else hf[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ConfigError(f"HF config: {key}={value!r} must be a probability in [0, 1)")
    return float(value)


@dataclass(frozen=True)
class MoeFacts:
    num_experts: int
    experts_per_token: int
    ffn_hidden_size: int                   # one routed expert's intermediate size
    norm_topk_prob: bool                   # renormalise the top-k probabilities (softmax after top-k)
    aux_loss_coef: float
    shared_expert_ffn_hidden_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False       # Qwen2-MoE: the shared expert's output scaled by sigmoid(gate(x))
    dense_layers: tuple[int, ...] = ()     # layers with a dense MLP instead of experts
    # DeepSeek-V3-style routing (GLM-4.5 too): sigmoid scores, top-k chosen on score + a learned per-expert
    # bias (`e_score_correction_bias`, aux-loss-free balancing), optionally within the best `group_topk`
    # of `num_groups` expert groups, the chosen scores renormalised and scaled by `scaling_factor`.
    score_function: str = "softmax"
    expert_bias: bool = False
    num_groups: int | None = None
    group_topk: int | None = None
    scaling_factor: float | None = None


@dataclass(frozen=True)
class MlaFacts:
    """DeepSeek's multi-latent attention: q (optionally through a rank-`q_lora_rank` bottleneck) and a
    shared rank-`kv_lora_rank` latent for k and v; each head's q/k = a no-rope part and a rope part."""
    q_lora_rank: int | None        # None: q comes straight from the hidden states (DeepSeek-V2-Lite, Moonlight)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class HfConfigView:
    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tied_embeddings: bool
    norm_eps: float
    hidden_act: str
    rope: dict                 # rope_theta, rope_type and the scaling fields (rope_parameters)
    qkv_bias: bool
    qk_norm: bool
    attention_dropout: float   # on attention probabilities, as megatron-core's
    hidden_dropout: float      # after attention and MLP (Llama/Qwen/Mistral configs have none)
    init_std: float
    sliding_window: int | None
    moe: MoeFacts | None = None
    rotary_percent: float = 1.0   # share of each head's dims that rope rotates (GLM: partial_rotary_factor)
    mla: MlaFacts | None = None
    # Multi-token-prediction layers a checkpoint may carry after the decoder layers (DeepSeek-V3, GLM-4.5:
    # `num_nextn_predict_layers`): transformers' model has none, and megaswift does not convert them.
    mtp_layers: int = 0

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts if self.moe else 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers

    def tensor_parallel_sizes(self) -> dict[str, int]:
        """The sizes tensor parallelism splits, by the HF key they come from: each must divide by TP."""
        sizes = {"num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_kv_heads}
        if self.mla:
            # megatron-core's local MLA spec splits the down projections' outputs across TP too
            if self.mla.q_lora_rank:
                sizes["q_lora_rank"] = self.mla.q_lora_rank
            sizes["kv_lora_rank + qk_rope_head_dim"] = self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return sizes


def partial_rotary_factor(hf: dict) -> float:
    """transformers 5 keeps it in `rope_parameters`; older configs (GLM-4.5 on the hub) at the top level."""
    value = rope_parameters(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"HF config: partial_rotary_factor={value!r} must be in (0, 1]")
    return float(value)


def read_decoder(hf: dict, *, qkv_bias: bool = False, qk_norm: bool = False,
                 moe: MoeFacts | None = None) -> HfConfigView:
    """The view of a pre-norm decoder config (Llama's field names, shared by the Qwen and Mistral
    families). `qkv_bias`: the family always has q/k/v biases (else the config's `attention_bias`)."""
    heads, hidden = require(hf, "num_attention_heads"), require(hf, "hidden_size")
    return HfConfigView(
        architecture=hf["architectures"][0],
        num_layers=require(hf, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=require(hf, "intermediate_size"),
        num_attention_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        vocab_size=require(hf, "vocab_size"),
        max_position_embeddings=require(hf, "max_position_embeddings"),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        hidden_act=hf.get("hidden_act", "silu"),
        rope=rope_parameters(hf),
        qkv_bias=qkv_bias or bool(hf.get("attention_bias")),
        qk_norm=qk_norm,
        attention_dropout=_probability(hf, "attention_dropout"),
        hidden_dropout=_probability(hf, "hidden_dropout"),
        init_std=hf.get("initializer_range", 0.02),
        sliding_window=hf.get("sliding_window"),
        moe=moe,
        rotary_percent=partial_rotary_factor(hf),
    )


def read_moe(hf: dict, *, norm_topk_prob_default: bool, gated_shared_expert: bool = False) -> MoeFacts:
    """Mixtral names its expert count `num_local_experts`, the Qwen MoE families `num_experts`; the
    Qwen families may keep some layers dense (`mlp_only_layers`, `decoder_sparse_step`).
    `gated_shared_expert`: the family has Qwen2-MoE's shared expert (sized by
    `shared_expert_intermediate_size`, its output scaled by sigmoid(shared_expert_gate(x)))."""
    layers = require(hf, "num_hidden_layers")
    step = hf.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"HF config: decoder_sparse_step={step!r} must be a positive integer")
    mlp_only = set(hf.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(layers) if i in mlp_only or (i + 1) % step)
    return MoeFacts(
        num_experts=hf.get("num_local_experts") or require(hf, "num_experts"),
        experts_per_token=require(hf, "num_experts_per_tok"),
        ffn_hidden_size=hf.get("moe_intermediate_size") or require(hf, "intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", norm_topk_prob_default)),
        aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
        shared_expert_ffn_hidden_size=(hf.get("shared_expert_intermediate_size") or 0) if gated_shared_expert else 0,
        shared_expert_gate=gated_shared_expert and bool(hf.get("shared_expert_intermediate_size")),
        dense_layers=dense,
    )


def _positive_int(hf: dict, key: str, default=None) -> int:
    value = default if hf.get(key) is None else hf[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"HF config: {key}={value!r} must be a positive integer")
    return value


def read_sigmoid_moe(hf: dict) -> MoeFacts:
    """DeepSeek-V3's MoE, which GLM-4.5 shares: `n_routed_experts` experts chosen by sigmoid scores plus
    `e_score_correction_bias` within the best `topk_group` of `n_group` groups, renormalised when
    `norm_topk_prob`, scaled by `routed_scaling_factor`; `n_shared_experts` always-on experts fused into
    one MLP of `n_shared_experts * moe_intermediate_size`; the first `first_k_dense_replace` layers dense."""
    layers = require(hf, "num_hidden_layers")
    experts = _positive_int(hf, "n_routed_experts")
    groups, group_topk = _positive_int(hf, "n_group", 1), _positive_int(hf, "topk_group", 1)
    if experts % groups or group_topk > groups:
        raise ConfigError(f"HF config: n_group={groups} must divide n_routed_experts={experts} and be >= "
                          f"topk_group={group_topk}")
    first_dense = hf.get("first_k_dense_replace", 0)
    if not isinstance(first_dense, int) or not 0 <= first_dense <= layers:
        raise ConfigError(f"HF config: first_k_dense_replace={first_dense!r} must be in [0, num_hidden_layers]")
    shared = hf.get("n_shared_experts") or 0
    scale = float(hf.get("routed_scaling_factor") or 1.0)
    return MoeFacts(
        num_experts=experts,
        experts_per_token=_positive_int(hf, "num_experts_per_tok"),
        ffn_hidden_size=_positive_int(hf, "moe_intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
        shared_expert_ffn_hidden_size=shared * hf["moe_intermediate_size"],
        dense_layers=tuple(range(first_dense)),
        score_function="sigmoid",
        expert_bias=True,
        # one group is no grouping: transformers' group step then keeps every expert
        num_groups=groups if groups > 1 else None,
        group_topk=group_topk if groups > 1 else None,
        scaling_factor=scale if scale != 1.0 else None,
    )


def mtp_layers(hf: dict) -> int:
    value = hf.get("num_nextn_predict_layers") or 0
    if not isinstance(value, int) or value < 0:
        raise ConfigError(f"HF config: num_nextn_predict_layers={value!r} must be a non-negative integer")
    return value
