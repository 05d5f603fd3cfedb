"""`megaswift pt` through the launcher: two agents as two "nodes" (one process each) over a loopback c10d
rendezvous train exactly like one agent with two processes."""
import pytest

from tests.launchers.agents import launch_argv, run_agents
from tests.launchers.pretrain_config import metrics, write_pretrain_config
from tests.torchrun import free_port

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from megaswift.data.demo import prepare_demo_data
    return prepare_demo_data(tmp_path_factory.mktemp("demo-data"))


def _assert_ok(results):
    for result in results:
        assert result.returncode == 0, f"{result.args}\n{result.stdout[-6000:]}"


def test_two_node_losses_equal_one_node_of_the_same_world_size(tmp_path, demo_data):
    two = write_pretrain_config(tmp_path / "two", demo_data, STEPS, save=False)
    one = write_pretrain_config(tmp_path / "one", demo_data, STEPS, save=False)
    port = free_port()
    pt = ["--", "megaswift", "pt", "--config"]
    results = run_agents([launch_argv("--nnodes", 2, "--nproc-per-node", 1, "--node-rank", rank, "--master-addr",
                                      "127.0.0.1", "--master-port", port, "--allow-loopback-rdzv",
                                      "--rdzv-timeout", 120, *pt, two) for rank in (0, 1)], timeout=240)
    _assert_ok(results)
    assert "node 1 of 2, 1 process(es) per node, world size 2" in results[1].stdout
    _assert_ok(run_agents([launch_argv("--nproc-per-node", 2, *pt, one)], timeout=240))
    two_losses = [m["loss"] for m in metrics(two.parent)]
    one_losses = [m["loss"] for m in metrics(one.parent)]
    assert len(two_losses) == STEPS
    assert two_losses == one_losses  # bit-identical: same world size, same data order, same reductions
