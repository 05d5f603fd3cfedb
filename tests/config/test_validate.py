"""Invalid layouts fail before any process group exists, naming the setting and what is allowed."""
import pytest

from megaswift.config import ConfigError, DataConfig, ParallelConfig, TrainConfig
from megaswift.config.validate import packed_attention, validate_choices, validate_layout
from megaswift.models import preset_hf_config

LLAMA = preset_hf_config("tiny-llama")      # 4 heads, 2 kv heads, 4 layers
MIXTRAL = preset_hf_config("tiny-mixtral")  # 4 experts


def _validate(hf=LLAMA, world=2, data=None, train=None, **parallel):
    return validate_layout(hf, ParallelConfig(**parallel), train or TrainConfig(micro_batch_size=1,
                                                                                 global_batch_size=4),
                           data or DataConfig(seq_length=32), world)


def test_valid_layouts_return_data_parallel_size():
    assert _validate(world=2, tensor=2) == 1
    assert _validate(world=4, pipeline=2) == 2
    assert _validate(hf=MIXTRAL, world=2, expert=2) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"tensor": 3, "world": 3}, r"parallel.tensor=3 must divide num_attention_heads=4; allowed: \[1, 2\]"),
    ({"tensor": 4, "world": 4}, r"parallel.tensor=4 must divide num_key_value_heads=2"),
    ({"pipeline": 3, "world": 3}, r"num_hidden_layers=4 is not divisible by parallel.pipeline x"),
    ({"pipeline": 2, "virtual_pipeline": 4, "world": 2}, r"not divisible by parallel.pipeline x parallel.virtual"),
    ({"tensor": 2, "world": 3}, r"world size 3 is not divisible by parallel.tensor"),
    ({"sequence_parallel": True, "world": 1}, r"sequence_parallel=true needs parallel.tensor > 1"),
    ({"expert": 2, "world": 2}, r"parallel.expert=2 needs an MoE model"),
    ({"hf": MIXTRAL, "expert": 3, "world": 3}, r"parallel.expert=3 must divide the number of experts 4"),
    ({"context": 2, "world": 2}, r"parallel.context > 1 needs Transformer Engine"),
    ({"world": 2, "train": TrainConfig(micro_batch_size=3, global_batch_size=4)},
     r"global_batch_size=4 must be a multiple of train.micro_batch_size x data-parallel size = 3 x 2"),
    ({"world": 1, "data": DataConfig(seq_length=100_000)}, r"data.seq_length=100000 exceeds"),
])
def test_invalid_layouts(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _validate(**kwargs)


def test_choices():
    with pytest.raises(ConfigError, match=r"train.on_nan='ignore' is not allowed; choose one of \['stop', 'skip'\]"):
        validate_choices({"train.on_nan": "ignore"})


@pytest.mark.parametrize("packing, spec, precision, context, on_gpu, expected", [
    (False, "te", "fp32", 1, True, None),
    (False, "local", "bf16", 1, False, None),
    (False, "torch", "bf16", 1, True, None),
    (True, "local", "fp32", 1, False, "mask"),
    (True, "local", "bf16", 1, True, "mask"),
    (True, "te", "bf16", 1, True, "thd"),
    (True, "te", "fp16", 1, False, "thd"),
    # torch spec: THD (FlexAttention from cu_seqlens) on a GPU in any precision; on CPU the mask, as before
    (True, "torch", "fp32", 1, True, "thd"),
    (True, "torch", "bf16", 1, True, "thd"),
    (True, "torch", "fp32", 1, False, "mask"),
    (True, "torch", "bf16", 1, False, "mask"),
    (True, "torch", "bf16", 2, True, "mask"),  # no THD across context-parallel ranks (validate_layout refuses CP)
])
def test_packed_attention_follows_the_attention_backend(packing, spec, precision, context, on_gpu, expected):
    assert packed_attention(packing, spec, precision, ParallelConfig(context=context), on_gpu=on_gpu) == expected


@pytest.mark.parametrize("precision, context, message", [
    ("fp32", 1, r"data.packing=true with Transformer Engine attention \(THD\) needs bf16 or fp16 attention; "
                r"found train.precision resolving to fp32; set train.precision=bf16, or model.layer_spec=local"),
    ("bf16", 2, r"data.packing=true with parallel.context=2 is not supported .*set parallel.context=1, or "
                r"data.packing=false"),
])
def test_packing_with_transformer_engine_refuses_what_is_not_wired(precision, context, message):
    with pytest.raises(ConfigError, match=message):
        packed_attention(True, "te", precision, ParallelConfig(context=context), on_gpu=True)


@pytest.mark.parametrize("world, tensor, pipeline, start", [(1, 2, 1, 2), (3, 2, 1, 2), (2, 2, 2, 4)])
def test_too_few_processes_says_how_to_start_enough(world, tensor, pipeline, start):
    with pytest.raises(ConfigError) as raised:
        _validate(world=world, tensor=tensor, pipeline=pipeline)
    message = str(raised.value)
    assert f"this run has {world} process" in message
    assert f"torchrun --nproc-per-node {start} -m megaswift pt" in message
    assert f"megaswift launch --nproc-per-node {start} -- megaswift pt" in message
