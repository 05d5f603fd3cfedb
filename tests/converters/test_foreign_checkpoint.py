"""Checkpoints megaswift did not write (Megatron-LM, Megatron-Bridge, ms-swift): torch_dist folders with
latest_checkpointed_iteration.txt and iter_%07d/, saved here by megatron-core's own dist_checkpointing.save from
a GPTModel at TP=2/PP=2 holding a tiny HF model's weights (tests/converters/foreign_worker.py): with stacked
layer keys, with per-layer keys, and behind a "module." prefix. Exported with --hf-config they must equal the
HF tensors bit for bit; a finetune run must start from their weights; wrong configs and folders must fail
naming the key."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converters import ConversionError, hf2mcore, mcore2hf
from tests.torchrun import REPO, run_torchrun
from tests.train.runner import run_pt

ITERATION = 100
WORKER = REPO / "tests" / "converters" / "foreign_worker.py"


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, hf_model_dirs):
    """(HF folder, megaswift checkpoint of it, folder with the Megatron-LM-style saves `stacked`, `per_layer`)."""
    hf_dir = hf_model_dirs("llama", "fp32")  # 4 layers, untied output layer
    source = tmp_path_factory.mktemp("foreign-source") / "ckpt"
    hf2mcore(hf_dir, source, verify=False, progress=False)
    out = tmp_path_factory.mktemp("foreign")
    run_torchrun([WORKER, source, out, "--tp", "2", "--pp", "2", "--iteration", str(ITERATION)], nproc=4, timeout=500)
    return hf_dir, source, out


def _hf_tensors(folder: Path) -> dict:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_bit_exact(exported: Path, hf_dir: Path) -> None:
    got, expected = _hf_tensors(exported), _hf_tensors(hf_dir)
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def _stored(folder: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {k: tuple(v.size) for k, v in md.items() if isinstance(v, TensorStorageMetadata)}


def test_megatron_lm_checkpoints_export_bit_exact(foreign, tmp_path):
    hf_dir, _, root = foreign
    layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    # What megatron-core 0.19 wrote, as Megatron-LM names it: the tracker holds digits, the folder is iter_%07d,
    # no megaswift.json, "model" is gone from the keys, optimizer entries keyed after the parameters.
    for variant in ("stacked", "per_layer"):
        assert (root / variant / "latest_checkpointed_iteration.txt").read_text() == str(ITERATION)
        assert not (root / variant / f"iter_{ITERATION:07d}" / "megaswift.json").exists()
    stacked = _stored(root / "stacked" / f"iter_{ITERATION:07d}")
    per_layer = _stored(root / "per_layer" / f"iter_{ITERATION:07d}")
    assert stacked["decoder.layers.mlp.linear_fc2.weight"][0] == layers
    fc2 = "mlp.linear_fc2.weight"
    assert per_layer[f"decoder.layers.{layers - 1}.{fc2}"] == stacked[f"decoder.layers.{fc2}"][1:]
    assert "optimizer.state.exp_avg.embedding.word_embeddings.weight" in stacked
    assert not any(k.startswith("model") for k in stacked)

    # A checkpoint root with the config folder (its tokenizer files travel), an iter_* folder with config.json.
    mcore2hf(root / "stacked", tmp_path / "stacked", hf_config=hf_dir, verify=False, progress=False)
    mcore2hf(root / "per_layer" / f"iter_{ITERATION:07d}", tmp_path / "per_layer", hf_config=hf_dir / "config.json",
             verify=False, progress=False)
    assert "module.decoder.final_layernorm.weight" in _stored(root / "prefixed" / f"iter_{ITERATION:07d}")
    mcore2hf(root / "prefixed", tmp_path / "prefixed", hf_config=hf_dir, verify=False, progress=False)
    # Megatron-LM's release form: the tracker says "release", the folder is release/.
    released = tmp_path / "released"
    released.mkdir()
    (released / "release").symlink_to(root / "stacked" / f"iter_{ITERATION:07d}")
    (released / "latest_checkpointed_iteration.txt").write_text("release")
    mcore2hf(released, tmp_path / "release", hf_config=hf_dir, verify=False, progress=False)
    for variant in ("stacked", "per_layer", "prefixed", "release"):
        _assert_bit_exact(tmp_path / variant, hf_dir)
        config = json.loads((tmp_path / variant / "config.json").read_text())
        assert config["num_hidden_layers"] == layers and config["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "stacked" / "generation_config.json").is_file()


def _with(hf_dir: Path, folder: Path, **changes) -> Path:
    config = {**json.loads((hf_dir / "config.json").read_text()), **changes}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_wrong_config_or_folder_is_an_error_naming_the_key(foreign, tmp_path):
    hf_dir, megaswift_ckpt, root = foreign
    stacked, per_layer = root / "stacked", root / "per_layer"
    # Without the config: the CLI says what to add.
    from megaswift.cli.main import main
    assert main(["convert", "mcore2hf", str(stacked), str(tmp_path / "a"), "--no-progress"]) == 1
    with pytest.raises(ConversionError, match="not written by megaswift.*--hf-config DIR_OR_CONFIG_JSON"):
        mcore2hf(stacked, tmp_path / "a", verify=False, progress=False)
    # More layers than stored: the missing keys, with the shapes expected.
    with pytest.raises(ConversionError, match=r"missing: \[decoder\.layers\.4\.mlp.* \[64, 128\].*config\.json"):
        mcore2hf(per_layer, tmp_path / "b", hf_config=_with(hf_dir, tmp_path / "six", num_hidden_layers=6),
                 verify=False, progress=False)
    # Fewer: the stored tensors that have no place.
    with pytest.raises(ConversionError, match=r"no place in it: \[decoder\.layers\.2\..*decoder\.layers\.3\."):
        mcore2hf(per_layer, tmp_path / "c", hf_config=_with(hf_dir, tmp_path / "two", num_hidden_layers=2),
                 verify=False, progress=False)
    # Other sizes: key, expected and found.
    with pytest.raises(ConversionError, match=r"decoder\.layers\.mlp\.linear_fc2\.weight: expected \[4, 64, 96\], "
                                              r"found \[4, 64, 128\]"):
        mcore2hf(stacked, tmp_path / "d", hf_config=_with(hf_dir, tmp_path / "ffn", intermediate_size=96),
                 verify=False, progress=False)
    # A tracker naming an iteration that is not there.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "latest_checkpointed_iteration.txt").write_text("200")
    with pytest.raises(ConversionError, match=r"names iteration 200, but .*iter_0000200 does not exist"):
        mcore2hf(broken, tmp_path / "e", hf_config=hf_dir, verify=False, progress=False)
    # A megaswift checkpoint records its config.
    with pytest.raises(ConversionError, match="megaswift checkpoint.*drop --hf-config"):
        mcore2hf(megaswift_ckpt, tmp_path / "f", hf_config=hf_dir, verify=False, progress=False)
    # Megatron-LM's legacy format.
    legacy = tmp_path / "legacy"
    (legacy / "iter_0000005" / "mp_rank_00").mkdir(parents=True)
    (legacy / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(ConversionError, match=r"iter_0000005 is in Megatron-LM's legacy 'torch' format.*torch_dist"):
        mcore2hf(legacy, tmp_path / "g", hf_config=hf_dir, verify=False, progress=False)
    assert not any((tmp_path / name).exists() for name in "abcdefg")

    # Training from it: weights only, and the config named.
    from megaswift.config import ConfigError, PretrainConfig, config_from_dict
    from megaswift.train.resume import checkpoint_to_load

    def start(**checkpoint_and_model):
        model = {"hf_config": checkpoint_and_model.pop("hf_config", None)}
        return checkpoint_to_load(config_from_dict(PretrainConfig, {"checkpoint": {"load": str(stacked),
                                                                                   **checkpoint_and_model},
                                                                    "model": model}))
    with pytest.raises(ConfigError, match="not written by megaswift.*add --checkpoint.finetune"):
        start(hf_config=str(hf_dir))
    with pytest.raises(ConfigError, match="records no HF config.*--model.hf_config DIR"):
        start(finetune=True)
    with pytest.raises(ConfigError, match=r"another global shape: \[decoder\.layers\.mlp\.linear_fc1\.weight: "
                                          r"expected \[4, 192, 64\], found \[4, 256, 64\]"):
        start(finetune=True, hf_config=str(tmp_path / "ffn"))


def test_finetune_starts_from_megatron_lm_checkpoint(foreign, demo_data, tmp_path):
    """One process loads the TP=2/PP=2 per-layer save; at lr 0 the weights it saves after a step are the loaded
    ones, so exporting them gives the HF tensors back bit for bit (a random start could not)."""
    hf_dir, _, root = foreign
    tokenizer, prefix = demo_data
    settings = {"model.hf_config": hf_dir, "checkpoint.load": root / "per_layer", "checkpoint.finetune": "true",
                "checkpoint.save": tmp_path / "ckpt", "data.paths": prefix, "data.tokenizer": tokenizer,
                "data.seq_length": 32, "data.split": "100,0,0", "train.micro_batch_size": 1,
                "train.global_batch_size": 2, "train.train_iters": 1, "train.lr": 0, "train.min_lr": 0,
                "train.lr_warmup_iters": 0, "train.lr_decay_style": "constant", "train.precision": "fp32",
                "logging.output_dir": tmp_path, "logging.progress_bar": "false", "logging.tensorboard": "false"}
    proc = run_pt([item for key, value in settings.items() for item in (f"--{key}", str(value))])
    assert f"starting from the weights of {root / 'per_layer' / f'iter_{ITERATION:07d}'} at step 0" in proc.stdout
    mcore2hf(tmp_path / "ckpt", tmp_path / "exported", verify=False, progress=False)
    _assert_bit_exact(tmp_path / "exported", hf_dir)


def test_training_loader_reads_every_key_layout(foreign):
    """What training's load_checkpoint does for such a folder, in one process at TP=1: the three layouts give
    the same weights (the per-layer one is shown equal to the HF model by the finetune test)."""
    from converters.process_group import single_process_model_parallel
    from megaswift.checkpointing.layout import CheckpointError
    from megaswift.checkpointing.state import load_checkpoint
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks
    hf_dir, _, root = foreign
    hf = json.loads((hf_dir / "config.json").read_text())
    weights = {}
    with single_process_model_parallel():
        config = hf_to_transformer_config(hf, ParallelConfig(), params_dtype=torch.float32)
        config.perform_initialization = False
        for variant in ("per_layer", "stacked", "prefixed"):
            (model,) = build_model_chunks(hf, config)
            assert load_checkpoint(root / variant / f"iter_{ITERATION:07d}", [model], verify=False) == ITERATION
            weights[variant] = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        with pytest.raises(CheckpointError, match="only its weights can be loaded.*checkpoint.finetune=true"):
            load_checkpoint(root / "stacked" / f"iter_{ITERATION:07d}", [model], optimizer=object(), verify=False)
    for variant in ("stacked", "prefixed"):
        assert weights[variant].keys() == weights["per_layer"].keys()
        for key, tensor in weights["per_layer"].items():
            assert torch.equal(weights[variant][key], tensor), (variant, key)
