"""The launcher inside real Slurm steps: it reads the step's variables, runs the job, refuses bad task layouts."""
import json
import sys

import pytest

from tests.slurm.cluster import REPO, job_env, not_ready_reason, run

REASON = not_ready_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
PROBE = REPO / "tests" / "launchers" / "allreduce_probe.py"
LAUNCH = [sys.executable, "-m", "megaswift", "launch"]


def test_srun_step_launches_processes_from_the_slurm_environment(tmp_path):
    done = run(["srun", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=2", *LAUNCH, "--",
                PROBE, tmp_path], timeout=120, env=job_env(NPROC_PER_NODE="2"), cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nodes: SLURM_STEP_NODELIST" in done.stderr and "node rank: SLURM_NODEID" in done.stderr
    assert "world size 2" in done.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank_sum"] for r in ranks] == [3.0, 3.0]


def test_two_tasks_on_one_node_are_refused_before_any_rendezvous():
    done = run(["srun", "--nodes=1", "--ntasks=2", "--time=1", *LAUNCH, "--dry-run", "--nproc-per-node=1", "--",
                "megaswift", "pt"], timeout=60, cwd=REPO)
    assert done.returncode != 0
    assert "srun started 2 tasks on 1 node(s)" in done.stderr and "--ntasks-per-node=1" in done.stderr
