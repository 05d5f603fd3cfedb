"""cli/startup.py: the `megaswift` program imports without the cyclic collector and freezes what it
imported; an in-process call of main([...]) (a test, a notebook) leaves the caller's collector alone."""
import gc
import subprocess
import sys

from megaswift.cli.main import main
from tests.torchrun import child_env

# The program as the console script runs it (main() with no argv), on a folder that is not a model: the
# command imports everything, fails on its input, and this prints the collector's state afterwards.
PROGRAM = """
import gc, sys
from megaswift.cli.main import main
sys.argv = ["megaswift", "convert", "hf2mcore", sys.argv[1], sys.argv[2]]
code = main()
print(code, gc.isenabled(), gc.get_freeze_count(), "megatron.core" in sys.modules)
"""


def test_the_program_freezes_its_start_up_imports_and_collects_again(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path / "missing"), str(tmp_path / "out")],
                         env=child_env(), capture_output=True, text=True, check=True)
    code, enabled, frozen, imported = out.stdout.split()
    assert code == "1" and "config.json" in out.stderr  # the input's error, reported as usual
    assert imported == "True" and int(frozen) > 100_000  # megatron-core, torch, ...: out of the collector's view
    assert enabled == "True"  # and the collector runs again for what the command does


def test_an_in_process_call_leaves_the_callers_collector_alone(tmp_path, capsys):
    frozen = gc.get_freeze_count()
    assert main(["convert", "hf2mcore", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert gc.get_freeze_count() == frozen and gc.isenabled()


# Where a 64 MiB tensor's memory comes from, with or without reuse_freed_memory: glibc's heap or an mmap.
HEAP_PROBE = """
import argparse, sys
import torch
from megaswift.cli.startup import reuse_freed_memory
took = reuse_freed_memory(argparse.Namespace(owns_process=sys.argv[1] == "program"))
tensor = torch.ones(64 << 20, dtype=torch.uint8)
heap = next(line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
start, end = (int(x, 16) for x in heap.split("-"))
print(took, start <= tensor.data_ptr() < end)
"""


def test_a_conversion_takes_large_blocks_from_the_heap_only_as_the_program():
    """glibc-specific: a 64 MiB block is an mmap of its own by default (fresh pages each time); after
    reuse_freed_memory it lies in the heap, where freed blocks are reused."""
    def probe(who: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", HEAP_PROBE, who], env=child_env(), capture_output=True,
                              text=True, check=True).stdout.split()
    assert probe("program") == ["True", "True"]
    assert probe("in-process") == ["False", "False"]
