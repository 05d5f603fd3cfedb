"""`megaswift pt` on a disk that fills during the save of a given iteration: the checkpoint writer writes part
of a file, then fails with OSError ENOSPC, as a full disk makes it fail. For machines where the tests cannot
mount a small tmpfs. Run it as `python pt_disk_full.py ITERATION <the flags of megaswift pt>`."""
import errno
import functools
import os
import sys
from pathlib import Path

from megatron.core import dist_checkpointing

from megaswift.cli.main import main


def fill_the_disk_at(iteration: int):
    real_save = dist_checkpointing.save

    @functools.wraps(real_save)
    def save(state, checkpoint_dir, *args, **kwargs):
        if state.get("iteration") != iteration:
            return real_save(state, checkpoint_dir, *args, **kwargs)
        (Path(checkpoint_dir) / "__0_0.distcp").write_bytes(bytes(4096))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(checkpoint_dir) / "__0_0.distcp"))
    return save


if __name__ == "__main__":  # dist_checkpointing's writer process re-imports __main__
    dist_checkpointing.save = fill_the_disk_at(int(sys.argv[1]))
    sys.exit(main(["pt", *sys.argv[2:]]))
