"""A torchrun worker that runs `megaswift ARGS` and writes its exit status to OUT/exit<RANK>: plain torchrun reports
no worker's status once it has been signalled itself, and a test must see that every rank saved and exited 0.

    torchrun ... tests/launchers/record_exit.py OUT pt --train.train_iters ...
"""
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    status = out / f"exit{os.environ['RANK']}"
    from megaswift.cli.main import main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        status.write_text(f"{type(e).__name__}: {e}")
        raise
    status.write_text(str(code))
    sys.exit(code)
