"""`megaswift deploy` as a subprocess on 127.0.0.1 and a free port (tests and benchmarks)."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir, adapters: dict | None = None, api_key: str | None = None, log: Path | None = None,
                 timeout: float = 180.0, extra: tuple = ()) -> tuple[subprocess.Popen, str]:
    """(process, base URL) once the server answers /health; the process's output goes to `log`."""
    port = free_port()
    command = [sys.executable, "-m", "megaswift", "deploy", "--model", str(model_dir), "--port", str(port), *extra]
    if adapters:
        command += ["--adapters", *(f"{name}={folder}" for name, folder in adapters.items())]
    if api_key:
        command += ["--api-key", api_key]
    out = open(log, "w") if log else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"megaswift deploy exited with {process.returncode}: "
                               f"{log.read_text() if log else ''}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"megaswift deploy did not answer within {timeout} s")
