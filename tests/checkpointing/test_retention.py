"""checkpoint.keep_last / keep_every: old complete checkpoints go, only after the new one is `latest`."""
import pytest

from megaswift.checkpointing.layout import complete_iterations, iteration_dir, read_latest, write_latest, write_meta
from megaswift.checkpointing.retention import apply_retention, iterations_to_delete
from tests.train.runner import pt_flags, run_pt


@pytest.mark.parametrize("complete, latest, keep_last, keep_every, deleted", [
    ([1, 2, 3, 4, 5], 5, 0, 0, []),               # off: keep everything
    ([1, 2, 3, 4, 5], 5, 2, 0, [1, 2, 3]),
    ([1, 2, 3, 4, 5], 5, 2, 2, [1, 3]),           # every 2nd kept forever
    ([2, 4, 6], 6, 5, 0, []),                     # fewer than keep_last
    ([1, 2, 3, 8, 9], 3, 1, 0, [1, 2]),           # above `latest` (after a fallback): never touched
    ([0, 10, 20, 30], 30, 1, 20, [10]),           # iteration 0 is a multiple of every M
])
def test_which_iterations_go(complete, latest, keep_last, keep_every, deleted):
    assert iterations_to_delete(complete, latest, keep_last, keep_every) == deleted


def _fake_checkpoint(root, iteration):
    folder = iteration_dir(root, iteration)
    folder.mkdir(parents=True)
    write_meta(folder, {"iteration": iteration})


def test_only_complete_checkpoints_count_and_latest_is_kept(tmp_path):
    for iteration in (1, 2, 3):
        _fake_checkpoint(tmp_path, iteration)
    (tmp_path / "iter_0000004.tmp-0123abcd").mkdir()  # a save in progress is not a checkpoint yet
    (tmp_path / "iter_0000005").mkdir()               # nor a folder without megaswift.json
    write_latest(tmp_path, 3)
    assert apply_retention(tmp_path, keep_last=1, keep_every=0) == [iteration_dir(tmp_path, i) for i in (1, 2)]
    assert complete_iterations(tmp_path) == [3]
    assert (tmp_path / "iter_0000004.tmp-0123abcd").is_dir() and (tmp_path / "iter_0000005").is_dir()


def test_training_run_keeps_the_last_n_and_every_mth(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = run_pt(pt_flags(demo_data, tmp_path, train__train_iters=6, checkpoint__save=ckpt,
                           checkpoint__save_interval=1, checkpoint__keep_last=2, checkpoint__keep_every=3))
    assert complete_iterations(ckpt) == [3, 5, 6]
    assert read_latest(ckpt) == 6
    for iteration in (1, 2, 4):
        assert f"removed {iteration_dir(ckpt, iteration)} (checkpoint.keep_last=2, keep_every=3)" in proc.stdout
    # Each deletion came after the save that made it due: iteration 1 goes once 3 is `latest`, not before.
    lines = proc.stdout.splitlines()
    assert [i for i, line in enumerate(lines) if "removed" in line] == sorted(
        i for i, line in enumerate(lines) if "removed" in line)
    assert sorted(p.name for p in ckpt.iterdir() if ".tmp" in p.name) == []


def test_negative_keep_last_is_a_config_error(demo_data, tmp_path):
    proc = run_pt(pt_flags(demo_data, tmp_path, train__train_iters=1, checkpoint__keep_last=-1), check=False)
    assert proc.returncode == 2
    assert "checkpoint.keep_last must be a whole number >= 0 (0: off); found -1" in proc.stderr
