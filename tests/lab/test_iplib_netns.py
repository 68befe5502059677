"""nlbfarm.node.iplib against the real kernel, inside throw-away namespaces.

Needs root. Every namespace is named ``iplt-<random>`` and is deleted by the
``make_netns`` fixture whatever the test outcome. Nothing here adds an
address, route, link or sysctl to the namespace pytest runs in.
"""
import os
import secrets
import subprocess
import threading
import time

import pytest

from nlbfarm.errors import NetError, NotFound
from nlbfarm.node import iplib

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

CLUSTER_MAC = "03:bf:c6:12:63:64"


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def make_netns():
    """Factory for uniquely named namespaces; all are deleted at teardown."""
    created: list[str] = []

    def make() -> str:
        name = f"iplt-{secrets.token_hex(4)}"
        created.append(name)  # before creating: clean up even a half-made one
        assert iplib.ensure_netns(name) is True
        return name

    try:
        yield make
    finally:
        for name in created:
            try:
                iplib.delete_netns(name)
            except Exception:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        leftovers = [n for n in created if n in iplib.list_netns()]
        assert not leftovers, f"namespaces left behind: {leftovers}"


@pytest.fixture
def pair(make_netns):
    """Namespaces A and B: bridge br0 in A, veth vb0 (A, on br0) <-> eth0 (B), all up,
    A's br0 = 198.18.99.1/24, B's eth0 = 198.18.99.2/24."""
    a, b = make_netns(), make_netns()
    assert iplib.ensure_bridge("br0", a) is True
    assert iplib.ensure_veth_pair("vb0", "eth0", netns=a, peer_netns=b) is True
    assert iplib.set_master("vb0", "br0", a) is True
    for name, ns in (("br0", a), ("vb0", a), ("eth0", b)):
        assert iplib.set_link_up(name, ns) is True
    assert iplib.add_address("br0", "198.18.99.1/24", a) is True
    assert iplib.add_address("eth0", "198.18.99.2/24", b) is True
    return a, b


def test_netns_lifecycle(make_netns):
    name = make_netns()
    assert name in iplib.list_netns()
    assert iplib.netns_exists(name)
    assert iplib.ensure_netns(name) is False
    assert iplib.delete_netns(name) is True
    assert iplib.delete_netns(name) is False
    assert name not in iplib.list_netns()
    with pytest.raises(NotFound, match=name):
        iplib.link_exists("lo", name)


def test_bridge_veth_master_state(pair):
    a, b = pair
    # second calls change nothing
    assert iplib.ensure_bridge("br0", a) is False
    assert iplib.ensure_veth_pair("vb0", "eth0", netns=a, peer_netns=b) is False
    assert iplib.set_master("vb0", "br0", a) is False
    assert iplib.set_link_up("br0", a) is False
    assert iplib.link_exists("eth0", b) and not iplib.link_exists("eth0", a)

    assert "master br0" in ip("-n", a, "link", "show", "vb0")
    assert "link-netns " + a in ip("-n", b, "link", "show", "eth0")
    mac = iplib.link_mac("eth0", b)
    assert mac in ip("-n", b, "link", "show", "eth0")
    assert len(mac) == 17 and mac == mac.lower()

    assert iplib.set_link_down("eth0", b) is True
    assert iplib.set_link_down("eth0", b) is False
    assert ",UP" not in ip("-n", b, "link", "show", "eth0").split(">")[0]
    assert iplib.set_master("vb0", None, a) is True
    assert iplib.set_master("vb0", None, a) is False
    assert "master" not in ip("-n", a, "link", "show", "vb0")


def test_link_conflicts_and_not_found(pair):
    a, b = pair
    with pytest.raises(NetError, match="kind 'veth'"):
        iplib.ensure_bridge("vb0", a)
    with pytest.raises(NetError, match="peer"):
        iplib.ensure_veth_pair("vb0", "other0", netns=a, peer_netns=b)
    with pytest.raises(NetError, match="File exists"):  # eth0 is taken in b
        iplib.ensure_veth_pair("new0", "eth0", netns=a, peer_netns=b)
    assert not iplib.link_exists("new0", a)
    # the peer's name only has to be free in the peer's namespace
    assert iplib.ensure_veth_pair("va0", "br0", netns=a, peer_netns=b) is True
    with pytest.raises(NotFound, match="nope0"):
        iplib.set_link_up("nope0", a)
    with pytest.raises(NotFound, match="bridge 'nobr'"):
        iplib.set_master("vb0", "nobr", a)
    with pytest.raises(NotFound):
        iplib.link_mac("nope0", a)
    # same-namespace pair, then delete: the peer goes with it
    assert iplib.ensure_veth_pair("x0", "x1", netns=b, peer_netns=b) is True
    assert iplib.ensure_veth_pair("x0", "x1", netns=b, peer_netns=b) is False
    assert iplib.delete_link("x0", b) is True
    assert iplib.delete_link("x0", b) is False
    assert not iplib.link_exists("x1", b)


def test_addresses(pair):
    a, b = pair
    assert iplib.add_address("eth0", "198.18.99.2/24", b) is False
    assert iplib.add_address("eth0", "198.18.99.50/32", b) is True
    assert iplib.add_address("eth0", "2001:DB8::50/64", b) is True
    assert iplib.add_address("eth0", "2001:db8::50/64", b) is False
    got = iplib.addresses("eth0", b)
    assert got[:2] == ["198.18.99.2/24", "198.18.99.50/32"]
    assert "2001:db8::50/64" in got
    shown = ip("-n", b, "addr", "show", "eth0")
    assert "inet 198.18.99.2/24 brd 198.18.99.255" in shown
    assert "inet 198.18.99.50/32" in shown and "2001:db8::50/64" in shown

    assert iplib.delete_address("eth0", "198.18.99.50/32", b) is True
    assert iplib.delete_address("eth0", "198.18.99.50/32", b) is False
    assert iplib.delete_address("eth0", "2001:db8::50/64", b) is True
    assert iplib.delete_address("eth0", "2001:db8::50/64", b) is False
    assert "198.18.99.50" not in ip("-n", b, "addr", "show", "eth0")

    with pytest.raises(NotFound, match="'nope0'"):
        iplib.delete_address("nope0", "198.18.99.2/24", b)
    with pytest.raises(NotFound):
        iplib.add_address("nope0", "198.18.99.2/24", b)
    with pytest.raises(NotFound):
        iplib.addresses("nope0", b)


def test_multicast_mac(pair):
    a, _ = pair
    assert iplib.add_multicast_mac("br0", CLUSTER_MAC, a) is True
    assert iplib.add_multicast_mac("br0", CLUSTER_MAC.upper(), a) is False
    assert f"link  {CLUSTER_MAC} static" in ip("-n", a, "maddr", "show", "dev", "br0")
    assert iplib.multicast_macs("br0", a, static_only=True) == [CLUSTER_MAC]
    assert "33:33:00:00:00:01" in iplib.multicast_macs("br0", a)
    assert iplib.delete_multicast_mac("br0", CLUSTER_MAC, a) is True
    assert iplib.delete_multicast_mac("br0", CLUSTER_MAC, a) is False
    assert CLUSTER_MAC not in ip("-n", a, "maddr", "show", "dev", "br0")
    # a group the kernel joined for IPv6 is not ours to delete
    assert iplib.delete_multicast_mac("br0", "33:33:00:00:00:01", a) is False
    with pytest.raises(NotFound, match="nope0"):
        iplib.add_multicast_mac("nope0", CLUSTER_MAC, a)
    with pytest.raises(NotFound, match="nope0"):
        iplib.delete_multicast_mac("nope0", CLUSTER_MAC, a)


def test_sysctl_is_per_namespace(pair):
    a, b = pair
    root_before = read("/proc/sys/net/ipv4/ip_forward")
    assert iplib.get_sysctl(a, "net.ipv4.ip_forward") == "0"
    assert iplib.set_sysctl(a, "net.ipv4.ip_forward", 1) is True
    assert iplib.set_sysctl(a, "net.ipv4.ip_forward", "1") is False
    assert ip("netns", "exec", a, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
    assert iplib.get_sysctl(b, "net.ipv4.ip_forward") == "0"
    assert read("/proc/sys/net/ipv4/ip_forward") == root_before
    assert iplib.set_sysctl(b, "net.ipv4.conf.eth0.arp_announce", 2) is True
    assert iplib.get_sysctl(b, "net/ipv4/conf/eth0/arp_announce") == "2"
    with pytest.raises(NotFound):
        iplib.set_sysctl(b, "net.ipv4.conf.nope0.arp_announce", 2)


def test_gratuitous_arp_reaches_neighbour(pair):
    a, b = pair
    vip = "198.18.99.100"
    # Linux only learns a *new* neighbour from unsolicited ARP with arp_accept
    assert iplib.set_sysctl(b, "net.ipv4.conf.eth0.arp_accept", 1) is True
    iplib.send_gratuitous_arp("br0", vip, CLUSTER_MAC, netns=a, count=2, interval=0.05)
    deadline = time.monotonic() + 3
    while True:
        neigh = ip("-n", b, "neigh", "show", vip)
        if f"lladdr {CLUSTER_MAC}" in neigh or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert f"{vip} dev eth0 lladdr {CLUSTER_MAC}" in neigh
    with pytest.raises(NotFound):
        iplib.send_gratuitous_arp("nope0", vip, CLUSTER_MAC, netns=a)
    with pytest.raises(NetError, match="not an Ethernet link"):
        iplib.send_gratuitous_arp("lo", vip, CLUSTER_MAC, netns=a)


def test_ipv6_nodad_address_shared_by_two_namespaces(pair):
    a, b = pair
    vip = "2001:db8::100/128"
    assert iplib.add_address("br0", vip, a, nodad=True) is True
    assert iplib.add_address("eth0", vip, b, nodad=True) is True
    assert iplib.add_address("eth0", vip, b, nodad=True) is False
    # control: without nodad a fresh IPv6 address is tentative while DAD runs
    assert iplib.add_address("eth0", "2001:db8::200/128", b) is True
    assert "2001:db8::200/128 scope global tentative" in ip("-n", b, "-6", "addr", "show", "eth0")
    # nodad on IPv4 is ignored, not an error
    assert iplib.add_address("eth0", "198.18.99.60/32", b, nodad=True) is True
    time.sleep(1.5)  # longer than a DAD round (retrans_time 1 s) would take
    for ns, dev in ((a, "br0"), (b, "eth0")):
        line = next(x for x in ip("-n", ns, "-6", "addr", "show", dev).splitlines()
                    if "2001:db8::100/128" in x)
        assert "nodad" in line
        assert "tentative" not in line and "dadfailed" not in line, (ns, line)
    assert "2001:db8::100/128" in iplib.addresses("br0", a)


def test_unsolicited_na_updates_neighbour(pair):
    a, b = pair
    vip, mac = "2001:db8::100", "03:bf:00:00:00:64"
    # B needs an on-link address; it must *not* own the VIP (Linux ignores an
    # NA for one of its own addresses)
    assert iplib.add_address("eth0", "2001:db8::3/64", b, nodad=True) is True
    # Linux only updates an *existing* entry from an unsolicited NA
    # (unless net.ipv6.conf.*.accept_untracked_na is set)
    ip("-n", b, "-6", "neigh", "replace", vip, "lladdr", "02:00:00:00:00:01",
       "dev", "eth0", "nud", "stale")
    iplib.send_unsolicited_na("br0", vip, mac, netns=a, count=2, interval=0.05)
    deadline = time.monotonic() + 3
    while True:
        neigh = ip("-n", b, "-6", "neigh", "show", vip)
        if f"lladdr {mac}" in neigh or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert f"{vip} dev eth0 lladdr {mac}" in neigh
    with pytest.raises(NotFound):
        iplib.send_unsolicited_na("nope0", vip, mac, netns=a)
    with pytest.raises(NetError, match="not an Ethernet link"):
        iplib.send_unsolicited_na("lo", vip, mac, netns=a)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_handles_are_closed_and_thread_safe(pair):
    a, b = pair
    for _ in range(3):  # warm-up: lazily created library state
        with iplib.ip_for(a) as ipr:
            ipr.link("dump")
    fds, threads = _fds(), threading.active_count()
    for _ in range(50):
        with iplib.ip_for(a) as ipr:
            assert ipr.link_lookup(ifname="br0")
    assert _fds() == fds
    assert threading.active_count() == threads

    errors: list[BaseException] = []

    def worker(ns: str, ifname: str) -> None:
        try:
            for _ in range(10):
                assert iplib.link_exists(ifname, ns)
                assert iplib.addresses(ifname, ns)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(a, "br0") if i % 2 else (b, "eth0"))
            for i in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    assert _fds() == fds


def test_promisc(pair):
    _, b = pair
    assert iplib.set_promisc("eth0", True, b) is True
    assert iplib.set_promisc("eth0", True, b) is False
    assert "PROMISC" in ip("-n", b, "link", "show", "dev", "eth0")
    assert iplib.set_promisc("eth0", False, b) is True
    assert iplib.set_promisc("eth0", False, b) is False
    assert "PROMISC" not in ip("-n", b, "link", "show", "dev", "eth0")
    with pytest.raises(NotFound, match="nope0"):
        iplib.set_promisc("nope0", True, b)
