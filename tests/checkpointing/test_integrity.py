"""Damaged checkpoint files are named, never trained on (issue 11.4 and 11.9), and NaN weights never saved."""
import zlib

import pytest
import torch

from megaswift.checkpointing.integrity import FILES_KEY, check_weights_finite, damaged_files, verify_files
from megaswift.checkpointing.layout import CheckpointError, iteration_dir, read_latest, read_meta
from megaswift.checkpointing.state import save_checkpoint
from tests.train.runner import losses, run_pt


def _largest_distcp(ckpt_dir):
    return max(ckpt_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _zero_64k(path):
    """What the fault-injection pass did: 64 KB of zeros written inside the file, its size unchanged."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(min(64 << 10, size - size // 2)))


def _resume(ckpt, out, *flags, iters=4):
    return run_pt(["--checkpoint.save", str(ckpt), "--logging.output_dir", str(out), "--train.train_iters",
                   str(iters), *flags], check=False)


def test_save_records_every_data_file_size_and_crc32(trained_checkpoint):
    ckpt_dir = iteration_dir(trained_checkpoint[0], 3)
    records = read_meta(ckpt_dir)[FILES_KEY]
    on_disk = sorted(p.name for p in ckpt_dir.iterdir() if p.is_file() and p.name != "megaswift.json")
    assert sorted(records) == on_disk and any(name.endswith(".distcp") for name in on_disk)
    for name, record in records.items():
        data = (ckpt_dir / name).read_bytes()
        assert record == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}


def test_changed_bytes_are_named_by_size_and_crc(trained_copy):
    ckpt_dir = iteration_dir(trained_copy, 3)
    records = read_meta(ckpt_dir)[FILES_KEY]
    assert verify_files(ckpt_dir, records) == []
    damaged = _largest_distcp(ckpt_dir)
    _zero_64k(damaged)
    assert verify_files(ckpt_dir, records) == [
        f"{damaged} has changed since it was written (CRC32 {zlib.crc32(damaged.read_bytes()):08x}, recorded "
        f"{records[damaged.name]['crc32']}; same size)"]
    (ckpt_dir / ".metadata").write_bytes(b"")
    assert damaged_files(ckpt_dir)[0] == f"{ckpt_dir / '.metadata'} has 0 bytes, {records['.metadata']['size']} were " \
                                         f"written"
    (ckpt_dir / "metadata.json").unlink()
    assert f"{ckpt_dir / 'metadata.json'} is missing" in damaged_files(ckpt_dir)


def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_previous_one(trained_copy, tmp_path):
    damaged = _largest_distcp(iteration_dir(trained_copy, 3))
    _zero_64k(damaged)
    proc = _resume(trained_copy, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"checkpoint {iteration_dir(trained_copy, 3)} (iteration 3) is damaged: {damaged} has changed since it " \
           f"was written" in proc.stderr
    assert f"The previous complete checkpoint is {iteration_dir(trained_copy, 2)} (iteration 2): rerun with " \
           f"--checkpoint.fallback true" in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing was trained on it
    assert read_latest(trained_copy) == 3


def test_fallback_resumes_from_the_previous_complete_checkpoint(trained_checkpoint, trained_copy, tmp_path):
    _zero_64k(_largest_distcp(iteration_dir(trained_copy, 3)))
    proc = _resume(trained_copy, tmp_path / "out", "--checkpoint.fallback", "true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"falling back to the previous complete one, {iteration_dir(trained_copy, 2)}" in proc.stdout
    resumed = losses(tmp_path / "out")
    assert list(resumed) == [3, 4]
    # Step 3 retrained from iteration 2's full state is the step the original run took.
    assert resumed[3] == pytest.approx(trained_checkpoint[1][3], rel=1e-6)
    assert read_latest(trained_copy) == 4
    assert damaged_files(iteration_dir(trained_copy, 3)) == []  # step 3 was saved again, intact


@pytest.mark.parametrize("damage", ["truncate_distcp", "truncate_metadata"])
def test_damaged_file_without_verification_is_named_not_a_bare_eof(trained_copy, tmp_path, damage):
    """checkpoint.verify false (or a checkpoint from before the sums): torch's bare EOFError or
    'PytorchStreamReader failed reading zip archive' becomes an error naming file, iteration and fallback."""
    ckpt_dir = iteration_dir(trained_copy, 3)
    target = _largest_distcp(ckpt_dir) if damage == "truncate_distcp" else ckpt_dir / ".metadata"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    proc = _resume(trained_copy, tmp_path / "out", "--checkpoint.verify", "false")
    assert proc.returncode == 2, proc.stderr[-4000:]
    # The run ends on one error that names the file (torch logs its own warnings before that).
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"megaswift pt: error: checkpoint {ckpt_dir} (iteration 3) is damaged: {target}"), last
    assert f"The previous complete checkpoint is {iteration_dir(trained_copy, 2)}" in last
    assert "weights_only" not in proc.stderr


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save the checkpoint of step 7: the weights hold NaN or "
                                              r"Inf \(rank 0: weight\)"):
        save_checkpoint(tmp_path, 7, [model], None, None, {})
    assert list(tmp_path.iterdir()) == []  # nothing written, `latest` untouched
    with torch.no_grad():
        model.weight[1, 2] = float("inf")
        model.bias.fill_(float("-inf"))
    with pytest.raises(CheckpointError, match=r"rank 0: weight, bias\)"):
        check_weights_finite([model], 7)
