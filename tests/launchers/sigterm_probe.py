"""Run under torchrun: announce readiness, then wait for SIGTERM and exit 0 (what a trainer does after saving)."""
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank = os.environ["RANK"]
    stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    (out / f"ready{rank}").write_text("")
    deadline = time.monotonic() + 60
    while not stop and time.monotonic() < deadline:
        time.sleep(0.05)
    (out / f"stopped{rank}").write_text("SIGTERM" if stop else "timeout")
    sys.exit(0 if stop else 3)
