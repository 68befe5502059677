"""The farm end to end: real namespaces, real etcd, real agents and apps, a real TCP client.

One lab (prefix "tfarm") serves the module; each test leaves it with all three
nodes running. ``Lab.up`` first removes whatever a crashed earlier run left.
"""
import json
import re
import signal
import subprocess
import time

import pytest

from nlbfarm.analysis import failures, match_accepts, read_accepts, read_results, shares
from nlbfarm.lab import CLIENT_ADDR, Lab
from nlbfarm.node import iplib

from labkit import agent_log, log_records, logged

NODES = ["n1", "n2", "n3"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(prefix="tfarm", state_root=tmp_path_factory.mktemp("labstate"))
    with lab.running(nodes=3, wait=60):
        yield lab


def run_load(lab, out, count, duration, workers=4, interval=0.0, timeout=3.0):
    return subprocess.Popen(lab.loadclient_argv(count, duration, out, workers=workers, interval=interval,
                                                timeout=timeout), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def accept_logs(lab):
    return {n: lab.accept_log(n) for n in NODES}


def assert_exactly_once(lab, results):
    """Every successful connection was accepted by exactly one node, the one that answered;
    no connection, failed or not, was accepted by two nodes."""
    accepts = read_accepts(accept_logs(lab), CLIENT_ADDR)
    matched = match_accepts(results, accepts)
    for r, nodes in zip(results, matched):
        same_port = [a for a in accepts if a.port == r["port"]]
        assert len(nodes) <= 1, f"connection {r} accepted by {nodes}; accepts on that port: {same_port}"
        if r["node"]:
            assert nodes == [r["node"]], \
                f"connection {r} answered by {r['node']} but accept logs say {nodes}; on that port: {same_port}"


def conntrack_entries(lab, node) -> int:
    cp = lab.run(node, ["conntrack", "-L", "-p", "tcp", "--orig-dst", "198.18.0.100"], check=False)
    return sum(1 for line in cp.stdout.splitlines() if "dport=80" in line)


def test_every_connection_answered_by_exactly_one_node_with_fair_shares(lab, tmp_path):
    # Another tool's table that uses conntrack, as on many real servers: it turns
    # connection tracking on in the node, and farmd must leave it alone.
    for n in NODES:
        lab.run(n, ["nft", "add table inet othertool; "
                           "add chain inet othertool in { type filter hook input priority 0; }; "
                           "add rule inet othertool in ct state new counter"])
    out = tmp_path / "steady.jsonl"
    p = run_load(lab, out, count=900, duration=60)
    assert p.wait(90) == 0
    results = read_results(out)
    assert len(results) == 900
    assert failures(results) == []
    assert_exactly_once(lab, results)
    fair = len(results) / 3
    got = shares(results)
    assert set(got) == set(NODES)
    for n in NODES:
        assert abs(got[n] - fair) <= 0.25 * fair, f"{n} served {got[n]}, fair is {fair:.0f}: {got}"
        # Foreign buckets are dropped before conntrack: a node tracks only its own share.
        tracked = conntrack_entries(lab, n)
        assert 0 < tracked <= got[n], f"{n} tracks {tracked} connections but served {got[n]}"
        assert "table inet othertool" in lab.run(n, ["nft", "list", "tables"]).stdout


def test_agent_kill_closes_fence_before_ttl_then_survivors_take_over_and_node_rejoins(lab, tmp_path):
    ttl = lab.timing.lease_ttl
    out = tmp_path / "kill.jsonl"
    load = run_load(lab, out, count=4000, duration=30, workers=6, interval=0.02)
    try:
        time.sleep(3)
        assert lab.fence_open("n2")
        t_kill = time.time()
        lab.kill("n2", "agent")           # kill -9 of the agent; the app keeps running
        t_fence = None
        while time.time() < t_kill + ttl + 1:
            if not lab.fence_open("n2"):
                t_fence = time.time()
                break
            time.sleep(0.05)
        assert t_fence is not None and t_fence - t_kill < ttl, \
            f"fence of n2 still open {time.time() - t_kill:.2f}s after the kill (lease TTL {ttl}s)"
        snap = lab.wait_converged(["n1", "n3"], timeout=ttl + 5)
        assert set(snap.counts()) == {"n1", "n3"} and sum(snap.counts().values()) == lab.buckets
        t_takeover = time.time()
        time.sleep(max(0.0, t_kill + ttl + 8 - time.time()))
        lab.start_agent("n2")
        snap = lab.wait_converged(NODES, timeout=20)
        t_rejoin = time.time()
        fair = lab.buckets / 3
        assert all(abs(c - fair) <= 1 for c in snap.counts().values()), snap.counts()
        assert load.wait(60) == 0
    finally:
        if load.poll() is None:
            load.kill()
    results = read_results(out)
    assert len(results) >= 600
    assert_exactly_once(lab, results)
    late = [r for r in failures(results, t0=t_kill + ttl + 2)]
    assert late == [], f"{len(late)} connections failed later than TTL + 2 s after the kill: {late[:3]}"
    assert t_takeover - t_kill < ttl + 5
    after = shares(results, t0=t_rejoin + 1)
    assert "n2" in after, f"n2 served nothing after rejoining: {after}"


def test_sigterm_hands_over_and_removes_everything(lab, tmp_path):
    out = tmp_path / "term.jsonl"
    load = run_load(lab, out, count=3000, duration=20, workers=4, interval=0.02)
    try:
        time.sleep(2)
        t_term = time.time()
        lab.kill("n3", "agent", sig=signal.SIGTERM, wait=lab.timing.leave_timeout + 5)
        assert not lab.alive("n3", "agent"), "farmd did not exit after SIGTERM"
        t_gone = time.time()
        assert t_gone - t_term < lab.timing.leave_timeout, "the leave waited for its timeout"
        snap = lab.snapshot()
        # Lease revoked: no waiting for the TTL.
        assert "n3" not in snap.members and "n3" not in snap.applied
        assert set(snap.counts()) == {"n1", "n2"}
        assert "198.18.0.100/32" not in iplib.addresses("eth0", lab.ns("n3"))
        tables = lab.run("n3", ["nft", "list", "tables"]).stdout
        assert "nlbfarm" not in tables
        assert logged(lab, "n3", "leaving", node="n3") and logged(lab, "n3", "stopped", node="n3")
        assert load.wait(60) == 0
    finally:
        if load.poll() is None:
            load.kill()
        lab.start_agent("n3")
        lab.wait_converged(NODES, timeout=20)
    results = read_results(out)
    assert_exactly_once(lab, results)
    assert failures(results, t0=t_gone) == []
    assert shares(results, t0=t_gone + 0.5).keys() <= {"n1", "n2"} | {"n3"}


def test_malformed_etcd_values_are_ignored_with_a_warning(lab, tmp_path):
    # Written as a person would with etcdctl: without a lease (members/ and
    # applied/ records must have one, so these are ignored as unbound), and
    # with a lease (decoded, refused, and logged with the reason).
    etcdctl = ["etcdctl", "--endpoints", "127.0.0.1:2379"]
    granted = lab.run("etcd", etcdctl + ["lease", "grant", "120"]).stdout
    lease = re.search(r"lease ([0-9a-f]+) granted", granted).group(1)
    garbage = {"/nlbfarm/lab/members/zz": ("{not json", None), "/nlbfarm/lab/applied/n1x": ("[1,2]", None),
               "/nlbfarm/lab/members/yy": ('{"id": "yy", "weight": "heavy"}', None),
               "/nlbfarm/lab/members/zl": ("{not json", lease),
               "/nlbfarm/lab/members/yl": ('{"id": "yl", "weight": "heavy"}', lease)}
    try:
        for k, (v, with_lease) in garbage.items():
            lab.run("etcd", etcdctl + ["put", k, v] + ([f"--lease={with_lease}"] if with_lease else []))
        out = tmp_path / "garbage.jsonl"
        assert run_load(lab, out, count=300, duration=30).wait(60) == 0
        results = read_results(out)
        assert failures(results) == [] and set(shares(results)) == set(NODES)
        assert all(lab.alive(n) for n in NODES)
        log = agent_log(lab, "n1")
        assert "ignoring key=/nlbfarm/lab/members/zz reason=not bound to a lease" in log
        assert "ignoring key=/nlbfarm/lab/applied/n1x reason=not bound to a lease" in log
        assert "ignoring malformed value key=/nlbfarm/lab/members/zl reason=not valid JSON" in log
        assert "key=/nlbfarm/lab/members/yl reason=weight must be an integer" in log
    finally:
        for k in garbage:
            lab.run("etcd", etcdctl + ["del", k], check=False)
        lab.run("etcd", etcdctl + ["lease", "revoke", lease], check=False)
    lab.wait_converged(NODES, timeout=10)


def test_ruleset_flushed_by_someone_else_is_rebuilt(lab, tmp_path):
    # e.g. `systemctl reload nftables` with Debian's default "flush ruleset"
    lab.run("n1", ["nft", "flush", "ruleset"])
    deadline = time.time() + 3
    while time.time() < deadline and not lab.fence_open("n1"):
        time.sleep(0.05)
    assert lab.fence_open("n1"), "farmd did not rebuild its tables after a flush"
    assert "table arp nlbfarm" in lab.run("n1", ["nft", "list", "tables"]).stdout
    assert "rebuilding the ruleset" in agent_log(lab, "n1")
    out = tmp_path / "after-flush.jsonl"
    assert run_load(lab, out, count=300, duration=30).wait(60) == 0
    results = read_results(out)
    assert failures(results) == [] and set(shares(results)) == set(NODES)


def test_which_predicts_the_serving_node_for_1000_connections(lab, tmp_path):
    out = tmp_path / "which.jsonl"
    assert run_load(lab, out, count=1000, duration=60).wait(90) == 0
    results = [r for r in read_results(out) if r["node"]]
    assert len(results) == 1000
    clients = tmp_path / "clients.txt"
    clients.write_text("".join(f"{CLIENT_ADDR}:{r['port']}\n" for r in results))
    farmctl = lab.farmctl_bin
    cp = lab.run("n1", [farmctl, "which", "--from-file", str(clients), "--json"], timeout=120)
    predicted = json.loads(cp.stdout)
    wrong = [(r["port"], r["node"], p["node"]) for r, p in zip(results, predicted) if r["node"] != p["node"]]
    assert wrong == [], f"{len(wrong)} of 1000 connections served elsewhere than predicted: {wrong[:5]}"
    # Without a port the answer is the spread over sampled source ports.
    cp = lab.run("n1", [farmctl, "which", CLIENT_ADDR, "--json"], timeout=60)
    spread = json.loads(cp.stdout)
    assert spread["port"] is None and set(spread["nodes"]) == set(NODES)
    assert sum(spread["nodes"].values()) == spread["sampled_ports"] == 64


def test_every_line_the_lab_wrote_is_logfmt(lab):
    """Last in this module: every line the agents (and the supervisor) wrote through all the
    tests above (kills, a graceful stop, hostile records, a flushed ruleset) is logfmt that a
    strict parser reads, with the standard keys, an ISO time and a known level; the project's
    own lines carry an event."""
    from datetime import datetime
    total = 0
    for path in sorted(lab.dir.glob("*.agent.log")):
        records = log_records(path)
        assert len(records) > 5, path
        for r in records:
            datetime.strptime(r["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
            assert r["level"] in ("debug", "info", "warning", "error", "critical"), r
            if r["logger"].startswith("nlbfarm"):
                assert r.get("event"), r
        total += len(records)
    assert total > 50
