"""`megaswift pt` and `megaswift sft` train exactly what transformers trains.

Each run starts from an HF model made with transformers (odd vocabulary sizes, so megatron pads them),
converted with hf2mcore; the reference is tests/train/hf_reference.py (transformers + torch AdamW on the
same HF folder and the same micro-batches, read from megaswift's own data source). Every step's loss and
gradient norm must equal the reference's to 1e-5 relative in fp32. Layouts are combined to keep runs few:
    pt    TP=1, tied embeddings + llama3 rope (factor 32); eval_loss against transformers on the
          validation samples of the checkpoint the run saved (exported with mcore2hf)
    sft   TP=2 + --train.fused_loss + --data.loss_scale agent        (Qwen2: qkv biases)
    sft   PP=2 + --data.packing + --data.loss_scale agent (unfused)  (the same model and data: the fused
          and unfused losses must also equal each other)
    sft   EP=2 (x DP=2), Qwen2-MoE: shared expert, top-2 of 4 without renormalisation, no aux loss
    pt    TP=1, DeepSeek-V3 (MLA, YaRN) and GLM-4.5 (partial rope, qk-norm, biases): layer 0 dense, layer 1
          sigmoid-routed experts with expert bias, groups and shared experts
"""
import argparse
import json

import pytest
from transformers import AutoTokenizer

from tests.converters.tiny_models import lazily_converted
from tests.torchrun import run_torchrun
from tests.train.hf_reference import AdamWSettings, evaluation_loss, train_reference
from tests.train.runner import run_pt

STEPS = 4
REL = 1e-5
ADAMW = AdamWSettings(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=1.0)
# Two layers (PP=2 puts one on each stage); vocabularies that are not multiples of 128 x TP.
MODELS = {
    "llama3": ("tiny-llama3", {"num_hidden_layers": 2, "vocab_size": 1037}),
    "qwen2": ("tiny-qwen2", {"num_hidden_layers": 2, "vocab_size": 1100}),
    "qwen2-moe": ("tiny-qwen2-moe", {"num_hidden_layers": 2, "vocab_size": 1100}),
    "deepseek-v3": ("tiny-deepseek-v3", {"num_hidden_layers": 2, "vocab_size": 1037}),
    "glm4-moe": ("tiny-glm4-moe", {"num_hidden_layers": 2, "vocab_size": 1037}),
}
SFT_SEQ = 256


def _flag_list(settings: dict) -> list[str]:
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def _parse(cls, settings: dict):
    """The run's config exactly as megaswift's CLI builds it from the same flags."""
    from megaswift.config import config_from_args
    from megaswift.config.flags import add_config_arguments
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(_flag_list(settings)))


def _metrics(out) -> tuple[dict, dict, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pick = lambda key: {r["step"]: r[key] for r in records if key in r}
    return pick("loss"), pick("grad_norm"), pick("eval_loss")


def _assert_equal_to_reference(out, reference, label: str):
    loss, grad_norm, _ = _metrics(out)
    assert sorted(loss) == list(range(1, STEPS + 1)), loss
    rows = [f"{label}: step  megaswift      transformers   rel.diff"]
    for step, ref in enumerate(reference, 1):
        rows.append(f"{label}: {step:4d}  {loss[step]:.8f}  {ref.loss:.8f}  {abs(loss[step] / ref.loss - 1):.2e}")
    print("\n".join(rows))
    for step, ref in enumerate(reference, 1):
        assert loss[step] == pytest.approx(ref.loss, rel=REL), "\n".join(rows)
        assert grad_norm[step] == pytest.approx(ref.grad_norm, rel=1e-4), \
            f"{label} step {step}: grad norm {grad_norm[step]} vs transformers {ref.grad_norm}"
    return loss


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir):
    """name -> (HF folder made with transformers, its hf2mcore conversion); built once, on first use."""
    return lazily_converted(tmp_path_factory, tiny_tokenizer_dir, MODELS, "parity")


# ---------------------------------------------------------------- pt, TP=1, with evaluation


def _pt_steps(settings: dict, name: str):
    """(the data source, each step's micro-batches), from megaswift's data source built as `megaswift pt`
    builds it (one process): the same micro-batches the run trained on."""
    from megaswift.config import PretrainConfig
    from megaswift.data.pretrain import PretrainData, token_ids_from_tokenizer
    config = _parse(PretrainConfig, settings)
    t = config.train
    source = PretrainData(config.data, token_ids_from_tokenizer(str(settings["data.tokenizer"]),
                                                                MODELS[name][1]["vocab_size"]),
                          t.seed, t.micro_batch_size, t.train_iters * t.global_batch_size,
                          t.eval_iters * t.micro_batch_size)
    train = source.train_iterators(0, 0, 1, 1)[0]
    return source, [[next(train) for _ in range(t.global_batch_size // t.micro_batch_size)] for _ in range(STEPS)]


def test_pt_tp1_and_its_evaluation_equal_transformers(models, demo_data, tmp_path):
    from converters import mcore2hf
    hf_dir, mcore_dir = models("llama3")
    tokenizer_dir, prefix = demo_data
    settings = {"data.paths": prefix, "data.tokenizer": tokenizer_dir, "data.seq_length": 64, "data.split": "90,10,0",
                "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.train_iters": STEPS,
                "train.eval_interval": STEPS, "train.eval_iters": 3, "train.precision": "fp32", **ADAMW.flags(),
                "checkpoint.load": mcore_dir, "checkpoint.finetune": "true", "checkpoint.save": tmp_path / "ckpt",
                "logging.output_dir": tmp_path, "logging.progress_bar": "false", "logging.tensorboard": "false"}
    run_pt(_flag_list(settings), timeout=400)
    source, steps = _pt_steps(settings, "llama3")
    _assert_equal_to_reference(tmp_path, train_reference(hf_dir, steps, ADAMW), "pt tp1")

    # evaluate(): the validation samples, through transformers, with the weights the run saved.
    exported = tmp_path / "exported"
    mcore2hf(tmp_path / "ckpt", exported, verify=False, progress=False)
    valid = source.valid_iterators(0, 1, 1)[0]
    expected = evaluation_loss(exported, [next(valid) for _ in range(settings["train.eval_iters"])])
    eval_loss = _metrics(tmp_path)[2]
    print(f"pt tp1: eval_loss {eval_loss} vs transformers on the validation samples {expected:.8f}")
    assert eval_loss[STEPS] == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("name", ["deepseek-v3", "glm4-moe"])
def test_pt_tp1_sigmoid_routed_moe_equals_transformers(name, models, demo_data, tmp_path):
    """Multi-latent attention (DeepSeek-V3) and partial rope (GLM-4.5), each with a dense layer 0 and a layer
    of sigmoid-routed, grouped experts with an expert bias and shared experts, train as transformers does."""
    hf_dir, mcore_dir = models(name)
    tokenizer_dir, prefix = demo_data
    settings = {"data.paths": prefix, "data.tokenizer": tokenizer_dir, "data.seq_length": 32, "data.split": "100,0,0",
                "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.train_iters": STEPS,
                "train.precision": "fp32", **ADAMW.flags(), "checkpoint.load": mcore_dir, "checkpoint.finetune": "true",
                "logging.output_dir": tmp_path, "logging.progress_bar": "false", "logging.tensorboard": "false",
                # megatron-core moves each router's expert bias (aux-loss-free balancing) after every step;
                # transformers never updates `e_score_correction_bias`, so the reference keeps it fixed
                "megatron.moe_router_bias_update_rate": 0}
    run_pt(_flag_list(settings), timeout=400)
    _assert_equal_to_reference(tmp_path, train_reference(hf_dir, _pt_steps(settings, name)[1], ADAMW), f"pt tp1 {name}")


# ---------------------------------------------------------------- sft


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


@pytest.fixture(scope="module")
def agent_chats(tmp_path_factory):
    """16 two-round ReAct conversations: the agent loss scale weighs Action (3.0), Observation: (2.0) and
    the observed text (0.0) differently from the rest (1.0); lengths vary, so packing mixes samples."""
    rows = []
    for i in range(16):
        word, n = WORDS[i], 2 + (i * 5) % 9
        found = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))
        rows.append({"messages": [
            {"role": "user", "content": f"What comes after {word}?"},
            {"role": "assistant", "content": f"Thought: I should look it up.\nAction: lookup\n"
                                             f"Action Input: {{\"word\": \"{word}\"}}\nObservation: {found}\n"
                                             f"Thought: I know it.\nFinal Answer: {found.split()[-1]}"},
            {"role": "user", "content": "And the first one?"},
            {"role": "assistant", "content": f"The first one is {found.split()[0]}."}]})
    path = tmp_path_factory.mktemp("agent_chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_settings(model_dir, data, tokenizer_dir, out, packing: bool, loss_scale: str, cache) -> dict:
    return {"data.datasets": data, "data.tokenizer": tokenizer_dir, "data.seq_length": SFT_SEQ,
            "data.cache_dir": cache, "data.packing": str(packing).lower(), "data.loss_on": "all_assistant",
            "data.loss_scale": loss_scale, "train.micro_batch_size": 1 if packing else 2,
            "train.train_iters": STEPS, "train.precision": "fp32", **ADAMW.flags(),
            "checkpoint.load": model_dir, "checkpoint.finetune": "true", "logging.output_dir": out,
            "logging.progress_bar": "false", "logging.tensorboard": "false"}


def _sft_steps(settings: dict, tokenizer_dir) -> tuple[int, list[list[dict]]]:
    """(rows in one epoch, the micro-batches of each step) from megaswift's SFT data source; one step is one
    epoch, so packed and unpacked runs train on the same samples at every step."""
    from megaswift.config import SFTConfig
    from megaswift.data.sft.training_source import SFTData
    config = _parse(SFTConfig, settings)
    source = SFTData(config.data, AutoTokenizer.from_pretrained(str(tokenizer_dir)), config.train.seed,
                     config.train.micro_batch_size, "mask")
    batches = source.train_iterators(0, 0, 1, 1)[0]
    rows = batches.dataset.epoch_size
    per_step = rows // config.train.micro_batch_size
    return rows, [[next(batches) for _ in range(per_step)] for _ in range(STEPS)]


def _run_sft(models, name, agent_chats, tiny_tokenizer_dir, out, packing, loss_scale, layout: dict):
    hf_dir, mcore_dir = models(name)
    settings = _sft_settings(mcore_dir, agent_chats, tiny_tokenizer_dir, out, packing, loss_scale,
                             agent_chats.parent / "cache")
    rows, steps = _sft_steps(settings, tiny_tokenizer_dir)
    assert rows % 2 == 0, f"{rows} rows: pick data whose epoch splits into the micro-batches"
    settings["train.global_batch_size"] = rows
    run_torchrun(["-m", "megaswift", "sft", *_flag_list({**settings, **layout})], nproc=2, timeout=400)
    return train_reference(hf_dir, steps, ADAMW)


@pytest.fixture(scope="module")
def fused_agent_tp2(models, agent_chats, tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_tp2_fused_agent")
    reference = _run_sft(models, "qwen2", agent_chats, tiny_tokenizer_dir, out, False, "agent",
                         {"parallel.tensor": 2, "train.fused_loss": "true"})
    return out, reference


def test_sft_tp2_fused_loss_agent_scale_equals_transformers(fused_agent_tp2):
    out, reference = fused_agent_tp2
    _assert_equal_to_reference(out, reference, "sft tp2 fused agent")


def test_sft_pp2_packed_agent_scale_equals_transformers_and_the_fused_loss(models, agent_chats, tiny_tokenizer_dir,
                                                                         fused_agent_tp2, tmp_path):
    reference = _run_sft(models, "qwen2", agent_chats, tiny_tokenizer_dir, tmp_path, True, "agent",
                         {"parallel.pipeline": 2})
    unfused = _assert_equal_to_reference(tmp_path, reference, "sft pp2 packed agent")
    fused = _metrics(fused_agent_tp2[0])[0]
    for step in range(1, STEPS + 1):  # megatron-core's cross entropy vs the fused kernel, weights non-uniform
        assert unfused[step] == pytest.approx(fused[step], rel=REL), f"step {step}: {unfused} vs fused {fused}"


def test_sft_ep2_moe_equals_transformers(models, agent_chats, tiny_tokenizer_dir, tmp_path):
    reference = _run_sft(models, "qwen2-moe", agent_chats, tiny_tokenizer_dir, tmp_path, False, "default",
                         {"parallel.expert": 2})
    _assert_equal_to_reference(tmp_path, reference, "sft ep2 moe")
