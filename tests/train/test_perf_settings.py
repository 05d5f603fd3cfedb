"""The `perf` settings and the `megatron` pass-through reach the configs megatron-core is actually given, and
the settings that must not change results do not: activation recompute at TP=2 and PP=2, and the gradient
reduce / parameter gather overlaps (which gloo runs too) at DP=2, including the weights a checkpoint holds.

Each multi-process case is ONE torchrun launch that trains the same run once per setting (perf_settings_worker.py).
"""
import json
from pathlib import Path

import pytest
import torch

from tests.torchrun import free_port, run_torchrun
from tests.train.runner import pt_flags

WORKER = Path(__file__).with_name("perf_settings_worker.py")
STEPS = 3  # step 1 has lr 0 (warmup), so steps 2 and 3 are the ones a wrong update would change


def _config(demo_data, tmp_path, *flags):
    from megaswift.cli.main import parse_command_line
    from megaswift.cli.pt import prepare
    config, trainer = prepare(parse_command_line(["pt", *pt_flags(demo_data, tmp_path), *flags]))
    return config, trainer


def test_settings_reach_the_configs_the_trainer_builds(demo_data, tmp_path):
    """Trainer._build in one process (a world of one): the TransformerConfig, DDP config and optimizer config
    of the model it really makes."""
    from megatron.core.utils import get_model_config

    from megaswift.platform.cpu import cpu_patches
    from megaswift.train.distributed import init_distributed, shutdown_distributed
    config, trainer = _config(
        demo_data, tmp_path, "--perf.recompute", "full", "--perf.recompute_method", "block",
        "--perf.recompute_num_layers", "3", "--perf.overlap_grad_reduce", "--perf.overlap_param_gather",
        "--perf.bucket_size", "20000", "--parallel.distributed_optimizer", "--perf.bias_dropout_fusion", "false",
        "--megatron.attention_softmax_in_fp32", "false", "--megatron.moe_router_dtype", "fp64",
        "--megatron.check_for_large_grads", "true", "--megatron.moe_z_loss_coeff", "0.001")
    # parsed by each field's type, and recorded that way in the run's config (and so in its checkpoints)
    assert config.megatron == {"attention_softmax_in_fp32": False, "moe_router_dtype": "fp64",
                               "check_for_large_grads": True, "moe_z_loss_coeff": 0.001}
    with cpu_patches():
        init_distributed(config.parallel, config.train.seed)
        try:
            model, optimizer, _ = trainer._build()
            tconfig, ddp = get_model_config(model[0]), model[0].ddp_config
            bucket_groups = len(model[0].bucket_groups)
            optimizer_configs = [o.config for o in optimizer.chained_optimizers]
        finally:
            shutdown_distributed()
    assert (tconfig.recompute_granularity, tconfig.recompute_method, tconfig.recompute_num_layers) == \
        ("full", "block", 3)
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.bucket_size) == (True, True, 20000)
    assert bucket_groups > 1  # the bucket size really split the gradients
    assert all(c.overlap_param_gather for c in optimizer_configs)
    # no GPU here: every fusion off
    assert not any((tconfig.bias_activation_fusion, tconfig.bias_dropout_fusion, tconfig.masked_softmax_fusion,
                    tconfig.apply_rope_fusion, tconfig.gradient_accumulation_fusion,
                    tconfig.cross_entropy_loss_fusion))
    assert (tconfig.attention_softmax_in_fp32, tconfig.moe_router_dtype, tconfig.moe_z_loss_coeff) == \
        (False, "fp64", 0.001)
    assert ddp.check_for_large_grads is True


def test_fusions_default_to_what_the_gpu_path_runs():
    """Unset, each fusion is on where this machine's GPU path has its kernel; set, it is what was set."""
    from megaswift.config.sections import PerformanceConfig
    from megaswift.models.mcore_config import Accelerators, fusion_fields
    bare_gpu = Accelerators(gpu=True, transformer_engine=False, te_layers=False, grad_accum_kernel=False)
    full_gpu = Accelerators(gpu=True, transformer_engine=True, te_layers=True, grad_accum_kernel=True)
    cpu = Accelerators(gpu=False, transformer_engine=False, te_layers=False, grad_accum_kernel=False)
    assert not any(fusion_fields(PerformanceConfig(), cpu).values())
    assert all(fusion_fields(PerformanceConfig(), full_gpu).values())
    on_bare_gpu = fusion_fields(PerformanceConfig(), bare_gpu)
    assert on_bare_gpu["bias_activation_fusion"] and on_bare_gpu["cross_entropy_loss_fusion"]
    assert not on_bare_gpu["apply_rope_fusion"] and not on_bare_gpu["gradient_accumulation_fusion"]
    assert fusion_fields(PerformanceConfig(apply_rope_fusion=False), full_gpu)["apply_rope_fusion"] is False


def test_moe_grouped_gemm_follows_the_layer_spec():
    from megaswift.config import ParallelConfig
    from megaswift.config.sections import PerformanceConfig
    from megaswift.models import hf_to_transformer_config, preset_hf_config
    from megaswift.models.mcore_config import Accelerators
    hf = preset_hf_config("tiny-mixtral")
    te = Accelerators(gpu=False, transformer_engine=False, te_layers=True, grad_accum_kernel=False)
    local = Accelerators(gpu=False, transformer_engine=False, te_layers=False, grad_accum_kernel=False)
    assert hf_to_transformer_config(hf, ParallelConfig(), accelerators=te).moe_grouped_gemm
    assert not hf_to_transformer_config(hf, ParallelConfig(), accelerators=local).moe_grouped_gemm
    assert not hf_to_transformer_config(hf, ParallelConfig(), accelerators=te,
                                        perf=PerformanceConfig(moe_grouped_gemm=False)).moe_grouped_gemm


def _train_variants(demo_data, tmp_path, common: dict, variants: list[list[str]]) -> list[dict[int, float]]:
    out = tmp_path / "losses.json"
    flags = pt_flags(demo_data, tmp_path / "logs", train__train_iters=STEPS, **common)
    ports = ",".join(str(free_port()) for _ in variants[1:])
    args = [WORKER, out, ports, *flags]
    for variant in variants:
        args += ["--", *variant]
    run_torchrun(args, nproc=2, timeout=400)
    return [{int(step): loss for step, loss in losses.items()} for losses in json.loads(out.read_text())]


def _assert_equal_losses(reference: dict, other: dict, what: str, rel: float = 1e-6):
    assert sorted(reference) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert other[step] == pytest.approx(loss, rel=rel, abs=0), f"{what}, step {step}: {other} vs {reference}"


@pytest.mark.parametrize("layout, recompute", [
    ({"parallel__tensor": 2}, ["--perf.recompute", "selective", "--perf.recompute_modules", "core_attn", "mlp"]),
    ({"parallel__pipeline": 2}, ["--perf.recompute", "full", "--perf.recompute_method", "uniform"]),
], ids=["tp2_selective", "pp2_full"])
def test_recompute_gives_the_same_losses(layout, recompute, demo_data, tmp_path):
    off, on = _train_variants(demo_data, tmp_path, layout, [[], recompute])
    _assert_equal_losses(off, on, f"recompute {recompute}")


def _checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a torch_dist checkpoint, read back with torch's own DCP reader."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    target = folder.with_suffix(".pt")
    dcp_to_torch_save(folder, target)
    state = torch.load(target, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def test_overlaps_give_the_same_losses_and_checkpoint_on_gloo(demo_data, tmp_path):
    """DP=2: the all-reduce overlap; the distributed optimizer's reduce-scatter and parameter-gather overlaps,
    whose checkpoint must hold every rank's updated weights (they reach other ranks only in the next forward)."""
    overlap = ["--perf.overlap_grad_reduce", "--perf.bucket_size", "20000"]
    plain, reduce_overlap, dist_plain, dist_overlap = _train_variants(demo_data, tmp_path, {}, [
        [], overlap,
        ["--parallel.distributed_optimizer", "--checkpoint.save", str(tmp_path / "plain")],
        ["--parallel.distributed_optimizer", *overlap, "--perf.overlap_param_gather",
         "--checkpoint.save", str(tmp_path / "overlap")]])
    _assert_equal_losses(plain, reduce_overlap, "overlap_grad_reduce (all-reduce)")
    _assert_equal_losses(dist_plain, dist_overlap, "overlap_grad_reduce + overlap_param_gather (distributed optimizer)")
    saved = [_checkpoint_weights(tmp_path / name / f"iter_{STEPS:07d}") for name in ("plain", "overlap")]
    assert sorted(saved[0]) == sorted(saved[1]) and saved[0]
    for name, tensor in saved[0].items():
        # buckets reduce in another order: rounding only (a stale shard is off by about lr = 1e-3)
        torch.testing.assert_close(saved[1][name], tensor, rtol=0, atol=1e-6, msg=name)
