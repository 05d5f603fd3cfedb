"""Real torchrun launches through `megaswift launch`: two agents as two "nodes" on this machine vs one agent."""
import json
import time

import pytest

from tests.launchers.agents import REPO, launch_argv, run_agents
from tests.torchrun import free_port

PROBE = REPO / "tests" / "launchers" / "allreduce_probe.py"
pytestmark = pytest.mark.slow


def _read_ranks(out_dir, world: int) -> list[dict]:
    files = sorted(out_dir.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(world)]
    return [json.loads(f.read_text()) for f in files]


def _assert_ok(results):
    for result in results:
        assert result.returncode == 0, f"{result.args}\n{result.stdout[-4000:]}"


def test_two_agents_over_loopback_match_one_agent(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    port = free_port()
    agents = [launch_argv("--nnodes", 2, "--nproc-per-node", 1, "--node-rank", rank, "--master-addr", "127.0.0.1",
                          "--master-port", port, "--allow-loopback-rdzv", "--rdzv-timeout", 60,
                          "--connect-timeout", 30, "--", PROBE, two) for rank in (0, 1)]
    results = run_agents(agents, timeout=90)
    _assert_ok(results)
    assert "node 1 of 2" in results[1].stdout and "joins the head node" in results[1].stdout
    _assert_ok(run_agents([launch_argv("--nproc-per-node", 2, "--", PROBE, one)], timeout=90))

    two_ranks, one_ranks = _read_ranks(two, 2), _read_ranks(one, 2)
    for ranks in (two_ranks, one_ranks):
        assert {r["world_size"] for r in ranks} == {2}
        assert {r["rank_sum"] for r in ranks} == {3.0}  # 1 + 2: both ranks took part in the all-reduce
    seen_two = sorted((s["group_rank"], s["local_rank"], s["local_world_size"]) for s in two_ranks[0]["seen"])
    seen_one = sorted((s["group_rank"], s["local_rank"], s["local_world_size"]) for s in one_ranks[0]["seen"])
    assert seen_two == [(0, 0, 1), (1, 0, 1)]  # two nodes of one process each
    assert seen_one == [(0, 0, 2), (0, 1, 2)]  # one node of two processes
    assert two_ranks[0]["losses"] == one_ranks[0]["losses"] == two_ranks[1]["losses"]
    assert two_ranks[0]["losses"][-1] < two_ranks[0]["losses"][0]


def _launch_fails_fast(flags, expected: str, within: float, env=None):
    start = time.monotonic()
    (result,) = run_agents([launch_argv(*flags, "--", PROBE, "/nonexistent")], timeout=within + 30, env=env)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stdout
    assert expected in result.stdout, result.stdout
    assert elapsed < within, f"took {elapsed:.1f}s: {result.stdout}"
    return result.stdout


def test_multi_node_on_loopback_without_opt_in_fails_fast():
    out = _launch_fails_fast(["--nnodes", 2, "--node-rank", 1, "--master-addr", "127.0.0.1"], "loopback", 15)
    assert "--allow-loopback-rdzv" in out and "MASTER_ADDR" in out


def test_unreachable_head_fails_within_connect_timeout():
    out = _launch_fails_fast(["--nnodes", 2, "--node-rank", 1, "--master-addr", "127.0.0.1", "--master-port",
                              free_port(), "--allow-loopback-rdzv", "--connect-timeout", 3], "could not reach", 15)
    assert "within 3 s" in out


def test_unresolvable_head_fails_fast():
    _launch_fails_fast(["--nnodes", 2, "--node-rank", 1, "--master-addr", "no-such-head.invalid"],
                       "cannot resolve the rendezvous host 'no-such-head.invalid'", 15)


def test_inconsistent_node_counts_fail_fast():
    out = _launch_fails_fast(["--nnodes", 3], "inconsistent number of nodes", 15, env={"NNODES": "2"})
    assert "--nnodes=3" in out and "NNODES=2" in out
