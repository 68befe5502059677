"""IPv6 VIPs on a real farm: neighbour discovery, port rules and affinities, ICMPv6, UDP, failover.

One dual-stack lab (prefix "tsix"), three nodes. Every host also has an
address in 2001:db8::/64; nodes reach 2001:db8::/48 on-link, so the client
can add sources in other /64s.
  198.18.0.100   tcp 80 affinity none (IPv4 keeps working next to IPv6)
  2001:db8::100  tcp 80 affinity none; udp 5300 affinity none
  2001:db8::101  tcp 80 affinity client
  2001:db8::102  tcp 80 affinity network (the client's /64)
The IPv6 link-cut fault under load is in test_faults.py.
"""
import json
import subprocess
from collections import Counter

import pytest

from nlbfarm.analysis import failures, match_accepts, read_accepts, read_results, shares
from nlbfarm.lab import CLIENT_ADDR6, UDP_PORT, VIP, VIP6, Lab
from nlbfarm.node import iplib
from nlbfarm.node.dataplane import cluster_mac_for

VIP6_CLIENT = "2001:db8::101"
VIP6_NET = "2001:db8::102"
NODES = ["n1", "n2", "n3"]
RULES = ({"vip": VIP, "protocol": "tcp", "ports": 80},
         {"vip": VIP6, "protocol": "tcp", "ports": 80},
         {"vip": VIP6, "protocol": "udp", "ports": UDP_PORT},
         {"vip": VIP6_CLIENT, "protocol": "tcp", "ports": 80, "affinity": "client"},
         {"vip": VIP6_NET, "protocol": "tcp", "ports": 80, "affinity": "network"})
CLUSTER_MAC = cluster_mac_for(VIP)
SAME_64 = [f"2001:db8::{i:x}" for i in range(0x50, 0x60)]           # 16 clients of the lab /64
OTHER_64S = [f"2001:db8:0:{i:x}::3" for i in range(1, 25)]          # one client in each of 24 /64s


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(prefix="tsix", state_root=tmp_path_factory.mktemp("labstate"), ipv6=True,
              extra_vips=(VIP6_CLIENT, VIP6_NET), rules=RULES)
    with lab.running(nodes=3, wait=60):
        for a in SAME_64:
            iplib.add_address("eth0", f"{a}/64", lab.ns("client"), nodad=True)
        for a in OTHER_64S:
            iplib.add_address("eth0", f"{a}/64", lab.ns("client"), nodad=True)
        yield lab


def load(lab, tmp_path, name, vip, count, sources=None, workers=4):
    # The client has many IPv6 addresses (see the fixture): IPv6 loads name their sources.
    out = tmp_path / f"{name}.jsonl"
    subprocess.run(lab.loadclient_argv(count=count, duration=60, out=out, workers=workers, vip=vip,
                                       sources=sources, timeout=3.0), check=True, timeout=90)
    results = read_results(out)
    assert len(results) == count and not failures(results), failures(results)[:5]
    return results


def which(lab, client, vip):
    cp = lab.farmctl("n1", "which", client, "--vip", vip, "--port", "80", "--protocol", "tcp", "--json")
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def client_neighbour(lab, vip):
    return lab.run("client", ["ip", "-6", "neigh", "show", vip]).stdout


def test_neighbour_discovery_leads_the_client_to_the_cluster_mac(lab, tmp_path):
    """Clients resolve an IPv6 VIP to the cluster MAC, also after the nodes solicit them.

    A node that has forgotten the client sends a neighbour solicitation from
    the VIP before it can answer; its link-layer option would teach the
    client this node's MAC for the VIP. The nodes flush their caches first,
    so every reply below is preceded by such a solicitation.
    """
    lab.run("client", ["ping", "-6", "-n", "-c", "1", "-W", "2", VIP6], check=False)
    assert CLUSTER_MAC in client_neighbour(lab, VIP6)
    node_macs = {n: iplib.link_mac("eth0", lab.ns(n)) for n in NODES}
    for n in NODES:
        lab.run(n, ["ip", "-6", "neigh", "flush", "dev", "eth0"])
    results = load(lab, tmp_path, "tcp6", VIP6, 300, [CLIENT_ADDR6])
    assert set(shares(results)) == set(NODES), shares(results)  # affinity none spreads
    # each connection was accepted by exactly one node
    accepts = read_accepts({n: lab.accept_log(n) for n in NODES}, CLIENT_ADDR6)
    assert [len(got) for got in match_accepts(results, accepts)] == [1] * len(results)
    # the nodes did solicit the client, and the client still maps the VIP to the cluster MAC
    for n in NODES:
        assert CLIENT_ADDR6 in lab.run(n, ["ip", "-6", "neigh", "show", "dev", "eth0"]).stdout
    neigh = client_neighbour(lab, VIP6)
    assert CLUSTER_MAC in neigh and not any(mac in neigh for mac in node_macs.values()), neigh
    # IPv4 on the same farm is untouched
    assert set(shares(load(lab, tmp_path, "tcp4", VIP, 90))) == set(NODES)


def test_icmpv6_echo_is_answered_by_exactly_one_node(lab):
    cp = lab.run("client", ["ping", "-6", "-n", "-c", "10", "-i", "0.2", "-W", "1", VIP6], check=False, timeout=30)
    assert " 10 received" in cp.stdout and "DUP!" not in cp.stdout, cp.stdout


def udp_probe(lab, count=30, size=4000):
    cp = lab.run("client", [lab.python, "-m", "nlbfarm.udpprobe", "--vip", VIP6, "--port", str(UDP_PORT),
                            "--count", str(count), "--size", str(size), "--wait", "2"], timeout=30)
    return json.loads(cp.stdout)


def test_udp_over_ipv6_including_fragmented_datagrams(lab):
    """4000-byte datagrams leave the client in IPv6 fragments; one node gets each one whole."""
    records = udp_probe(lab)
    assert all(r["replies"] and len(r["replies"]) == 1 for r in records), records
    assert all(r["replies"][0].split()[1] == "4000" for r in records), records
    assert len({r["replies"][0].split()[0] for r in records}) >= 2, records


def test_client_affinity_on_an_ipv6_vip(lab, tmp_path):
    results = load(lab, tmp_path, "client6", VIP6_CLIENT, 60, [CLIENT_ADDR6])
    nodes = set(shares(results))
    assert len(nodes) == 1, f"one client address, many ports: served by {nodes}"
    assert which(lab, f"[{CLIENT_ADDR6}]:40000", VIP6_CLIENT)["node"] == nodes.pop()


def test_network_affinity_keeps_a_slash64_on_one_node_and_spreads_the_64s(lab, tmp_path):
    same = load(lab, tmp_path, "same64", VIP6_NET, 64, SAME_64)
    assert len(set(shares(same))) == 1, Counter((r["src"], r["node"]) for r in same)
    assert which(lab, f"[{SAME_64[0]}]:40000", VIP6_NET)["node"] == same[0]["node"]
    spread = load(lab, tmp_path, "other64s", VIP6_NET, 96, OTHER_64S)
    by_src = {}
    for r in spread:
        by_src.setdefault(r["src"], set()).add(r["node"])
    assert all(len(v) == 1 for v in by_src.values()), by_src
    assert len({n for v in by_src.values() for n in v}) >= 2, by_src
    for src, nodes in by_src.items():  # the kernel and the Python model agree
        assert which(lab, f"[{src}]:40000", VIP6_NET)["node"] in nodes


def test_udp_over_ipv6_fails_over_to_the_survivors(lab):
    """A node dies: within TTL + 2 s every datagram is answered once, by a survivor."""
    lab.wait_serving(NODES, timeout=30)
    try:
        lab.kill_node("n3")
        lab.wait_serving(["n1", "n2"], timeout=lab.timing.lease_ttl + 2)
        records = udp_probe(lab, count=40)
        assert all(r["replies"] and len(r["replies"]) == 1 for r in records), records
        assert {r["replies"][0].split()[0] for r in records} == {"n1", "n2"}, records
    finally:
        if not lab.alive("n3"):
            lab.start_node("n3")
    lab.wait_serving(NODES, timeout=30)
