"""LoRA/DoRA at TP=2 (sequence parallel; llama and DeepSeek-V3's MLA), PP=2 and EP=2 against PEFT, in ONE
2-process launch: logits with an imported PEFT adapter, 4 training steps against transformers + peft +
torch AdamW, and the adapter's sharded checkpoint (saved at TP=2, loaded at PP=2)."""
import json

import torch

from tests.torchrun import REPO, run_torchrun
from tests.tuners import support

LOGITS_TOL = 1e-4
TRAIN_RTOL = 1e-5
UPDATE_RTOL = 1e-4


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_tp_pp_ep_against_peft(tiny_base, tmp_path):
    llama_hf, llama_ckpt, llama = tiny_base("llama")
    moe_hf, moe_ckpt, moe = tiny_base("qwen2-moe")
    tokens = support.tokens_for(llama["vocab_size"])
    torch.save(tokens, tmp_path / "tokens.pt")
    moe_tokens = support.tokens_for(moe["vocab_size"])
    torch.save(moe_tokens, tmp_path / "moe_tokens.pt")

    expected, cases = {}, []
    for family, kind, hf_dir in (("llama", "dora", llama_hf), ("qwen2-moe", "lora", moe_hf),
                                 ("qwen2-moe", "dora", moe_hf)):
        model = support.peft_model(hf_dir, family, kind)
        state = support.peft_state(model)
        torch.save(state, tmp_path / f"{family}-{kind}.pt")
        toks = tokens if family == "llama" else moe_tokens
        expected[family, kind] = support.hf_logits(model, toks)
        with model.disable_adapter():
            assert (expected[family, kind] - support.hf_logits(model, toks)).abs().max() > 0.1  # the adapter matters

    # multi-latent attention: its down projections' outputs are gathered over TP by MLA itself
    mla_hf, mla_ckpt, mla = tiny_base("deepseek-v3")
    mla_tokens = support.tokens_for(mla["vocab_size"])
    torch.save(mla_tokens, tmp_path / "mla_tokens.pt")
    mla_model, _, mla_state = support.peft_layers_reference(mla_hf, "deepseek-v3", "dora")
    torch.save(mla_state, tmp_path / "deepseek-v3-dora.pt")
    expected["deepseek-v3", "dora"] = support.hf_logits(mla_model, mla_tokens)

    batches = [support.tokens_for(llama["vocab_size"], batch=2, seq=33, seed=10 + i) for i in range(4)]
    torch.save(batches, tmp_path / "batches.pt")
    optim = support.Optim()
    reference = support.peft_model(llama_hf, "llama", "dora")
    ref_losses, ref_norms, ref_adapter = support.train_peft(reference, batches, optim)

    def case(name, family, kind, ckpt, toks, tp=1, pp=1, ep=1, sp=False, **extra):
        return {"name": name, "family": family, "kind": kind, "ckpt": str(ckpt.parent), "tp": tp, "pp": pp,
                "ep": ep, "sp": sp, "tokens": str(tmp_path / toks),
                "adapter": str(tmp_path / f"{family}-{kind}.pt"), **extra}

    cases = [
        case("tp2_llama_dora", "llama", "dora", llama_ckpt, "tokens.pt", tp=2, sp=True,
             save_adapter_ckpt=str(tmp_path / "adapter_ckpt"),
             train={"batches": str(tmp_path / "batches.pt"), "optim": optim.__dict__}),
        case("tp2_moe_lora", "qwen2-moe", "lora", moe_ckpt, "moe_tokens.pt", tp=2),
        # the adapter comes from the TP=2 save (global shapes, resharded on load), not from the PEFT file
        case("pp2_llama_dora", "llama", "dora", llama_ckpt, "tokens.pt", pp=2, adapter=None,
             adapter_ckpt_load=str(tmp_path / "adapter_ckpt")),
        case("ep2_moe_dora", "qwen2-moe", "dora", moe_ckpt, "moe_tokens.pt", ep=2),
        case("tp2_sp_mla_dora", "deepseek-v3", "dora", mla_ckpt, "mla_tokens.pt", tp=2, sp=True),
    ]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cases": cases}))
    results = tmp_path / "results"
    results.mkdir()
    run_torchrun([REPO / "tests" / "tuners" / "lora_worker.py", spec, results], nproc=2, timeout=600)

    for c in cases:
        got = torch.load(results / f"{c['name']}.pt")
        vocab = expected[c["family"], c["kind"]].shape[-1]
        diff = (got["logits"][..., :vocab] - expected[c["family"], c["kind"]]).abs().max().item()
        assert diff < LOGITS_TOL, f"{c['name']}: logits differ from PEFT's by {diff}"

    trained = torch.load(results / "tp2_llama_dora.pt")
    for step, (ours, ref) in enumerate(zip(trained["losses"], ref_losses), start=1):
        assert abs(ours - ref) <= TRAIN_RTOL * abs(ref), f"step {step}: loss {ours} vs PEFT loop {ref}"
    for step, (ours, ref) in enumerate(zip(trained["grad_norms"], ref_norms), start=1):
        assert abs(ours - ref) <= TRAIN_RTOL * abs(ref), f"step {step}: gradient norm {ours} vs PEFT loop {ref}"
    assert set(trained["adapter"]) == set(ref_adapter)
    initial = support.peft_state(support.peft_model(llama_hf, "llama", "dora"))
    for key, ref in ref_adapter.items():
        assert not torch.equal(ref, initial[key]), f"{key} did not train"
        err = _relative_error(trained["adapter"][key], ref)
        assert err <= TRAIN_RTOL, f"{key}: after 4 steps differs from the PEFT loop by {err:.2e} (relative)"
        # the change itself, which the tensor's unchanged part cannot hide
        update_err = _relative_error(trained["adapter"][key] - initial[key], ref - initial[key])
        assert update_err <= UPDATE_RTOL, f"{key}: its 4-step update differs from the PEFT loop's by {update_err:.2e}"
