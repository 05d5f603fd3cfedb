"""Checks that turn a multi-node rendezvous that would hang into an immediate, explained failure."""
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping

from launchers.errors import LaunchError
from launchers.plan import LaunchPlan

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
OPT_IN = "--allow-loopback-rdzv (only when every node runs on this one machine)"


def resolve_host(host: str) -> list[str]:
    """Every address `host` resolves to here; LaunchError naming the host when it resolves to none."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LaunchError(f"cannot resolve the rendezvous host {host!r} on {socket.gethostname()}: {e}. "
                          f"Use a name or IP address of the head node that every node can resolve "
                          f"(--master-addr / MASTER_ADDR).") from e
    return sorted({info[4][0] for info in infos})


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def _is_loopback_name(host: str) -> bool:
    try:
        return is_loopback(host)
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


def check_rendezvous_address(plan: LaunchPlan, env: Mapping[str, str],
                             resolve: Callable[[str], list[str]] = resolve_host,
                             local_hostname: Callable[[], str] = socket.gethostname) -> None:
    """Multi-node only: the head must resolve to a routable address, and gloo must not bind to loopback."""
    if plan.nnodes == 1:
        return
    addresses = resolve(plan.master_addr)  # unresolvable is fatal even with the opt-in
    if plan.allow_loopback:
        return
    if _is_loopback_name(plan.master_addr) or (not plan.is_head and all(map(is_loopback, addresses))):
        raise LaunchError(
            f"a {plan.nnodes}-node rendezvous at {plan.master_addr!r} ({plan.sources.get('address')}), which "
            f"resolves to the loopback address(es) {addresses} on {local_hostname()}: the other nodes would "
            f"wait for themselves and hang. Set --master-addr / MASTER_ADDR to the head node's cluster-network "
            f"name or IP, or fix /etc/hosts; or pass {OPT_IN}.")
    if not env.get("GLOO_SOCKET_IFNAME"):
        own = local_hostname()
        own_addresses = resolve(own)
        if all(map(is_loopback, own_addresses)):
            raise LaunchError(
                f"this node's host name {own!r} resolves only to loopback {own_addresses}, so gloo (used for "
                f"CPU collectives) would advertise an address the other nodes cannot reach and the job would "
                f"hang. Set GLOO_SOCKET_IFNAME to this node's cluster interface (e.g. eth0, ib0; see `ip addr`), "
                f"or map the host name to its real address in /etc/hosts; or pass {OPT_IN}.")


def wait_for_head(plan: LaunchPlan, connect: Callable[..., socket.socket] = socket.create_connection,
                  clock: Callable[[], float] = time.monotonic) -> None:
    """Non-head nodes: retry a TCP connect to the head's rendezvous port until plan.connect_timeout.

    The head opens the port a few seconds after its job step starts, so early refusals are retried; a head
    that never answers fails here with the address and the reason, instead of a join that waits for minutes.
    """
    if plan.is_head or plan.nnodes == 1:
        return
    deadline = clock() + plan.connect_timeout
    last_error: OSError | None = None
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        try:
            connect((plan.master_addr, plan.master_port), timeout=min(5.0, remaining)).close()
            return
        except OSError as e:
            last_error = e
            time.sleep(min(1.0, max(0.0, deadline - clock())))
    raise LaunchError(
        f"node {plan.node_rank} could not reach the rendezvous on the head node {plan.rdzv_endpoint} "
        f"within {plan.connect_timeout:g} s (last error: {last_error}). Check that node 0 started (its log), "
        f"that port {plan.master_port} is open between the nodes, and that {plan.master_addr!r} is the head's "
        f"address on the cluster network; raise --connect-timeout if the head starts slowly.")
