"""A resume with another train.lr / min_lr / Adam setting: the saved param groups take this run's settings, so
megatron-core's own group matching (by an identifier that includes max_lr and min_lr) finds every group."""
import copy
from types import SimpleNamespace

import pytest
import torch
from megatron.core.optimizer.optimizer import MegatronOptimizer

from megaswift.checkpointing.param_groups import adopt_current_param_groups


def _adamw(params, lr, min_lr, beta2):
    """Param groups as megatron-core builds them: weight-decayed weights, and biases/norms without decay."""
    kinds = [{"wd_mult": 1.0}, {"wd_mult": 0.0}]
    groups = [{"params": [param], **kind, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False,
               "max_lr": lr, "min_lr": min_lr, "default_config": True} for param, kind in zip(params, kinds)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2))


@pytest.mark.parametrize("nested", [False, True], ids=["fp32-optimizer", "float16-or-distributed-optimizer"])
def test_saved_param_groups_take_the_settings_of_this_run(nested):
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(1))]
    saved_optimizer = _adamw(params, 1e-3, 3e-5, 0.95)
    params[0].grad, params[1].grad = torch.ones(3), torch.ones(1)
    saved_optimizer.step()
    saved = saved_optimizer.state_dict()
    current = _adamw(params, 5e-4, 1e-5, 0.99)
    with pytest.raises(ValueError, match="Could not find parameter group"):  # what a changed lr did before
        MegatronOptimizer._filter_and_reorder_param_groups(current.param_groups,
                                                           copy.deepcopy(saved["param_groups"]))

    part = {"optimizer": saved} if nested else saved
    adopt_current_param_groups([SimpleNamespace(optimizer=current)], [part])
    matched = MegatronOptimizer._filter_and_reorder_param_groups(current.param_groups, saved["param_groups"])
    assert [(g["wd_mult"], g["max_lr"], g["min_lr"], g["betas"]) for g in matched] == \
        [(1.0, 5e-4, 1e-5, (0.9, 0.99)), (0.0, 5e-4, 1e-5, (0.9, 0.99))]
    assert saved["state"][0]["step"] == 1  # the optimizer's progress stays as saved
    assert [g["params"] for g in saved["param_groups"]] == [[0], [1]]
