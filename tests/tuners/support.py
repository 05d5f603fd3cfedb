"""Both sides of the LoRA tests: PEFT on transformers (the reference nobody here wrote) and megaswift's
adapters on megatron-core, built from the same tiny HF model and the same adapter tensors."""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megaswift.config import TunerConfig

# PEFT names of the modules megaswift adapts with targets=all-linear (PEFT's own all-linear would also
# take Qwen2-MoE's shared_expert_gate, a 1-row gate that megatron-core keeps as a plain parameter).
PEFT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2-moe": ["q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                  "shared_expert.down_proj"],
}
# name -> (family, HF config overrides) for the tiny models that are a variant of a family's tiny preset
VARIANTS = {"deepseek-v3-no-q-lora": ("deepseek-v3", {"q_lora_rank": None})}  # as V2-Lite and Moonlight
TINY_OVERRIDES = {"num_hidden_layers": 2}
RANK, ALPHA = 4, 16.0


def tuner_config(kind: str, rslora: bool = True, dropout: float = 0.0) -> TunerConfig:
    return TunerConfig(type=kind, rank=RANK, alpha=ALPHA, rslora=rslora, dropout=dropout, targets="all-linear")


def load_hf(hf_dir: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")


def peft_model(hf_dir: Path, family: str, kind: str, seed: int = 7, rslora: bool = True):
    """PeftModel over the HF model, every adapter tensor random (B non-zero, magnitudes off their init),
    so nothing matches trivially."""
    import peft

    base = load_hf(hf_dir)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, use_rslora=rslora, use_dora=kind == "dora",
                             target_modules=PEFT_TARGETS[family], lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:  # PEFT draws A from the global RNG: redraw it from ours
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    return model


def peft_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def tokens_for(vocab_size: int, batch: int = 1, seq: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


# --- GLM-4.5 MoE / DeepSeek-V3: PEFT's layers without PEFT's MoE target rewrite ----------------------
# every module megaswift adapts with all-linear on these models (PEFT's suffix match, names with parents so
# that nothing reaches the routed experts, which transformers 5 keeps as 3-D parameters anyway)
MLP = [f"{parent}.{name}" for parent in ("mlp", "shared_experts") for name in ("gate_proj", "up_proj", "down_proj")]
LAYER_TARGETS = {
    "glm4-moe": ["q_proj", "k_proj", "v_proj", "o_proj", *MLP],
    "deepseek-v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", *MLP],
    "deepseek-v3-no-q-lora": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", *MLP],
}


class _Layers(torch.nn.Module):
    """The HF model's decoder layers (shared, not copied) under a module without `config`."""

    def __init__(self, hf_model):
        super().__init__()
        self.layers = hf_model.model.layers


def peft_layers_reference(hf_dir, name: str, kind: str, seed: int = 7):
    """(HF model with PEFT's adapters in its layers, the holder of those layers, the adapter as a PEFT
    file's tensors); every adapter tensor random (B non-zero, magnitudes off their init).

    PEFT's LoRA/DoRA layers are injected into a holder of the decoder layers that carries no `config`:
    PEFT 0.21 on transformers 5 rewrites the targets of `glm4_moe` / `deepseek_v3` models (its v4->v5 MoE
    conversion), turning every `gate_proj` / `up_proj` / `down_proj` target, however qualified
    (`mlp.gate_proj`, `shared_experts.gate_proj`), into the routed experts' fused parameters, so through
    get_peft_model the dense-layer and shared-expert MLPs cannot be targeted at all. The layers are
    PEFT's own; only that rewrite is skipped."""
    import peft

    model = load_hf(hf_dir)
    holder = _Layers(model)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, use_rslora=True, use_dora=kind == "dora",
                             target_modules=LAYER_TARGETS[name], lora_dropout=0.0)
    peft.inject_adapter_in_model(config, holder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in holder.named_parameters():
            if "lora_A" in pname:
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) / p.shape[1] ** 0.5)
            elif "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif "lora_magnitude_vector" in pname:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    state = {f"base_model.model.model.{k}": v.detach().clone()
             for k, v in peft.get_peft_model_state_dict(holder).items()}
    return model, holder, state


# --- training reference: transformers + peft + torch AdamW --------------------------------------------
@dataclass(frozen=True)
class Optim:
    lr: float = 1e-2
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 1.0


def train_peft(model, batches: list[torch.Tensor], optim: Optim):
    """Losses and gradient norms (before clipping) per step (loss: mean next-token CE over the batch), and
    the final adapter tensors. Adam normalises gradients, so the norms are what shows a gradient off by a
    constant factor (a reduction done twice, or missed everywhere). Weight decay on
    matrices only, as megatron-core groups parameters (1-D magnitudes are exempt)."""
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in params if p.ndim > 1], "weight_decay": optim.weight_decay},
         {"params": [p for n, p in params if p.ndim <= 1], "weight_decay": 0.0}],
        lr=optim.lr, betas=optim.betas, eps=optim.eps)
    losses, norms = [], []
    for tokens in batches:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for _, p in params], optim.clip_grad)))
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, norms, peft_state(model)


# --- megaswift side -----------------------------------------------------------------------------------
def build_tuned_chunks(hf: dict, ckpt: Path, tuner: TunerConfig, parallel, adapter: dict | None = None):
    """This rank's chunks at the current parallel layout: base weights loaded from a converted checkpoint
    BEFORE apply_tuner (so the checkpoint holds no adapter keys), then the adapter, if any, loaded."""
    from megatron.core import dist_checkpointing

    from megaswift.checkpointing.state import model_state_keys
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks
    from megaswift.tuners import apply_tuner, load_adapter_state, peft_to_adapter

    config = hf_to_transformer_config(hf, parallel, params_dtype=torch.float32)
    config.perform_initialization = False
    chunks = build_model_chunks(hf, config, "local")
    names = model_state_keys(chunks)
    loaded = dist_checkpointing.load({n: c.sharded_state_dict() for n, c in zip(names, chunks)}, str(ckpt))
    for name, chunk in zip(names, chunks):
        chunk.load_state_dict(loaded[name], strict=True)
    apply_tuner(chunks, tuner, hf)
    if adapter is not None:
        load_adapter_state(chunks, peft_to_adapter(adapter, hf))
    return chunks, config
