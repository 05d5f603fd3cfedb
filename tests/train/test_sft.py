"""`megaswift sft`: packed rows train exactly like the same samples one per row, in every layout."""
import json

import pytest
from transformers import AutoTokenizer

from megaswift.data.sft import PackedSFTDataset, SFTDataSettings, preprocess_sft
from tests.torchrun import run_torchrun
from tests.train.runner import losses
from tests.train.test_parallel_equivalence import _assert_same_losses

SEQ = 128
STEPS = 3
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def _write_alpaca(path, count=8):
    rows = []
    for i in range(count):
        n = 3 + (i * 5) % 17  # varied lengths, so packing actually mixes samples
        rows.append({"instruction": f"Repeat {n} words starting at {WORDS[i]}.",
                     "input": "", "output": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Non-uniform token weights (3, 0.5 and 0 = untrained) so that packing must carry each sample's weights
# to the right tokens; all weights 1 would hide a misplaced or dropped loss_scale.
LOSS_SCALE = {"rules": [{"pattern": "(alpha|beta|gamma|delta)", "weights": [3.0]},
                        {"pattern": "(epsilon|zeta|eta|theta)", "weights": [0.5]},
                        {"pattern": "(iota|kappa)", "weights": [0.0]}]}


@pytest.fixture(scope="module")
def sft_setup(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    data = _write_alpaca(root / "train.jsonl")
    (root / "weights.json").write_text(json.dumps(LOSS_SCALE))
    tokenizer_dir = str(demo_data[0])
    cache = root / "cache"
    samples = preprocess_sft(SFTDataSettings(datasets=(str(data),), max_length=SEQ, loss_on="all_assistant",
                                             loss_scale=str(root / "weights.json")),
                             AutoTokenizer.from_pretrained(tokenizer_dir), cache, report=False).dataset
    assert {0.0, 0.5, 1.0, 3.0} <= {w for row in samples["loss_scale"] for w in row}
    packed_rows = len(PackedSFTDataset(samples, SEQ, 0))
    assert packed_rows < len(samples), "the samples must share rows for this test to mean anything"
    assert packed_rows % 2 == 0, "the DP=2 layout needs a global batch (all packed rows) divisible by 2"
    # Init weights once, so every run below starts from the same model.
    init = root / "init"
    _sft(root, data, tokenizer_dir, cache, root / "init_logs", nproc=1, packing=False, rows=len(samples),
         extra=["--train.train_iters", "0", "--checkpoint.save", str(init), "--checkpoint.save_initial", "true"])
    return root, data, tokenizer_dir, cache, init, len(samples), packed_rows


def _sft(root, data, tokenizer_dir, cache, out, nproc, packing, rows, extra=(), init=None):
    """One step = the whole dataset (global batch = all rows), so packed and unpacked steps see the same samples."""
    flags = ["sft", "--model.preset", "tiny-llama", "--data.datasets", str(data), "--data.tokenizer", tokenizer_dir,
             "--data.seq_length", str(SEQ), "--data.cache_dir", str(cache), "--data.packing", str(packing).lower(),
             "--data.loss_on", "all_assistant", "--data.loss_scale", str(root / "weights.json"),
             "--train.micro_batch_size", "1",
             "--train.global_batch_size", str(rows), "--train.train_iters", str(STEPS), "--train.lr", "1e-3",
             "--train.lr_warmup_iters", "0", "--train.precision", "fp32", "--logging.output_dir", str(out),
             "--logging.progress_bar", "false", "--logging.tensorboard", "false", *extra]
    if init is not None:
        flags += ["--checkpoint.load", str(init), "--checkpoint.finetune", "true"]
    run_torchrun(["-m", "megaswift", *flags], nproc=nproc, timeout=300)
    return losses(out)


@pytest.fixture(scope="module")
def unpacked_single(sft_setup):
    root, data, tok, cache, init, n_samples, _ = sft_setup
    return _sft(root, data, tok, cache, root / "unpacked", 1, False, n_samples, init=init)


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, []), (2, ["--parallel.tensor", "2"]),
                                           (2, ["--parallel.pipeline", "2"])], ids=["single", "dp2", "tp2", "pp2"])
def test_packed_equals_unpacked(nproc, layout, sft_setup, unpacked_single, tmp_path):
    root, data, tok, cache, init, _, packed_rows = sft_setup
    packed = _sft(root, data, tok, cache, tmp_path, nproc, True, packed_rows, extra=layout, init=init)
    _assert_same_losses(packed, unpacked_single)


def _trainer(monkeypatch, world=1, **settings):
    from megaswift.config import SFTConfig
    from megaswift.objectives.sft import SFTObjective
    from megaswift.train.trainer import Trainer
    monkeypatch.setenv("WORLD_SIZE", str(world))
    config = SFTConfig()
    config.data.seq_length, config.data.packing, config.train.micro_batch_size = SEQ, True, 2
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return Trainer(config, SFTObjective())


@pytest.mark.parametrize("settings, attention, shape", [
    ({"model__layer_spec": "te", "train__precision": "bf16"}, "thd", (2 * SEQ, 1)),
    ({"model__layer_spec": "te", "train__precision": "fp16"}, "thd", (2 * SEQ, 1)),
    ({"model__layer_spec": "local", "train__precision": "fp32"}, "mask", (SEQ, 2)),
    ({"model__layer_spec": "te", "train__precision": "bf16", "data__packing": False}, None, (SEQ, 2)),
])
def test_trainer_packs_thd_for_transformer_engine_and_masks_for_local_attention(settings, attention, shape,
                                                                                monkeypatch):
    trainer = _trainer(monkeypatch, **settings)
    assert trainer.packed_attention == attention
    assert trainer.micro_batch_shape() == shape  # what pipeline stages exchange per micro-batch


@pytest.mark.parametrize("settings, world, message", [
    ({"model__layer_spec": "te", "train__precision": "fp32"}, 1, "found train.precision resolving to fp32"),
    ({"model__layer_spec": "te", "train__precision": "bf16", "parallel__context": 2}, 2,
     "data.packing=true with parallel.context=2 is not supported"),
])
def test_trainer_refuses_packing_combinations_it_does_not_support(settings, world, message, monkeypatch):
    from megaswift.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        _trainer(monkeypatch, world=world, **settings)


def test_a_preprocessing_failure_on_rank_0_stops_every_rank_with_a_clear_message(demo_data, tmp_path):
    data = _write_alpaca(tmp_path / "long.jsonl", count=4)  # every sample is longer than 8 tokens: all dropped
    flags = ["sft", "--data.datasets", str(data), "--data.tokenizer", str(demo_data[0]), "--data.seq_length", "8",
             "--data.cache_dir", str(tmp_path / "cache"), "--train.micro_batch_size", "1",
             "--train.global_batch_size", "2", "--train.train_iters", "1", "--train.precision", "fp32",
             "--logging.output_dir", str(tmp_path / "out"), "--logging.progress_bar", "false",
             "--logging.tensorboard", "false"]
    proc = run_torchrun(["-m", "megaswift", *flags], nproc=2, timeout=240, check=False)
    assert proc.returncode != 0
    assert "megaswift sft: error: sft data: expected at least one usable row, found none" in proc.stderr
    assert "megaswift sft: error: sft data: preprocessing failed on rank 0" in proc.stderr
    for symptom in ("Connection closed", "Gloo", "gloo", "DistBackendError"):
        assert symptom not in proc.stderr, proc.stderr[-6000:]
