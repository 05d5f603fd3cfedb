"""A LoRA run's checkpoints hold its adapters and their optimizer state only, name the base they sit on (path
and fingerprint), refuse another base and a run with other adapter settings or no adapters, resume bit for bit
like full runs, and export to a PEFT adapter that reproduces megaswift's logits in PeftModel."""
import json
import shutil

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from converters import ConversionError, hf2mcore, mcore2hf
from megaswift.checkpointing.adapter import base_fingerprint
from megaswift.checkpointing.layout import CheckpointError, META_FILE, read_meta
from megaswift.config import ConfigError, PretrainConfig
from megaswift.train.resume import check_adapter_start, checkpoint_to_load
from tests.converters.test_lora_peft import hf_logits, make_peft_adapter, megaswift_logits, peft_logits
from tests.converters.tiny_models import save_tiny_hf_model
from tests.train.runner import losses, pt_flags, run_pt

TOTAL = 4


@pytest.fixture(scope="module")
def lora_run(demo_data, tiny_tokenizer_dir, tmp_path_factory):
    """A tiny Llama converted with a PEFT LoRA adapter imported beside it (hf2mcore --adapter), a 4-step run
    continuing that adapter (saving before the first step and at steps 2 and 4), and a second run resumed from
    the step-2 checkpoint: (root, HF base folder, losses straight, losses resumed)."""
    root = tmp_path_factory.mktemp("lora_ckpt")
    hf_dir = save_tiny_hf_model("tiny-llama", root / "hf", torch.float32, tiny_tokenizer_dir)
    hf2mcore(hf_dir, root / "base", verify=False, progress=False,
             adapter=make_peft_adapter(hf_dir, root / "peft", dora=False))
    # Only --tuner.type is given: rank and alpha come from the imported adapter; adapter dropout on, so the
    # resume has RNG state to restore.
    run_pt(pt_flags(demo_data, root / "straight", checkpoint__load=root / "base", checkpoint__save=root / "lora",
                    checkpoint__save_interval=2, checkpoint__save_initial="true", train__train_iters=TOTAL,
                    tuner__type="lora", tuner__dropout=0.1))
    # The resumed run names only where to start and save: tuner settings and the rest come from the checkpoint.
    run_pt(["--checkpoint.load", str(root / "lora" / "iter_0000002"), "--checkpoint.save", str(root / "resumed"),
            "--logging.output_dir", str(root / "resumed_logs"), "--logging.progress_bar", "false",
            "--logging.tensorboard", "false"])
    return root, hf_dir, losses(root / "straight"), losses(root / "resumed_logs")


def test_lora_resume_is_bit_identical(lora_run):
    _, _, straight, resumed = lora_run
    assert sorted(straight) == list(range(1, TOTAL + 1)) and sorted(resumed) == [3, 4]
    assert resumed == {step: straight[step] for step in (3, 4)}  # fp32 on CPU, dropout on: exactly equal


def test_training_continues_the_imported_adapter(lora_run, tmp_path):
    """The step-0 save of the run holds the PEFT adapter it was started on, bit for bit."""
    from safetensors.torch import load_file

    root = lora_run[0]
    mcore2hf(root / "lora" / "iter_0000000", tmp_path / "step0", progress=False)
    imported, saved = load_file(root / "peft" / "adapter_model.safetensors"), \
        load_file(tmp_path / "step0" / "adapter_model.safetensors")
    assert sorted(imported) == sorted(saved) and all(torch.equal(imported[k], saved[k]) for k in imported)
    assert read_meta(root / "lora" / "iter_0000004")["adapter"]["tuner"]["alpha"] == 8.0  # the adapter's own


def test_lora_checkpoint_holds_adapters_and_their_optimizer_state_only(lora_run):
    root = lora_run[0]
    ckpt = root / "lora" / "iter_0000004"
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    tensors = [k for k in keys if not k.startswith(("common_state", "rng_state"))]
    assert tensors and all(".adapter." in k for k in tensors), [k for k in tensors if ".adapter." not in k]
    assert any(k.startswith("optimizer.state.exp_avg.") for k in tensors)
    base_keys = FileSystemReader(str(root / "base" / "iter_0000000")).read_metadata().state_dict_metadata
    assert not set(keys) & {k for k in base_keys if k.startswith(("decoder.", "embedding.", "output_layer."))}
    meta = read_meta(ckpt)
    base = root / "base" / "iter_0000000"
    assert meta["adapter"]["base"] == {"path": str(base.resolve()), "fingerprint": base_fingerprint(base),
                                       "iteration": 0}
    assert meta["adapter"]["tuner"]["rank"] == 4 and meta["adapter"]["type"] == "lora"
    assert meta["contents"] == ["model", "optimizer", "scheduler"]


def test_trained_adapter_exports_to_peft_with_the_same_logits(lora_run, tmp_path):
    root, hf_dir = lora_run[0], lora_run[1]
    mcore2hf(root / "lora", tmp_path / "adapter", progress=False)
    ours = megaswift_logits(root / "lora" / "iter_0000004")
    theirs = peft_logits(hf_dir, tmp_path / "adapter")
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (theirs - hf_logits(hf_dir)).abs().max().item() > 1e-4  # the adapter matters
    # The base as PEFT knows it: the HF folder the base checkpoint was converted from.
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_dir.resolve()) and config["r"] == 4


def _copy_of_run(root, tmp_path):
    """The step-4 adapter checkpoint alone, in a folder of its own (its recorded base unchanged)."""
    copy = tmp_path / "lora" / "iter_0000004"
    shutil.copytree(root / "lora" / "iter_0000004", copy)
    return copy


def test_another_base_at_the_recorded_path_is_refused(lora_run, tiny_tokenizer_dir, tmp_path):
    root = lora_run[0]
    copy = _copy_of_run(root, tmp_path)
    other_hf = save_tiny_hf_model("tiny-llama", tmp_path / "other_hf", torch.float32, tiny_tokenizer_dir, seed=7)
    hf2mcore(other_hf, tmp_path / "other", verify=False, progress=False)
    meta = json.loads((copy / META_FILE).read_text())
    meta["adapter"]["base"]["path"] = str(tmp_path / "other" / "iter_0000000")  # as if the base were replaced
    (copy / META_FILE).write_text(json.dumps(meta))

    with pytest.raises(ConversionError) as error:
        mcore2hf(copy, tmp_path / "merged", progress=False, merge=True)
    assert not (tmp_path / "merged").exists()
    config = PretrainConfig()
    config.checkpoint.load = str(copy)
    with pytest.raises(CheckpointError) as refused:
        checkpoint_to_load(config)
    for message in (str(error.value), str(refused.value)):
        for expected in (str(copy), str(tmp_path / "other" / "iter_0000000"), "fingerprint",
                         meta["adapter"]["base"]["fingerprint"]):
            assert expected in message, (expected, message)


def test_adapter_checkpoint_needs_a_lora_run_with_its_settings(lora_run):
    ckpt = lora_run[0] / "lora" / "iter_0000004"
    full = PretrainConfig()
    full.checkpoint.load = str(ckpt)
    with pytest.raises(ConfigError, match=r"tuner.type: 'lora' in the checkpoint, 'full' in this run"):
        check_adapter_start(checkpoint_to_load(full), full)

    other_rank = PretrainConfig()
    other_rank.checkpoint.load = str(ckpt)
    other_rank.tuner.type, other_rank.tuner.rank, other_rank.tuner.alpha = "lora", 8, 8.0
    with pytest.raises(ConfigError) as error:
        check_adapter_start(checkpoint_to_load(other_rank), other_rank)
    assert "tuner.rank: 4 in the checkpoint, 8 in this run" in str(error.value)
    assert "--tuner.rank 4" in str(error.value)


def test_a_full_run_cannot_load_adapter_weights(lora_run):
    """The library path too (checkpointing.state.load_checkpoint into a model without adapters)."""
    from converters.process_group import single_process_model_parallel
    from megaswift.checkpointing.state import load_checkpoint
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks

    ckpt = lora_run[0] / "lora" / "iter_0000004"
    hf = read_meta(ckpt)["hf_config"]
    with single_process_model_parallel():
        (model,) = build_model_chunks(hf, hf_to_transformer_config(hf, ParallelConfig(), params_dtype=torch.float32),
                                      "local")
        with pytest.raises(CheckpointError, match="adapter checkpoint .* --merge"):
            load_checkpoint(ckpt, [model])


def test_retention_spares_the_base_a_kept_adapter_checkpoint_sits_on(tmp_path):
    """A LoRA run saving into its base's folder (the base is iter_0000000 there): keep_last never deletes it."""
    from megaswift.checkpointing.layout import iteration_dir, write_latest, write_meta
    from megaswift.checkpointing.retention import apply_retention

    base = iteration_dir(tmp_path, 0)
    base.mkdir()
    write_meta(base, {"iteration": 0})
    for step in (2, 4):
        folder = iteration_dir(tmp_path, step)
        folder.mkdir()
        write_meta(folder, {"iteration": step, "adapter": {"type": "lora", "tuner": {},
                                                           "base": {"path": str(base), "fingerprint": "x"}}})
    write_latest(tmp_path, 4)
    assert apply_retention(tmp_path, keep_last=1, keep_every=0) == [iteration_dir(tmp_path, 2)]
    assert base.is_dir() and iteration_dir(tmp_path, 4).is_dir()
