"""HF config -> megatron-core TransformerConfig: the HF dropout fields are honoured, not hard-coded to 0."""
import pytest
import torch

from megaswift.config import ConfigError, ParallelConfig
from megaswift.models import hf_to_transformer_config, preset_hf_config


@pytest.mark.parametrize("fields, attention, hidden", [
    ({}, 0.0, 0.0),                                              # Llama/Qwen configs without the keys: none
    ({"attention_dropout": 0.1}, 0.1, 0.0),
    ({"attention_dropout": 0.25, "hidden_dropout": 0.05}, 0.25, 0.05),
    ({"attention_dropout": None}, 0.0, 0.0),                     # transformers allows None (= 0)
])
def test_dropout_fields_come_from_the_hf_config(fields, attention, hidden):
    config = hf_to_transformer_config({**preset_hf_config("tiny-qwen2"), **fields}, ParallelConfig())
    assert (config.attention_dropout, config.hidden_dropout) == (attention, hidden)


@pytest.mark.parametrize("value", [1.0, -0.1, "0.1", True])
def test_a_dropout_that_is_not_a_probability_is_a_clear_error(value):
    with pytest.raises(ConfigError, match=r"attention_dropout=.* must be a probability in \[0, 1\)"):
        hf_to_transformer_config({**preset_hf_config("tiny-llama"), "attention_dropout": value}, ParallelConfig())


@pytest.fixture
def single_process():
    from megaswift.train.distributed import init_distributed, shutdown_distributed
    init_distributed(ParallelConfig(), seed=3)
    yield
    shutdown_distributed()


def test_attention_dropout_from_the_hf_config_acts_in_training_only(single_process):
    """The built model really drops attention probabilities: two training forwards differ, eval ones do not."""
    from megaswift.models.builder import build_model_chunks
    hf = {**preset_hf_config("tiny-llama"), "num_hidden_layers": 1, "attention_dropout": 0.5}
    (model,) = build_model_chunks(hf, hf_to_transformer_config(hf, ParallelConfig()), "local")
    tokens = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        train_a, train_b = model(tokens, positions, None), model(tokens, positions, None)
        model.eval()
        eval_a, eval_b = model(tokens, positions, None), model(tokens, positions, None)
    assert not torch.equal(train_a, train_b)
    assert torch.equal(eval_a, eval_b)
