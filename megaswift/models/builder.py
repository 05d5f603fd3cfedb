"""Build this rank's megatron-core GPTModel chunks (one per virtual pipeline stage) from an HF config."""
import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megaswift.models.families import family_of
from megaswift.models.mcore_config import gpt_model_kwargs
from megaswift.models.torch_attention import with_torch_core_attention
from megaswift.models.vocab_padding import mask_padded_vocab


def transformer_engine_available() -> bool:
    """Whether Transformer Engine imports and a GPU is present. Each call tries the import again (a failed
    import is not cached by Python): a run asks once (Trainer) and passes the answer down."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a partial TE install raises more than ImportError
        return False
    return torch.cuda.is_available()


LAYER_SPECS = ("te", "torch", "local")


def resolve_layer_spec(choice: str = "auto", te_available: bool | None = None) -> str:
    """`auto`: Transformer Engine where it imports and a GPU is present, else torch's attention kernels on a
    GPU (torch_attention.py: flash SDPA, FlexAttention for packed rows), else megatron-core's local spec.
    On CPU the torch spec runs SDPA only (FlexAttention has no CPU backward) and measured 2.3-2.7x faster
    than local at seq 1024 (benchmarks/results/attention_spec_cpu.json); local stays the CPU default
    because the CPU test suite and the bare megatron-core loop of benchmarks/train_throughput.py are
    written against it. `te`, `torch` and `local` are taken as they are. `te_available`: the answer of
    `transformer_engine_available()` where the caller has it already (asked here when None)."""
    if choice == "auto":
        if transformer_engine_available() if te_available is None else te_available:
            return "te"
        return "torch" if torch.cuda.is_available() else "local"
    if choice not in LAYER_SPECS:
        raise ValueError(f"model.layer_spec={choice!r} is not allowed; choose one of {['auto', *LAYER_SPECS]}")
    return choice


def use_transformer_engine(choice: str = "auto") -> bool:
    return resolve_layer_spec(choice) == "te"


def layer_spec(hf: dict, config: TransformerConfig, spec: str, vp_stage: int | None = None):
    """The family's layer spec for one model chunk: one spec for all layers, or the chunk's own layers'
    specs where the family's layers differ. `spec`: te, torch or local (resolve_layer_spec). The torch spec
    is the family's local spec with torch's attention kernels as its core attention."""
    family_spec = family_of(hf).layer_spec(config, spec == "te", vp_stage)
    return with_torch_core_attention(family_spec) if spec == "torch" else family_spec


def build_model_chunks(hf: dict, config: TransformerConfig, spec_choice: str = "auto") -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (a single one without VPP).

    The chunk holding the output layer sets the padded vocabulary columns of its logits to -inf
    (vocab_padding.py), so losses, gradients and returned logits are those of the true vocabulary."""
    vpp = config.virtual_pipeline_model_parallel_size or 1
    spec = resolve_layer_spec(spec_choice)  # once for all chunks; a resolved name (te, torch, local) costs nothing
    kwargs = gpt_model_kwargs(hf, config.tensor_model_parallel_size)
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if config.virtual_pipeline_model_parallel_size else None
        model = GPTModel(
            config=config, transformer_layer_spec=layer_spec(hf, config, spec, vp_stage),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True, vp_stage=vp_stage, **kwargs)
        if model.post_process:
            mask_padded_vocab(model.output_layer, hf["vocab_size"], kwargs["vocab_size"])
        chunks.append(model)
    return chunks
