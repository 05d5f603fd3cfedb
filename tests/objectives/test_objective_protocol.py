"""The parts pt and sft objectives give the loop, without a process group: shapes, sums and metrics."""
import pytest
import torch

from megaswift.config import PretrainConfig, SFTConfig
from megaswift.objectives.base import TOTALS, Objective, RunPlan, totals_record
from megaswift.objectives.pretrain import PretrainObjective
from megaswift.objectives.sft import SFTObjective

MEMBERS = [name for name in dir(Objective) if not name.startswith("_")] + list(Objective.__annotations__)


@pytest.mark.parametrize("objective", [PretrainObjective(), SFTObjective()], ids=["pt", "sft"])
def test_pt_and_sft_are_objectives_with_the_token_loss(objective):
    assert {"data_source", "forward_step", "micro_batch_shape", "step_metrics", "name", "totals"} <= set(MEMBERS)
    assert all(hasattr(objective, name) for name in MEMBERS)
    # sum(w * ce) / label tokens over the whole step; a step with no trained token has loss 0, not NaN
    assert objective.step_metrics({"loss_sum": 6.0, "tokens": 4.0}) == {"loss": 1.5}
    assert objective.step_metrics({"loss_sum": 0.0, "tokens": 0.0}) == {"loss": 0.0}


@pytest.mark.parametrize("packed_attention, shape", [(None, (32, 2)), ("mask", (32, 2)), ("thd", (64, 1))])
def test_pipeline_stages_exchange_one_thd_sequence_per_micro_batch_when_packed(packed_attention, shape):
    config = SFTConfig()
    config.data.seq_length, config.train.micro_batch_size = 32, 2
    plan = RunPlan(config, {"vocab_size": 100}, 1, packed_attention, 8)
    assert SFTObjective().micro_batch_shape(plan) == shape
    config = PretrainConfig()
    config.data.seq_length, config.train.micro_batch_size = 32, 2
    assert PretrainObjective().micro_batch_shape(RunPlan(config, {"vocab_size": 100}, 1, None, 8)) == (32, 2)


def test_a_loss_record_carries_the_objective_sums_in_its_order_and_refuses_others():
    objective = PretrainObjective()
    record = totals_record(objective, tokens=torch.tensor(7, dtype=torch.int), loss_sum=torch.tensor(2.5))
    assert record[TOTALS].tolist() == [2.5, 7.0]  # objective.totals = ("loss_sum", "tokens")
    with pytest.raises(ValueError, match=r"pt objective: expected the sums \['loss_sum', 'tokens'\], found \['loss'\]"):
        totals_record(objective, loss=torch.tensor(1.0))
