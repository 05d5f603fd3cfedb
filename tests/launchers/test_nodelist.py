"""Slurm host lists: our parser on its own, and against `scontrol show hostnames` where Slurm is installed."""
import shutil
import subprocess

import pytest

from launchers import LaunchError, expand_nodelist, slurm_hostnames

CASES = {
    "node01": ["node01"],
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "a[1-2],b3": ["a1", "a2", "b3"],
    "gpu[008-011]": ["gpu008", "gpu009", "gpu010", "gpu011"],
    "n[9-11]": ["n9", "n10", "n11"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],
    "x[3],w,v[1]": ["x3", "w", "v1"],
    "10.0.0.[1-2]": ["10.0.0.1", "10.0.0.2"],
}


@pytest.mark.parametrize("text", CASES)
def test_expand_nodelist(text):
    assert expand_nodelist(text) == CASES[text]


@pytest.mark.parametrize("text, message", [
    ("", "is empty"), ("node[01-04", "'[' without ']'"), ("node01-04]", "']' without '['"),
    ("node[04-01]", "runs backwards"), ("node[a-b]", "expected numbers"), ("node[]", "empty brackets"),
    ("a,,b", "empty entry"), ("n[[1]]", "nested"),
])
def test_malformed_lists_name_the_variable_and_the_problem(text, message):
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST") as info:
        expand_nodelist(text)
    assert message in str(info.value)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not on PATH (Slurm client not installed)")
@pytest.mark.parametrize("text", CASES)
def test_parser_agrees_with_scontrol(text):
    done = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == CASES[text] == slurm_hostnames(text)


def test_slurm_hostnames_falls_back_to_the_parser_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # the same call on a login node without Slurm's tools
    assert slurm_hostnames("node[01-02]") == ["node01", "node02"]
