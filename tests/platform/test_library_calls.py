"""A library call leaves the process as it found it: after `converters.hf2mcore(...)` and
`converters.mcore2hf(...)` (with their megatron-core logit checks) torch.Tensor.type, torch.cuda's
functions, megatron-core's patched globals, the function-mode stack, the RNG stream, logging and
warning filters and the process-group state are what they were (library_call_probe.py).

It runs in a fresh process: pytest's own process may already hold patches applied by other tests.
"""
import json
import subprocess
import sys

import pytest

from tests.platform.conftest import HERE, needs_cpu_only
from tests.torchrun import REPO, child_env

pytestmark = [needs_cpu_only, pytest.mark.timeout(300)]


def test_conversion_as_a_library_call_leaves_the_process_unchanged():
    proc = subprocess.run([sys.executable, str(HERE / "library_call_probe.py")], capture_output=True, text=True,
                          timeout=240, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"library_call_probe.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    (changed,) = [json.loads(line[len("CHANGED "):]) for line in proc.stdout.splitlines()
                  if line.startswith("CHANGED ")]
    assert changed == [], "the conversion changed the calling process:\n" + "\n".join(changed)
