"""megaswift's LoRA/DoRA at TP=1 (one process) against PEFT itself, the frozen base's memory, and the
refusals (routed experts, unknown targets)."""
import json

import pytest
import torch

from megaswift.config import ConfigError, ParallelConfig, TrainConfig, TunerConfig
from megaswift.models.families import preset_hf_config
from tests.tuners import support


def _logits(model, tokens, vocab):
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)[..., :vocab].float()


@pytest.mark.parametrize("family,kind", [("llama", "lora"), ("llama", "dora"), ("qwen2-moe", "lora"),
                                         ("qwen2-moe", "dora")])
def test_imported_peft_adapter_gives_peft_logits(tiny_base, tmp_path, family, kind):
    """Imported PEFT adapter: PEFT's logits; disabled: the base's; exported: bit-exact and PeftModel loads it
    back (config and keys) to our logits. DoRA runs with dropout 0.1, which eval mode must switch off,
    and takes one training-mode backward through the dropout path."""
    import safetensors.torch
    from peft import PeftModel

    from converters.process_group import single_process_model_parallel
    from megaswift.tuners import adapter_state, adapter_to_peft, adapters_disabled, peft_adapter_config

    hf_dir, ckpt, hf = tiny_base(family)
    model = support.peft_model(hf_dir, family, kind)
    tokens = support.tokens_for(hf["vocab_size"])
    expected = support.hf_logits(model, tokens)
    with model.disable_adapter():
        base = support.hf_logits(model, tokens)
    assert (expected - base).abs().max() > 0.1, "the adapter must change the logits, or nothing is tested"
    state = support.peft_state(model)
    tuner = support.tuner_config(kind, dropout=0.1 if kind == "dora" else 0.0)
    with single_process_model_parallel():
        chunks, _ = support.build_tuned_chunks(hf, ckpt, tuner, ParallelConfig(), state)
        ours = _logits(chunks[0], tokens, hf["vocab_size"])
        with adapters_disabled(chunks):
            ours_base = _logits(chunks[0], tokens, hf["vocab_size"])
        exported = adapter_to_peft(adapter_state(chunks), hf)
        chunks[0].train()
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        chunks[0](tokens, positions, None, labels=tokens).mean().backward()
        grads = [p.grad for p in chunks[0].parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert (ours - expected).abs().max() < 1e-4
    assert (ours_base - base).abs().max() < 1e-4
    assert set(exported) == set(state)
    assert all(torch.equal(exported[k], state[k]) for k in state), "import then export must be bit-exact"

    folder = tmp_path / "adapter"
    folder.mkdir()
    safetensors.torch.save_file(exported, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(peft_adapter_config(tuner, hf, str(hf_dir))))
    reloaded = PeftModel.from_pretrained(support.load_hf(hf_dir), folder)
    assert all(torch.equal(v, exported[k]) for k, v in support.peft_state(reloaded).items())
    assert (support.hf_logits(reloaded, tokens) - ours).abs().max() < 1e-4


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_frozen_base_gets_no_gradient_buffer_and_no_optimizer_state(tiny_base):
    """Counted in megatron-core's own DDP buffers and optimizer state after a real step, LoRA against full
    fine-tuning of the same model; embed_tokens (modules_to_save) trains in full."""
    from converters.process_group import single_process_model_parallel
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks
    from megaswift.tuners import apply_tuner
    from megaswift.train.optimizer import build_optimizer, wrap_with_ddp

    _, _, hf = tiny_base("llama")
    tokens = support.tokens_for(hf["vocab_size"], batch=2, seq=33)
    measured = {}
    for kind in ("full", "lora"):
        with single_process_model_parallel():
            config = hf_to_transformer_config(hf, ParallelConfig())
            chunks = apply_tuner(build_model_chunks(hf, config, "local"),
                                 TunerConfig(type=kind, modules_to_save=["embed_tokens"]), hf)
            trainable = [p for p in chunks[0].parameters() if p.requires_grad]
            frozen = {n: p.detach().clone() for n, p in chunks[0].named_parameters() if not p.requires_grad}
            embedding = chunks[0].embedding.word_embeddings.weight.detach().clone()
            (model,) = wrap_with_ddp(chunks, config, ParallelConfig())
            optimizer = build_optimizer([model], TrainConfig(lr=1e-2, clip_grad=0.0), ParallelConfig(), torch.float32)
            model.zero_grad_buffer()
            optimizer.zero_grad()
            positions = torch.arange(32).unsqueeze(0).expand(2, -1)
            model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean().backward()
            model.finish_grad_sync()
            assert optimizer.step()[0]
            grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in model.buffers)
            state_bytes = sum(t.numel() * t.element_size() for opt in optimizer.chained_optimizers
                              for s in opt.optimizer.state.values() for k, t in s.items() if k != "step")
            measured[kind] = (grad_bytes, state_bytes, _param_bytes(trainable))
            for name, before in frozen.items():
                assert torch.equal(dict(chunks[0].named_parameters())[name], before), f"frozen {name} changed"
                assert not hasattr(dict(chunks[0].named_parameters())[name], "main_grad"), f"{name} has a grad buffer"
            assert not torch.equal(chunks[0].embedding.word_embeddings.weight, embedding), "embed_tokens must train"
    (full_grad, full_state, full_params), (lora_grad, lora_state, lora_params) = measured["full"], measured["lora"]
    # the gradient buffer holds the trainable parameters only (plus megatron's bucket padding)
    assert lora_params <= lora_grad <= lora_params * 1.01 + 4096
    assert lora_state == 2 * lora_params  # Adam's exp_avg and exp_avg_sq, fp32, nothing for the base
    assert full_state == 2 * full_params and full_grad >= full_params
    assert lora_grad + lora_state < 0.5 * (full_grad + full_state)


def test_refusals():
    from megaswift.tuners import apply_tuner, peft_to_adapter, select_targets

    moe = preset_hf_config("tiny-qwen2-moe")
    with pytest.raises(ConfigError, match=r"routed MoE experts \(model\.layers\.0\.mlp\.experts\.0\.gate_proj"):
        select_targets(moe, "q_proj,gate_proj")
    mixtral = preset_hf_config("tiny-mixtral")
    with pytest.raises(ConfigError, match=r"routed MoE experts .*block_sparse_moe\.experts\.0\.w1"):
        select_targets(mixtral, "w1")
    with pytest.raises(ConfigError, match=r"unknown module name 'qproj' for llama; valid names: all-linear, "
                                          r"down_proj, gate_proj, k_proj"):
        select_targets(preset_hf_config("tiny-llama"), "qproj")
    with pytest.raises(ConfigError, match="lm_head is tied"):
        apply_tuner([], TunerConfig(type="lora", modules_to_save=["lm_head"]), preset_hf_config("tiny-llama3"))
    with pytest.raises(ConfigError, match="tuner.type='qlora' is not allowed"):
        apply_tuner([], TunerConfig(type="qlora"), moe)
    # PEFT's all-linear on Qwen2-MoE also adapts the 1-row shared_expert_gate, which megaswift does not
    with pytest.raises(ConfigError, match=r"'base_model\.model\.model\.layers\.0\.mlp\.shared_expert_gate\.lora_A"):
        peft_to_adapter({"base_model.model.model.layers.0.mlp.shared_expert_gate.lora_A.weight": torch.zeros(1, 64)},
                        moe)
    # only the parts named are adapted; the others of a fused layer stay without adapter
    chosen = select_targets(preset_hf_config("tiny-llama"), "q_proj,v_proj,up_proj")
    assert {parts for _, parts in chosen.values()} == {("q_proj", "v_proj"), ("up_proj",)}


def test_launch_refuses_bad_tuner_targets_before_starting_any_process(tmp_path):
    """Tuner targets are checked against the model's family at preflight, not after the processes start."""
    from megaswift.cli.preflight import PreflightError, check_launched_command
    with pytest.raises(PreflightError, match=r"unknown module name 'qproj' for llama; valid names: all-linear"):
        check_launched_command(("-m", "megaswift", "pt", "--tuner.type", "lora", "--tuner.targets", "q_proj,qproj",
                                "--logging.output_dir", str(tmp_path)), world_size=2)
