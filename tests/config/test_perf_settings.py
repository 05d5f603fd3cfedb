"""The `perf` section and the `megatron` pass-through are checked before any process starts: each bad value
is one ConfigError naming the setting, what was found and what to do; pass-through values are parsed by the
megatron-core field's own type."""
import subprocess
import sys

import pytest

from megaswift.config import ConfigError, ParallelConfig
from megaswift.config.sections import PerformanceConfig
from megaswift.config.validate import validate_megatron_passthrough
from megaswift.models import preset_hf_config
from megaswift.models.mcore_config import FLAG_OF_FIELD, Accelerators, check_performance_settings, model_fields
from tests.torchrun import child_env

LLAMA = preset_hf_config("tiny-llama")  # 4 layers
CPU = Accelerators(gpu=False, transformer_engine=False, te_layers=False, grad_accum_kernel=False)


def _passthrough(values: dict) -> dict:
    return validate_megatron_passthrough(values, FLAG_OF_FIELD, set(model_fields(LLAMA)), where="run.yaml: megatron")


@pytest.mark.parametrize("values, parsed", [
    ({"attention_softmax_in_fp32": "false"}, {"attention_softmax_in_fp32": False}),  # bool, from a flag
    ({"attention_softmax_in_fp32": True}, {"attention_softmax_in_fp32": True}),  # bool, from YAML
    ({"moe_z_loss_coeff": "1e-3"}, {"moe_z_loss_coeff": 0.001}),  # Optional[float]
    ({"moe_router_dtype": "fp64"}, {"moe_router_dtype": "fp64"}),  # Optional[Literal]
    ({"num_buckets": "4"}, {"num_buckets": 4}),  # DDP field, Optional[int]
    ({"moe_layer_freq": ["2"]}, {"moe_layer_freq": 2}),  # Union[int, List[int]]: one value is the int
    ({"moe_layer_freq": ["1", "0"]}, {"moe_layer_freq": [1, 0]}),
    ({"attention_backend": "flash"}, {"attention_backend": "flash"}),  # an enum, by member name
    ({"embedding_init_method_std": "none"}, {"embedding_init_method_std": None}),
])
def test_passthrough_values_are_parsed_by_the_field_type(values, parsed):
    assert _passthrough(values) == parsed


def test_megatron_mapping_in_yaml_with_flags_on_top(tmp_path):
    import argparse

    from megaswift.config import PretrainConfig, config_from_args
    from megaswift.config.flags import add_config_arguments
    run = tmp_path / "run.yaml"
    run.write_text("megatron:\n  attention_softmax_in_fp32: true\n  num_buckets: 2\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    config = config_from_args(PretrainConfig, parser.parse_args(["--config", str(run), "--megatron.num_buckets", "3"]))
    assert _passthrough(config.megatron) == {"attention_softmax_in_fp32": True, "num_buckets": 3}


def test_passthrough_gives_megatron_core_its_own_objects():
    from megatron.core.transformer.enums import AttnBackend

    from megaswift.config.megatron_fields import split_by_owner
    transformer, ddp = split_by_owner(_passthrough({"attention_backend": "flash", "num_buckets": "4",
                                                    "delay_wgrad_compute": "false"}))
    assert transformer == {"attention_backend": AttnBackend.flash, "delay_wgrad_compute": False}
    assert ddp == {"num_buckets": 4, "delay_wgrad_compute": False}  # a field of both configs goes to both


@pytest.mark.parametrize("values, message", [
    ({"recompute_granularty": "full"}, "run.yaml: megatron: megatron.recompute_granularty is not a field of "
                                       "megatron-core's TransformerConfig or DistributedDataParallelConfig; did you "
                                       "mean megatron.recompute_granularity or"),
    ({"recompute_granularity": "full"}, "megatron.recompute_granularity is set by the flag --perf.recompute (or its "
                                        "YAML key); use it instead"),
    ({"tensor_model_parallel_size": 2}, "set by the flag --parallel.tensor"),
    ({"calculate_per_token_loss": False}, "set by megaswift itself: its loss is the per-token mean"),
    ({"hidden_size": 128}, "megatron.hidden_size comes from the model's HF config; change it with --model.overrides"),
    ({"moe_router_dtype": "fp16"}, "megatron.moe_router_dtype='fp16' is invalid: expected one of 'fp32', 'fp64' or "
                                   "null"),
    ({"num_buckets": "many"}, "megatron.num_buckets='many' is invalid: expected an integer or null"),
    ({"attention_softmax_in_fp32": "maybe"}, "expected true/false"),
    ({"init_method": "normal"}, "megatron.init_method (TransformerConfig) holds"),  # a callable
])
def test_passthrough_errors_name_the_field_and_what_to_do(values, message):
    with pytest.raises(ConfigError) as raised:
        _passthrough(values)
    assert message in str(raised.value)


def _check(perf: PerformanceConfig, accelerators=CPU, hf=LLAMA, precision="fp32", **parallel):
    from types import SimpleNamespace
    config = SimpleNamespace(perf=perf, parallel=ParallelConfig(**parallel), megatron={},
                             model=SimpleNamespace(moe_token_dispatcher="alltoall"))
    return check_performance_settings(config, hf, accelerators, precision)


@pytest.mark.parametrize("perf, parallel, message", [
    (PerformanceConfig(recompute="some"), {}, "perf.recompute='some' is not allowed; choose one of ['none', "
                                              "'selective', 'full']"),
    (PerformanceConfig(recompute="full", recompute_num_layers=3), {"pipeline": 2},
     "perf.recompute_num_layers=3 must be between 1 and the layers of one pipeline stage (2)"),
    (PerformanceConfig(recompute_num_layers=2), {}, "perf.recompute_num_layers=2 applies only to perf.recompute=full"),
    (PerformanceConfig(recompute="selective", recompute_modules=["attention"]), {},
     "perf.recompute_modules: ['attention'] not allowed; choose from ['core_attn', 'mlp', 'layernorm'"),
    (PerformanceConfig(recompute="selective", recompute_modules=["moe"]), {}, "['moe'] exist only in MoE models"),
    (PerformanceConfig(recompute="selective", recompute_modules=["layernorm"]), {},
     "perf.recompute_modules: ['layernorm'] need Transformer Engine, which is not installed here"),
    (PerformanceConfig(overlap_grad_reduce=True, overlap_param_gather=True), {},
     "perf.overlap_param_gather=true needs parallel.distributed_optimizer=true"),
    (PerformanceConfig(overlap_param_gather=True), {"distributed_optimizer": True},
     "perf.overlap_param_gather=true needs perf.overlap_grad_reduce=true as well"),
    (PerformanceConfig(bucket_size=1000), {}, "perf.bucket_size=1000 applies only with perf.overlap_grad_reduce=true"),
    (PerformanceConfig(bias_activation_fusion=True), {}, "perf.bias_activation_fusion=true cannot run here: it runs a "
                                                         "fused CUDA kernel, and this machine has no GPU; leave it "
                                                         "unset (on wherever the GPU path supports it) or set it to "
                                                         "false"),
    (PerformanceConfig(apply_rope_fusion=True), {}, "it takes Transformer Engine's fused rope kernel"),
    (PerformanceConfig(gradient_accumulation_fusion=True), {}, "needs Apex's fused_weight_gradient_mlp_cuda"),
    (PerformanceConfig(moe_grouped_gemm=True), {}, "perf.moe_grouped_gemm=true needs Transformer Engine layers"),
    (PerformanceConfig(moe_dispatch_overlap=True), {}, "perf.moe_dispatch_overlap=true needs a GPU"),
    (PerformanceConfig(optimizer_cpu_offload=True), {}, "perf.optimizer_cpu_offload=true needs a GPU"),
    (PerformanceConfig(optimizer_offload_fraction=1.5), {}, "perf.optimizer_offload_fraction must be in [0, 1]"),
])
def test_bad_performance_settings_are_refused(perf, parallel, message):
    with pytest.raises(ConfigError) as raised:
        _check(perf, **parallel)
    assert message in str(raised.value)


def test_moe_dispatch_overlap_is_refused_with_its_reason_on_a_gpu():
    gpu = Accelerators(gpu=True, transformer_engine=True, te_layers=True, grad_accum_kernel=True)
    with pytest.raises(ConfigError, match="needs parallel.expert > 1"):
        _check(PerformanceConfig(moe_dispatch_overlap=True), gpu, hf=preset_hf_config("tiny-mixtral"))
    with pytest.raises(ConfigError, match="not supported yet: megatron-core's combined 1F1B schedule"):
        _check(PerformanceConfig(moe_dispatch_overlap=True), gpu, hf=preset_hf_config("tiny-mixtral"), expert=2,
               precision="bf16")


def test_good_settings_pass():
    assert _check(PerformanceConfig(recompute="full", recompute_method="block", recompute_num_layers=2,
                                    overlap_grad_reduce=True, overlap_param_gather=True, bucket_size=10**6,
                                    bias_activation_fusion=False), pipeline=2, distributed_optimizer=True) == {}
    assert _check(PerformanceConfig(recompute="selective", recompute_modules=["core_attn", "mlp"])) == {}


def test_launch_refuses_bad_settings_before_starting_any_process(tmp_path):
    """`megaswift launch`'s check (cli/preflight.py) runs the same checks for the launch's world size, for
    flags and for a YAML file's `megatron:` mapping."""
    from megaswift.cli.preflight import PreflightError, check_launched_command
    with pytest.raises(PreflightError, match="megaswift pt: error: perf.overlap_param_gather=true needs "
                                             "parallel.distributed_optimizer=true"):
        check_launched_command(("-m", "megaswift", "pt", "--perf.overlap_grad_reduce", "--perf.overlap_param_gather",
                                "--logging.output_dir", str(tmp_path)), world_size=2)
    config = tmp_path / "run.yaml"
    config.write_text("megatron:\n  attention_softmax_in_fp3: false\n")
    with pytest.raises(PreflightError, match="did you mean megatron.attention_softmax_in_fp32"):
        check_launched_command(("-m", "megaswift", "pt", "--config", str(config), "--logging.output_dir",
                                str(tmp_path)), world_size=2)


def test_mistyped_megatron_flag_gets_the_closest_field():
    proc = subprocess.run([sys.executable, "-m", "megaswift", "pt", "--megatron.attention_sofmax_in_fp32", "false"],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == ("megaswift pt: error: unknown flag --megatron.attention_sofmax_in_fp32 "
                                           "(did you mean --megatron.attention_softmax_in_fp32?)")
