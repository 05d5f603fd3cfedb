"""A full disk during a save or a conversion says so, names the folder and the size (issue 11.8), and the
unfinished checkpoint never becomes `latest`. Real full disks are small tmpfs mounts (CI runs as root);
where mounting is not allowed those tests skip and the patched-writer test still covers the save."""
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

from converters import ConversionError, hf2mcore
from converters.mcore_layout import mcore_layout
from megaswift.checkpointing.layout import iteration_dir, read_latest
from megaswift.checkpointing.space import is_disk_full
from tests.converters.tiny_models import save_tiny_hf_model
from tests.train.runner import PT_COMMAND, pt_flags, run_pt

FULL_DISK_PT = (str(Path(__file__).with_name("pt_disk_full.py")),)


@pytest.fixture
def small_disk(tmp_path):
    """mount(bytes) -> a folder on a tmpfs of that size, unmounted after the test."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_torch_writers_on_a_full_disk_are_recognised(small_disk):
    disk = small_disk(256 << 10)
    tensor = torch.zeros(1 << 20)  # 4 MB
    with pytest.raises(Exception) as zip_writer:  # the "inline_container.cc ... unexpected pos" of the issue
        torch.save(tensor, disk / "t.pt")
    assert is_disk_full(zip_writer.value, disk)
    with pytest.raises(BaseException) as dcp_writer:  # torch's CheckpointException is one
        torch.distributed.checkpoint.save({"w": tensor}, checkpoint_id=str(disk / "dcp"), no_dist=True)
    assert is_disk_full(dcp_writer.value, disk)
    assert not is_disk_full(RuntimeError("unexpected pos 704 vs 598"), Path("/"))  # a disk with room: not full


def _tmpfs_or_none(small_disk, size):
    try:
        return small_disk(size)
    except pytest.skip.Exception:
        return None


def test_disk_full_mid_save_names_folder_and_size_and_keeps_latest(demo_data, trained_checkpoint, tmp_path,
                                                                   small_disk):
    """On a real tmpfs with room for 95% of a checkpoint, the first save fills it (the free-space check before
    a first save knows only the tensors' bytes, not the files' overhead, so it lets this save start). Where no
    tmpfs can be mounted, a writer patched to fail at iteration 2 stands in."""
    one_checkpoint = sum(p.stat().st_size for p in iteration_dir(trained_checkpoint[0], 1).rglob("*") if p.is_file())
    disk = _tmpfs_or_none(small_disk, int(0.95 * one_checkpoint))
    ckpt = (disk or tmp_path) / "ckpt"
    failing, previous = (1, None) if disk else (2, 1)
    proc = run_pt(pt_flags(demo_data, tmp_path, train__train_iters=3, checkpoint__save=ckpt,
                           checkpoint__save_interval=1), check=False,
                  command=PT_COMMAND if disk else (*FULL_DISK_PT, str(failing)))
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert (f"the disk holding {ckpt} ran out of space while writing checkpoint iteration {failing} into "
            f"iter_{failing:07d}.tmp-") in proc.stderr, proc.stderr[-4000:]
    assert "this checkpoint needs about" in proc.stderr and "checkpoint.keep_last" in proc.stderr
    assert read_latest(ckpt) == previous  # the checkpoint in progress never became `latest`
    left = [".megaswift.lock"] + (["iter_0000001", "latest"] if previous else [])
    assert sorted(p.name for p in ckpt.iterdir()) == left  # and its unfinished folder is gone


def test_save_that_cannot_fit_is_refused_before_writing(demo_data, tmp_path, small_disk):
    ckpt = small_disk(512 << 10) / "ckpt"  # a tiny-llama checkpoint with Adam state takes ~3.7 MB
    proc = run_pt(pt_flags(demo_data, tmp_path, train__train_iters=2, checkpoint__save=ckpt), check=False)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"not saving checkpoint iteration 2: {ckpt} has " in proc.stderr
    assert re.search(r"has \d+\.\d KB free, and this needs about [3-4]\.\d MB", proc.stderr), proc.stderr[-2000:]
    assert sorted(p.name for p in ckpt.iterdir()) == [".megaswift.lock"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(HF folder, bytes of the megatron tensors hf2mcore writes from it in fp32)."""
    folder = save_tiny_hf_model("tiny-llama", tmp_path_factory.mktemp("hf"), torch.float32, None)
    layout = mcore_layout(json.loads((folder / "config.json").read_text()))
    return folder, sum(math.prod(t.shape) * 4 for t in layout.tensors.values())


def test_hf2mcore_refuses_an_output_disk_without_room(tiny_hf, small_disk):
    out = small_disk(64 << 10) / "converted"
    with pytest.raises(ConversionError, match=re.escape(f"not converting into {out}: {out.parent} has 64.0 KB free, "
                                                        f"and this needs about ")):
        hf2mcore(tiny_hf[0], out, verify=False, progress=False)
    assert list(out.parent.iterdir()) == []


def test_hf2mcore_disk_full_mid_write_names_the_folder(tiny_hf, small_disk):
    hf_dir, weights = tiny_hf
    out = small_disk(weights) / "converted"  # room for the tensors' bytes, not for the files around them
    with pytest.raises(ConversionError, match=re.escape(f"the disk holding {out.parent} ran out of space while "
                                                        f"writing {out} (it needs about ")):
        hf2mcore(hf_dir, out, verify=False, progress=False)
    assert list(out.parent.iterdir()) == []  # the unfinished output was removed
