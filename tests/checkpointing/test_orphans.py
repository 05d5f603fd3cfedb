"""Leftovers of killed saves and conversions are removed by the next run on that folder, with a line that
says so (issues 10.3 and 11), and nothing another run is still using is touched."""
import os
import signal
import subprocess
import sys
from pathlib import Path

from converters.output_dir import _lock_folder, atomic_output_dir
from megaswift.checkpointing.layout import iteration_dir, read_latest, remove_orphaned_temporaries
from tests.torchrun import child_env
from tests.train.runner import run_pt


def test_only_temporary_names_are_orphans(tmp_path):
    keep = ["iter_0000002", "latest", ".megaswift.lock", "iter_0000003.tmpx", "notes.tmp-1"]
    orphans = ["iter_0000003.tmp", "iter_0000004.tmp-0a1b2c3d", ".latest.5e6f7a8b"]
    for name in keep + orphans:
        if name.startswith("iter_"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text("")
    assert remove_orphaned_temporaries(tmp_path) == sorted(tmp_path / name for name in orphans)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_resume_removes_leftover_save_folders(trained_copy, tmp_path):
    leftovers = [trained_copy / "iter_0000004.tmp-0a1b2c3d", trained_copy / "iter_0000004.tmp"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "__0_0.distcp").write_bytes(b"partial")
    proc = run_pt(["--checkpoint.save", str(trained_copy), "--logging.output_dir", str(tmp_path / "out"),
                   "--train.train_iters", "4"])
    for folder in leftovers:
        assert f"removed {folder}, left by a checkpoint save that did not finish" in proc.stdout
        assert not folder.exists()
    assert read_latest(trained_copy) == 4 and iteration_dir(trained_copy, 4).is_dir()


_KILLED_CONVERSION = """
import sys, time
from pathlib import Path
from converters.output_dir import atomic_output_dir
with atomic_output_dir(Path(sys.argv[1]), overwrite=False) as tmp:
    (tmp / "half-written.distcp").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_killed_conversion_output_is_removed_by_the_next_conversion(tmp_path, capsys):
    out = tmp_path / "converted"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CONVERSION, str(out)], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    try:
        killed_tmp = Path(proc.stdout.readline().strip())
        # While that conversion runs, its folder is in use: a conversion into another folder beside it, or a
        # scan for leftovers, leaves it alone.
        with atomic_output_dir(tmp_path / "other", overwrite=False):
            pass
        with atomic_output_dir(out, overwrite=False) as tmp:
            (tmp / "done").write_text("")
        assert killed_tmp.is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    capsys.readouterr()
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "done").write_text("")
    assert not killed_tmp.exists()
    assert f"removed {killed_tmp}, left by an earlier conversion into {out} that did not finish" in \
        capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "other"]


def test_a_held_temporary_folder_is_not_an_orphan(tmp_path):
    out = tmp_path / "converted"
    held = tmp_path / "converted.tmp-0a1b2c3d"
    held.mkdir()
    fd = _lock_folder(held)
    try:
        with atomic_output_dir(out, overwrite=False) as tmp:
            (tmp / "done").write_text("")
        assert held.is_dir()
    finally:
        os.close(fd)
