"""A small trained checkpoint folder (iterations 1, 2, 3 of tiny-llama), built once per session; tests that
damage or extend it work on a copy (`trained_copy`)."""
import shutil

import pytest

from tests.train.runner import losses, pt_flags, run_pt


@pytest.fixture(scope="session")
def trained_checkpoint(demo_data, tmp_path_factory):
    """(checkpoint folder, {step: loss} of the run that wrote it)."""
    out = tmp_path_factory.mktemp("trained")
    run_pt(pt_flags(demo_data, out, train__train_iters=3, checkpoint__save=out / "ckpt",
                    checkpoint__save_interval=1))
    return out / "ckpt", losses(out)


@pytest.fixture
def trained_copy(trained_checkpoint, tmp_path):
    folder, _ = trained_checkpoint
    return shutil.copytree(folder, tmp_path / "ckpt")
