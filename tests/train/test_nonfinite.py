"""The skip limits of train.on_nan=skip (the end-to-end runs are in test_faults.py)."""
import pytest

from megaswift.config import ConfigError
from megaswift.train.nonfinite import SkippedSteps

NAN = float("nan")


def test_the_total_limit_counts_skips_that_are_not_in_a_row():
    skips = SkippedSteps("skip", max_consecutive=0, max_total=2)
    assert skips.not_applied(4, NAN, None) is None
    skips.applied()
    assert skips.not_applied(9, 2.5, float("inf")) is None
    skips.applied()
    problem = skips.not_applied(20, 2.5, NAN)
    assert problem.startswith("step 20: the gradient norm is nan; the step was not applied: 3 steps of this run "
                              "could not be applied, more than train.max_skipped_steps=2")
    assert skips.total == 3 and skips.consecutive == 1


def test_an_applied_step_ends_a_run_of_skips():
    skips = SkippedSteps("skip", max_consecutive=2, max_total=0)
    for step in (1, 2):
        assert skips.not_applied(step, NAN, None) is None
    skips.applied()
    assert skips.not_applied(4, NAN, None) is None and skips.not_applied(5, NAN, None) is None
    assert "3 steps in a row (steps 4-6)" in skips.not_applied(6, NAN, None)


def test_stop_names_the_step_and_the_value_and_counts_nothing():
    skips = SkippedSteps("stop", max_consecutive=5, max_total=0)
    assert skips.not_applied(7, float("-inf"), None).startswith(
        "step 7: the loss is -inf; the step was not applied and nothing from it was saved (train.on_nan=stop)")
    assert skips.total == 0


@pytest.mark.parametrize("key,limits", [("train.max_consecutive_skips", (-1, 0)), ("train.max_skipped_steps", (0, -3))])
def test_a_negative_limit_is_refused_naming_the_setting(key, limits):
    with pytest.raises(ConfigError, match=f"{key}=-"):
        SkippedSteps("skip", *limits)
