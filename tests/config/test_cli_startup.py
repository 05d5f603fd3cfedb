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
