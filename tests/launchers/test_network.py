"""Fail-fast network checks against this machine's real resolver and sockets."""
import socket
import time

import pytest

from launchers import LaunchError, LaunchFlags, expand_nodelist, plan_launch
from launchers.network import check_rendezvous_address, is_loopback, resolve_host, wait_for_head
from tests.torchrun import free_port


def plan(env, **flags):
    return plan_launch(env, LaunchFlags(command=["-m", "x"], **flags), gpu_count=lambda: 0,
                       hostnames=expand_nodelist)


def routable(host):
    return ["10.0.0.5"]


@pytest.mark.parametrize("addr", ["127.0.0.1", "localhost", "::1"])
def test_literal_loopback_head_is_refused_on_every_node(addr):
    for rank in (0, 1):
        with pytest.raises(LaunchError, match="loopback.*--allow-loopback-rdzv"):
            check_rendezvous_address(plan({}, nnodes=2, node_rank=rank, master_addr=addr), {})


def test_name_resolving_to_loopback_is_refused_on_other_nodes():
    name = socket.gethostname()
    if not all(map(is_loopback, resolve_host(name))):
        pytest.skip(f"this machine's name {name!r} resolves to a routable address here")
    with pytest.raises(LaunchError, match=f"{name}.*resolves to the loopback"):
        check_rendezvous_address(plan({}, nnodes=2, node_rank=1, master_addr=name), {})


def test_loopback_opt_in_allows_one_machine_runs():
    check_rendezvous_address(plan({}, nnodes=2, node_rank=1, master_addr="127.0.0.1", allow_loopback=True), {})


def test_unresolvable_head_is_named():
    with pytest.raises(LaunchError, match="cannot resolve the rendezvous host 'head.invalid'"):
        check_rendezvous_address(plan({}, nnodes=2, node_rank=1, master_addr="head.invalid",
                                      allow_loopback=True), {})


def test_gloo_without_interface_on_a_loopback_hostname_is_refused():
    p = plan({}, nnodes=2, node_rank=1, master_addr="head")
    with pytest.raises(LaunchError, match="GLOO_SOCKET_IFNAME"):
        check_rendezvous_address(p, {}, resolve=lambda h: ["10.0.0.5"] if h == "head" else ["127.0.1.1"],
                                 local_hostname=lambda: "node2")
    check_rendezvous_address(p, {"GLOO_SOCKET_IFNAME": "eth0"}, resolve=routable, local_hostname=lambda: "node2")
    check_rendezvous_address(p, {}, resolve=routable, local_hostname=lambda: "node2")


def test_single_node_skips_every_network_check():
    check_rendezvous_address(plan({"MASTER_ADDR": "head.invalid"}), {})
    wait_for_head(plan({"MASTER_ADDR": "head.invalid"}))


def test_wait_for_head_gives_up_after_the_timeout_with_the_reason():
    p = plan({}, nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=free_port(), connect_timeout=1.5)
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"node 1 could not reach .* within 1.5 s \(last error: .*refused"):
        wait_for_head(p)
    assert 1.4 < time.monotonic() - start < 5


def test_wait_for_head_returns_once_the_port_listens():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        p = plan({}, nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=server.getsockname()[1],
                 connect_timeout=5)
        start = time.monotonic()
        wait_for_head(p)
        assert time.monotonic() - start < 1


def test_head_node_does_not_wait_for_itself():
    p = plan({}, nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=free_port(), connect_timeout=30)
    start = time.monotonic()
    wait_for_head(p)
    assert time.monotonic() - start < 0.5
