"""Traffic the farm must split exactly: weights and a standby node, ICMP echo answered
once, UDP datagrams larger than the MTU reaching one node whole.

One lab (prefix "ttraf"): n1 weight 1, n2 weight 3, n3 weight 0 (standby).
"""
import json
import subprocess

import pytest

from nlbfarm.analysis import failures, read_results, shares
from nlbfarm.lab import UDP_PORT, VIP, Lab

WEIGHTS = {"n1": 1, "n2": 3, "n3": 0}
NODES = list(WEIGHTS)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(prefix="ttraf", state_root=tmp_path_factory.mktemp("labstate"), weights=dict(WEIGHTS))
    with lab.running(nodes=3, wait=60, converge=["n1", "n2"]):
        yield lab


def test_weighted_split_and_standby_without_buckets(lab, tmp_path):
    snap = lab.wait_serving(["n1", "n2"], timeout=30)
    assert "n3" not in snap.counts(), "a weight-0 node takes no bucket while a weighted node lives"
    counts = snap.counts()
    assert counts == {"n1": lab.buckets // 4, "n2": 3 * lab.buckets // 4}
    out = tmp_path / "load.jsonl"
    subprocess.run(lab.loadclient_argv(count=2000, duration=60, out=out, workers=4), check=True, timeout=90)
    results = read_results(out)
    assert not failures(results)
    got = shares(results)
    total = sum(got.values())
    assert set(got) == {"n1", "n2"}
    for node, w in (("n1", 1), ("n2", 3)):
        want = w / 4
        assert abs(got[node] / total - want) <= 0.25 * want, f"{node}: {got[node] / total:.3f} vs {want}"


def test_icmp_echo_is_answered_by_exactly_one_node(lab):
    lab.wait_serving(["n1", "n2"], timeout=30)
    cp = lab.run("client", ["ping", "-n", "-c", "10", "-i", "0.2", "-W", "1", VIP], check=False, timeout=30)
    assert " 10 received" in cp.stdout and "DUP!" not in cp.stdout, cp.stdout


def test_udp_datagrams_larger_than_the_mtu_reach_one_node_whole(lab):
    lab.wait_serving(["n1", "n2"], timeout=30)
    cp = lab.run("client", [lab.python, "-m", "nlbfarm.udpprobe", "--vip", VIP, "--port", str(UDP_PORT),
                            "--count", "40", "--size", "4000", "--wait", "2"], timeout=30)
    probes = json.loads(cp.stdout)
    assert len(probes) == 40
    for p in probes:
        assert len(p["replies"]) == 1, f"source port {p['port']}: replies {p['replies']}"
        node, length = p["replies"][0].split()
        assert node in ("n1", "n2") and length == "4000", p
    assert {p["replies"][0].split()[0] for p in probes} == {"n1", "n2"}


def test_standby_takes_over_only_when_every_weighted_node_is_gone(lab, tmp_path):
    lab.wait_serving(["n1", "n2"], timeout=30)
    try:
        lab.kill_node("n1")
        snap = lab.wait_serving(["n2"], timeout=lab.timing.lease_ttl + 10)
        assert "n3" not in snap.counts(), "n2 still lives: the standby must stay idle"
        lab.kill_node("n2")
        snap = lab.wait_serving(["n3"], timeout=lab.timing.lease_ttl + 10)
        assert snap.counts() == {"n3": lab.buckets}
        out = tmp_path / "load.jsonl"
        subprocess.run(lab.loadclient_argv(count=200, duration=30, out=out, workers=2), check=True, timeout=60)
        results = read_results(out)
        assert not failures(results) and shares(results) == {"n3": 200}
    finally:
        for n in ("n1", "n2"):
            if not lab.alive(n):
                lab.start_node(n)
    snap = lab.wait_serving(["n1", "n2"], timeout=30)
    assert "n3" not in snap.counts(), "the standby gives its buckets back when weighted nodes return"


@pytest.fixture
def ucast_lab(tmp_path):
    # Port rules for what the lab app serves; anything else is unmatched and dropped (the default).
    lab = Lab(prefix="tucast", state_root=tmp_path / "lab", mac_mode="unicast-flood",
              rules=({"protocol": "tcp", "ports": 80}, {"protocol": "udp", "ports": UDP_PORT}))
    with lab.running(nodes=3, wait=60):
        yield lab


def test_unicast_flood_mode_and_unmatched_traffic_dropped(ucast_lab, tmp_path):
    """Clients learn a unicast cluster MAC that no node sends from; the switch floods it to all.
    Traffic no port rule matches is dropped by every node, silently, and counted."""
    lab = ucast_lab
    mac = "02:bf:c6:12:00:64"
    out = tmp_path / "load.jsonl"
    subprocess.run(lab.loadclient_argv(count=600, duration=60, out=out, workers=4), check=True, timeout=90)
    results = read_results(out)
    assert not failures(results) and set(shares(results)) == {"n1", "n2", "n3"}
    neigh = lab.run("client", ["ip", "neigh", "show", VIP]).stdout
    assert mac in neigh, neigh
    # The bridge never learned the MAC (nobody sends from it), so it keeps flooding.
    fdb = lab.run("lan", ["bridge", "fdb", "show", "br", "br0"]).stdout
    assert mac not in fdb, fdb
    for n in ("n1", "n2", "n3"):
        assert "PROMISC" in lab.run(n, ["ip", "link", "show", "eth0"]).stdout
        assert lab.run(n, ["ip", "maddr", "show", "dev", "eth0"]).stdout.count("03:bf") == 0
    ping = lab.run("client", ["ping", "-n", "-c", "5", "-i", "0.2", "-W", "1", VIP], check=False, timeout=30)
    assert " 5 received" in ping.stdout and "DUP!" not in ping.stdout, ping.stdout
    # TCP to a port without a rule: no node answers, not even with a reset.
    code = ("import socket\ns = socket.socket(); s.settimeout(2)\n"
            "try:\n    s.connect(('198.18.0.100', 8080)); print('connected')\n"
            "except socket.timeout:\n    print('timeout')\n"
            "except OSError as e:\n    print(type(e).__name__)\n")
    assert lab.run("client", [lab.python, "-c", code], timeout=30).stdout.strip() == "timeout"
    for n in ("n1", "n2", "n3"):
        v = json.loads(lab.farmctl(n, "node", "--json").stdout)
        dropped = next(int(c["packets"]) for c in v["counters"] if c["rule"] == "dropped_unmatched")
        assert dropped >= 1, f"{n} must count the SYNs it dropped as unmatched"
