"""Resuming with changed optimizer settings (train.lr, min_lr, weight decay, Adam betas/eps): the run's config
wins over the checkpoint's, as it does for every other setting.

megatron-core 0.19.2 pairs saved param groups with the current ones by an identifier tuple that includes
`max_lr` and `min_lr` (`param_group_identifier_keys`), so a resume with another --train.lr fails inside the
load (`ValueError: Could not find parameter group with key (None, 0.0001, ...)`; a KeyError with the
distributed optimizer), and torch's `load_state_dict` would otherwise put the saved hyperparameters back.
Before the load, each saved group therefore takes the current group's settings, matched by what makes
groups differ in kind (weight-decay multiplier, lr multiplier, expert parallel, decoupled lr, optimizer);
only the optimizer's progress (`step`) and the parameter indices stay as saved. The learning-rate schedule
itself is overridden by OptimizerParamScheduler(override_opt_param_scheduler=True) (train/optimizer.py).
"""
STRUCTURAL_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr", "optimizer")
KEPT_FROM_CHECKPOINT = ("params", "step")


def _structure(group: dict) -> tuple:
    return tuple(group.get(key) for key in STRUCTURAL_KEYS)


def _saved_groups(part: dict) -> list[dict]:
    """Float16 and distributed optimizers nest the torch state under "optimizer"; the fp32 one does not."""
    holder = part["optimizer"] if isinstance(part.get("optimizer"), dict) else part
    return holder.get("param_groups", [])


def adopt_current_param_groups(inner_optimizers: list, loaded_parts: list[dict]) -> None:
    """Rewrites each loaded part's param groups in place with the settings of this run's optimizer."""
    for inner, part in zip(inner_optimizers, loaded_parts):
        current = {_structure(group): group for group in inner.optimizer.param_groups}
        for saved in _saved_groups(part):
            match = current.get(_structure(saved))
            if match is None:
                continue  # a group of another kind: megatron-core's own matching reports it
            saved.update({key: value for key, value in match.items() if key not in KEPT_FROM_CHECKPOINT})
