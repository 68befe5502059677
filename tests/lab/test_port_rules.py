"""Port rules and affinities on a real farm: two VIPs with different rules, each affinity
mode, and unmatched traffic served by exactly one node (NLB's default host).

One lab (prefix "trules"), three nodes:
  198.18.0.100 tcp 80 affinity client; udp 5300 affinity none
  198.18.0.101 tcp 80 affinity network
  anything else to a VIP: unmatched one-node (the owner of bucket 0)
"""
import json
import subprocess

import pytest

from nlbfarm.analysis import failures, read_results
from nlbfarm.lab import UDP_PORT, VIP, Lab
from nlbfarm.node import iplib

VIP2 = "198.18.0.101"
NODES = ["n1", "n2", "n3"]
RULES = ({"vip": VIP, "protocol": "tcp", "ports": 80, "affinity": "client"},
         {"vip": VIP, "protocol": "udp", "ports": UDP_PORT, "affinity": "none"},
         {"vip": VIP2, "protocol": "tcp", "ports": 80, "affinity": "network"})
SOURCES = [f"198.18.0.{i}" for i in range(50, 74)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(prefix="trules", state_root=tmp_path_factory.mktemp("labstate"), extra_vips=(VIP2,),
              rules=RULES, unmatched="one-node")
    with lab.running(nodes=3, wait=60):
        for a in SOURCES:  # more clients, all in the lab's /24
            iplib.add_address("eth0", f"{a}/24", lab.ns("client"))
        yield lab


def load(lab, tmp_path, name, vip, count, sources=None):
    out = tmp_path / f"{name}.jsonl"
    subprocess.run(lab.loadclient_argv(count=count, duration=60, out=out, workers=4, vip=vip, sources=sources,
                                       timeout=3.0), check=True, timeout=90)
    results = read_results(out)
    assert len(results) == count and not failures(results), failures(results)[:5]
    return results


def which(lab, client, vip, port, proto):
    cp = lab.farmctl("n1", "which", client, "--vip", vip, "--port", str(port), "--protocol", proto, "--json")
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def test_client_affinity_keeps_a_client_on_one_node(lab, tmp_path):
    results = load(lab, tmp_path, "one-client", VIP, 60)
    nodes = {r["node"] for r in results}
    assert len(nodes) == 1, f"one client address, many ports: served by {nodes}"
    w = which(lab, "198.18.0.3:40000", VIP, 80, "tcp")
    assert w["node"] == nodes.pop() and "affinity client" in w["rule"]
    # different client addresses spread
    results = load(lab, tmp_path, "many-clients", VIP, 96, SOURCES)
    by_src = {}
    for r in results:
        by_src.setdefault(r["src"], set()).add(r["node"])
    assert all(len(v) == 1 for v in by_src.values()), by_src
    assert len({n for v in by_src.values() for n in v}) >= 2


def test_network_affinity_keeps_a_slash24_on_one_node(lab, tmp_path):
    results = load(lab, tmp_path, "network", VIP2, 96, SOURCES + ["198.18.0.3"])
    nodes = {r["node"] for r in results}
    assert len(nodes) == 1, f"one /24, many clients: served by {nodes}"
    assert which(lab, "198.18.0.77:1234", VIP2, 80, "tcp")["node"] in nodes


def test_none_affinity_spreads_udp_by_port(lab):
    cp = lab.run("client", [lab.python, "-m", "nlbfarm.udpprobe", "--vip", VIP, "--port", str(UDP_PORT),
                            "--count", "40", "--size", "200", "--wait", "2"], timeout=30)
    probes = json.loads(cp.stdout)
    assert all(len(p["replies"]) == 1 for p in probes), probes
    assert len({p["replies"][0].split()[0] for p in probes}) >= 2


def test_unmatched_traffic_is_served_by_the_owner_of_bucket_0(lab):
    cp = lab.farmctl("n1", "table", "--json")
    table = json.loads(cp.stdout)
    owner0 = next(n["node_id"] for n in table["nodes"] if any(r["first"] == 0 for r in n["ranges"]))
    # UDP 5300 has a rule on VIP but none on VIP2
    cp = lab.run("client", [lab.python, "-m", "nlbfarm.udpprobe", "--vip", VIP2, "--port", str(UDP_PORT),
                            "--count", "20", "--size", "200", "--wait", "2"], timeout=30)
    probes = json.loads(cp.stdout)
    assert all(len(p["replies"]) == 1 for p in probes), probes
    assert {p["replies"][0].split()[0] for p in probes} == {owner0}
    w = which(lab, "198.18.0.3:4000", VIP2, UDP_PORT, "udp")
    assert w["node"] == owner0 and "bucket 0" in w["rule"]
