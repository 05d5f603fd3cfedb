"""What a run does after a step whose loss or gradient norm is NaN or infinite.

Such a step is never applied (the trainer does not call the optimizer for a non-finite loss, and
optimizer.FiniteUpdatesOptimizer refuses a non-finite gradient norm before any parameter changes), so no
checkpoint can hold its result. The loss and the norm are all-reduced values, identical on every rank, so
every rank counts the same skips and stops at the same step. A skipped step consumes its batch (the data
moves on, as after any step) but leaves the weights, the optimizer state and the learning-rate schedule as
they were: the schedule counts applied updates, as Megatron-LM's does.

`train.on_nan=stop` ends the run at the first such step, naming it. `skip` goes on, but gives up after
`train.max_consecutive_skips` skips in a row (a run that diverged skips every step from then on) or more
than `train.max_skipped_steps` in the run; the counts start at 0 in each run (process), also on resume.
"""
import math

from megaswift.config import ConfigError

ADVICE = ("lower train.lr (or raise train.lr_warmup_iters, set train.clip_grad), check the data of that step, "
          "and resume from the latest checkpoint in checkpoint.save")


def describe_non_finite(loss: float, grad_norm: float | None) -> str:
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    return f"the gradient norm is {grad_norm}"


class SkippedSteps:
    """Counts the steps that could not be applied and says when the run must stop."""

    def __init__(self, on_nan: str, max_consecutive: int, max_total: int):
        for key, value in (("train.max_consecutive_skips", max_consecutive), ("train.max_skipped_steps", max_total)):
            if value < 0:
                raise ConfigError(f"{key}={value} is negative; give a number of steps, or 0 for no limit")
        self.on_nan, self.max_consecutive, self.max_total = on_nan, max_consecutive, max_total
        self.total = 0  # this run's skipped steps (metrics.jsonl: skipped_steps)
        self.consecutive = 0
        self.loss_scale_overflows = 0  # fp16: steps megatron-core's loss scaler skipped (not a fault)

    @classmethod
    def for_run(cls, train) -> "SkippedSteps":
        return cls(train.on_nan, train.max_consecutive_skips, train.max_skipped_steps)

    def applied(self) -> None:
        self.consecutive = 0

    def not_applied(self, step: int, loss: float, grad_norm: float | None) -> str | None:
        """Records a non-finite step; returns why the run must stop now, or None to go on."""
        what = f"step {step}: {describe_non_finite(loss, grad_norm)}; the step was not applied"
        if self.on_nan == "stop":
            return (f"{what} and nothing from it was saved (train.on_nan=stop). To go on: {ADVICE}; or set "
                    f"train.on_nan=skip to skip such steps")
        self.total += 1
        self.consecutive += 1
        if self.max_consecutive and self.consecutive > self.max_consecutive:
            return (f"{what}: {self.consecutive} steps in a row (steps {step - self.consecutive + 1}-{step}) could "
                    f"not be applied, more than train.max_consecutive_skips={self.max_consecutive}; the training "
                    f"has diverged or the data is bad from step {step - self.consecutive + 1} on. The weights are "
                    f"still finite; nothing from the skipped steps was saved. To go on: {ADVICE}")
        if self.max_total and self.total > self.max_total:
            return (f"{what}: {self.total} steps of this run could not be applied, more than "
                    f"train.max_skipped_steps={self.max_total}; nothing from them was saved. To go on: {ADVICE}")
        return None
