"""Safety regressions on the real kernel and etcd: each test pins one defect that let a
bucket be served by two nodes, let a hostile record stall or crash the farm, or kept a
node from withdrawing or coming back.

Each test brings up its own lab (prefix "tsafe") under a bounded load of new TCP
connections from the client namespace and checks, besides what it is about, that no
connection was accepted by two nodes: from the nodes' accept logs against the client's
record (as the other fault tests do), and where a double accept is the danger also at
the packet level, from a capture in the client namespace (``nlbfarm.synack``): no SYN
may get SYN-ACKs from two nodes' MACs.
"""
from __future__ import annotations

import base64
import json
import os
import re
import selectors
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

import test_faults as faults
from labkit import agent_log, fresh_labs
from test_farm_e2e import assert_exactly_once
from test_faults import LIFETIME, SETTLE_S, Load, _crash_and_rejoin, check_exactly_once, split_holds, timeline

from nlbfarm.analysis import failures, match_syns, read_results, shares
from nlbfarm.lab import (APP_PORT, CLUSTER_NAME, ETCD_PREFIX, MGMT_ETCD_ADDR, PEER_PORT, VIP, Lab, LabTiming,
                         node_addr)
from nlbfarm.synack import answers_per_syn, read_records

pytestmark = [pytest.mark.lab, pytest.mark.faults]

# The simulation's fault classes (nlbfarm/sim/faults.py) each test tries on the
# real kernel and etcd; `make safety` collects them for the README's table.
TRIAL_CLASSES = {
    "test_regression_wildcard_peer_listen_cut_off_node_never_double_serves": ["wildcard", "etcd_cut"],
    "test_regression_poison_records_neither_crash_nor_stall_the_farm": ["poison"],
    "test_regression_orphan_applied_record_never_guards_buckets_for_good": ["poison", "kill"],
    "test_regression_lan_link_down_with_etcd_on_second_network_withdraws_and_rejoins": ["lan_down"],
    "test_regression_sigstopped_agent_past_ttl_never_double_serves_and_rejoins": ["pause"],
    "test_regression_restart_with_live_old_lease_is_refused_then_joins": ["kill"],
    "test_regression_revoked_lease_closes_fence_and_peers_wait_before_taking_over": ["revoke"],
}


@pytest.fixture(autouse=True)
def record_trial(request):
    """With $NLBFARM_SAFETY_REPORT set: count this test as a lab trial of its fault classes.

    A test passes only when no bucket was accepted twice (its exactly-once and
    packet checks); a failed trial is counted as failed, whatever failed in it.
    """
    yield
    path = os.environ.get("NLBFARM_SAFETY_REPORT")
    rep = getattr(request.node, "rep_call", None)
    if not path or rep is None:
        return
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        report = {}
    for kind in TRIAL_CLASSES.get(request.node.name, []):
        row = report.setdefault(kind, {"trials": 0, "failed": 0})
        row["trials"] += 1
        row["failed"] += 0 if rep.passed else 1
    with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)

NODES = ["n1", "n2", "n3"]
PREFIX = f"{ETCD_PREFIX}/{CLUSTER_NAME}"
RSS_LIMIT_KB = 300 * 1024
TS_RE = re.compile(r"^ts=(\S+)Z ")


@pytest.fixture
def make_lab(tmp_path, monkeypatch):
    # These runs are not rows of the README's "Faults survived" table.
    monkeypatch.setattr(faults, "record", lambda *a, **k: None)
    with fresh_labs("tsafe", tmp_path / "lab") as make:
        yield make


# ---- packet capture in the client namespace ---------------------------------------

class SynAckCapture:
    """``nlbfarm.synack`` in the client namespace, bounded in time and packets."""

    def __init__(self, lab: Lab, out: Path, duration: float, max_packets: int = 400_000):
        self.out = out
        self.proc = subprocess.Popen(
            lab.client_cmd([lab.python, "-m", "nlbfarm.synack", "--iface", "eth0", "--duration", str(duration),
                            "--max-packets", str(max_packets), "--out", str(out)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            line = self.proc.stdout.readline() if sel.select(timeout=15) else ""
        finally:
            sel.close()
        if line.strip() != "ready":
            self.stop()
            raise AssertionError(f"the capture did not start: {line!r} {self.proc.stderr.read()[-500:]}")

    def finish(self) -> dict:
        """Stop it; its summary: segments written and the kernel's drop count."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=15)
        finally:
            self.stop()
        assert self.proc.returncode == 0, f"capture rc={self.proc.returncode}: {err[-500:]}"
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def check_one_synack_per_syn(lab: Lab, cap: SynAckCapture, summary: dict, news: list[dict]) -> dict:
    """No SYN answered by two nodes; the capture saw every attempt; each answered connection's
    SYN-ACKs came from the node that served it. Returns the figures."""
    macs = {lab.node_mac(n): n for n in NODES}
    records = read_records(cap.out)
    assert summary["drops"] == 0, f"the capture lost {summary['drops']} packets: its record is not whole"
    assert summary["written"] == len(records)
    syns, answers = answers_per_syn(records, VIP, APP_PORT)
    strangers = sorted({m for v in answers.values() for m in v if m not in macs})
    assert strangers == [], f"SYN-ACKs from MACs of no node: {strangers} (nodes: {macs})"
    doubles = {k: {macs[m]: [round(t, 3) for t in ts] for m, ts in v.items()}
               for k, v in answers.items() if len(v) > 1}
    assert doubles == {}, (f"{len(doubles)} SYNs got SYN-ACKs from two nodes (client, port, ISN) -> "
                           f"node: times: {dict(list(doubles.items())[:5])}\n" + timeline(lab, NODES))
    # Every attempt of the load client sent a SYN we saw, and each answered one was
    # SYN-ACKed by exactly the node that served it. A SYN (a new ISN) belongs to
    # the attempt that held its port when it was first sent.
    own = match_syns(news, syns)
    unseen, wrong = [], []
    for i, r in enumerate(news):
        if not r["port"]:
            continue
        if i not in own:
            unseen.append(r)
            continue
        if r["node"]:
            got = {macs[m] for key in own[i] for m in answers.get(key, {})}
            if got != {r["node"]}:
                wrong.append((r, sorted(got)))
    assert unseen == [], f"{len(unseen)} of {len(news)} connection attempts have no captured SYN: {unseen[:3]}"
    assert wrong == [], f"{len(wrong)} connections SYN-ACKed by other nodes than the one that served them: " \
        f"{wrong[:3]}"
    return {"syns": len(syns), "synacks": sum(len(ts) for v in answers.values() for ts in v.values()),
            "answered_syns": len(answers), "double_synacks": 0}


# ---- small helpers ---------------------------------------------------------------------

def crash_and_rejoin(lab: Lab, tmp_path: Path, victim: str, crash, rejoin, fault: str) -> AssertionError | None:
    """test_faults' ``_crash_and_rejoin`` (load, fault, takeover, rejoin, and the connection-level
    checks every fault test makes). An AssertionError of those checks is returned rather than
    raised, so that the caller's safety checks run first; the caller raises it afterwards."""
    try:
        _crash_and_rejoin(lab, tmp_path, victim, crash, rejoin, fault)
    except AssertionError as exc:
        return exc
    return None




def log_times(log: str, needle: str) -> list[float]:
    """Wall-clock times (epoch seconds) of the log lines containing ``needle``."""
    out = []
    for line in log.splitlines():
        m = TS_RE.match(line)
        if needle in line and m:
            out.append(datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(
                tzinfo=timezone.utc).timestamp())
    return out


def wait_for(what: str, pred, timeout: float, lab: Lab | None = None, period: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}"
                         + ("\n" + timeline(lab, NODES) if lab else ""))


def lease_alive(lab: Lab, lease: int) -> bool:
    cp = lab.etcdctl("lease", "timetolive", f"{lease:x}", timeout=10)
    return "already expired" not in cp.stdout


def check_rss(lab: Lab) -> dict:
    rss = {n: lab.rss_kb(lab.pid(n, "agent")) for n in NODES}
    assert all(v is not None for v in rss.values()), f"an agent died: {rss}"
    assert all(v < RSS_LIMIT_KB for v in rss.values()), f"agent RSS (kB) above {RSS_LIMIT_KB}: {rss}"
    return rss


def farmd_check(lab: Lab, path: Path, status: dict) -> subprocess.CompletedProcess:
    cfg = lab.node_config("n1")
    cfg["status"] = {k: v for k, v in {**cfg["status"], **status}.items() if v is not None}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    farmd = str(Path(lab.python).with_name("farmd"))
    return subprocess.run([farmd, "--config", str(path), "--check"], capture_output=True, text=True, timeout=60)


# ---- 1. wildcard peer addresses --------------------------------------------------------

def test_regression_wildcard_peer_listen_cut_off_node_never_double_serves(make_lab, tmp_path):
    """A wildcard peer_listen used to be what peers dialed: a node cut off from etcd asked
    "do you reach etcd?", reached itself, heard its own "no" and kept serving after its
    lease expired, while the survivors took its buckets. With peer_advertise the question
    reaches the peer; without it the configuration is refused."""
    # Refused by config validation: wildcard or loopback without peer_advertise.
    for bad in ("0.0.0.0:7401", "127.0.0.1:7401", "[::]:7401"):
        lab0 = Lab(prefix="tsafe", state_root=tmp_path / "cfg")
        lab0.dir.mkdir(parents=True, exist_ok=True)
        cp = farmd_check(lab0, tmp_path / "bad.yaml", {"peer_listen": bad, "peer_advertise": None,
                                                       "token_file": None})
        assert cp.returncode == 2, f"peer_listen {bad} without peer_advertise: rc={cp.returncode} {cp.stderr}"
        assert "peer_advertise" in cp.stderr and "peer_listen" in cp.stderr, cp.stderr
    lab = make_lab(3, peer_wildcard=True)
    snap = lab.snapshot()
    for i, n in enumerate(NODES, 1):
        st = yaml.safe_load(lab.config_path(n).read_text())["status"]
        assert st["peer_listen"] == f"0.0.0.0:{PEER_PORT}", st
        assert st["peer_advertise"] == f"{node_addr(i)}:{PEER_PORT}", st
        assert snap.members[n].peer == f"{node_addr(i)}:{PEER_PORT}", snap.members[n]
        cp = subprocess.run([str(Path(lab.python).with_name("farmd")), "--config", str(lab.config_path(n)),
                             "--check"], capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
    seen = {}

    def cut():
        t = time.time()
        lab.cut_etcd("n2")
        while time.time() < t + lab.timing.lease_ttl + 5 and lab.fence_open("n2"):
            time.sleep(0.02)
        seen["fence_closed_s"] = time.time() - t
        seen["n2_owner_when_fenced"] = lab.snapshot().counts().get("n2", 0)

    cap = SynAckCapture(lab, tmp_path / "syn.jsonl", duration=150)
    try:
        problem = crash_and_rejoin(lab, tmp_path, "n2", cut, lambda: lab.restore_etcd("n2"),
                                   "wildcard peer_listen: one node cut off from etcd")
        summary = cap.finish()
    finally:
        cap.stop()
    # n2 closed its fence while the table still gave it its buckets: nobody else served them yet.
    assert seen["n2_owner_when_fenced"] > 0, seen
    assert seen["fence_closed_s"] < lab.timing.lease_ttl, seen
    log = agent_log(lab, "n2")
    assert ("unreachable from this node (peer n1 reaches etcd)" in log
            or "unreachable from this node (peer n3 reaches etcd)" in log), timeline(lab, NODES)
    assert "answered as this node" not in log
    news = read_results(tmp_path / "new.jsonl")
    figures = check_one_synack_per_syn(lab, cap, summary, news)
    assert_exactly_once(lab, news)
    print(f"wildcard peers, n2 cut off from etcd: {len(news)} new connections, "
          f"{len(failures(news))} failed, fence closed after {seen['fence_closed_s']:.2f}s, {figures}")
    if problem is not None:
        raise problem


# ---- 2. poison records ------------------------------------------------------------------

POISON_SCRIPT = """
import base64, json, sys
from nlbfarm.coordinator.etcd import etcd3
c = etcd3.client("127.0.0.1", 2379, timeout=5)
leases = {}
for key, value, ttl in json.load(sys.stdin):
    lease = None
    if ttl:
        lease = leases.get(ttl) or c.lease(ttl)
        leases[ttl] = lease
    c.put(base64.b64decode(key), base64.b64decode(value), lease=lease)
print(json.dumps({str(t): l.id for t, l in leases.items()}))
"""


def put_raw(lab: Lab, records: list[tuple[bytes, bytes, int]]) -> dict:
    """Write raw (key, value, lease ttl or 0) records with python-etcd3 inside the etcd namespace."""
    payload = json.dumps([[base64.b64encode(k).decode(), base64.b64encode(v).decode(), ttl]
                          for k, v, ttl in records])
    cp = lab.run("etcd", [lab.python, "-c", POISON_SCRIPT], input=payload, timeout=30)
    return json.loads(cp.stdout)


def member_json(node_id: str, **extra) -> bytes:
    return json.dumps({"id": node_id, "weight": 1000, "state": "active", "addresses": [], "version": "0",
                       "instance": "feedfacefeedface", "peer": "", "reason": "", "rules": "", **extra}).encode()


def test_regression_poison_records_neither_crash_nor_stall_the_farm(make_lab, tmp_path):
    """Hostile records under (and next to) the prefix used to crash the agents' decoding,
    freeze their watch (a key that is not UTF-8), expand a range list into a huge set,
    or be taken for members of this cluster (a sibling prefix without its slash)."""
    lab = make_lab(3)
    rss_before = check_rss(lab)
    P = PREFIX.encode()
    huge = json.dumps({"generation": 1, "accepting": 0, "draining": [[0, 1_000_000_000_000]]}).encode()
    poison = [
        (P + b"/applied/px1", huge, 0),                                   # no lease
        (P + b"/applied/px2", huge, 600),                                 # a long lease, range outside B
        (P + b"/applied/pmax", json.dumps({"generation": 2 ** 53 - 1, "accepting": 0,
                                           "draining": []}).encode(), 600),  # the largest generation
        (P + b"/\xff\xfe", b"not utf-8 key", 0),
        (P + b"/members/\xff\xfe", member_json("x"), 600),
        (b"/nlbfarm/lab2/members/n9", member_json("n9"), 600),            # sibling prefixes
        (b"/nlbfarm/lab2/table", b"{not a table", 0),
        (b"/nlbfarm/labx", b"\x00\x01garbage", 0),
        (b"/nlbfarm/labx/members/n8", member_json("n8"), 600),
    ]
    t_poison = time.time()
    leases = put_raw(lab, poison)
    assert set(leases) == {"600"}
    # Everything the agents learn, they learn from the watch at once; give them a moment.
    time.sleep(1.0)

    out = tmp_path / "after-poison.jsonl"
    load = subprocess.Popen(lab.loadclient_argv(count=1500, duration=20, out=out, workers=4, interval=0.02,
                                                timeout=3.0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert load.wait(60) == 0
    finally:
        if load.poll() is None:
            load.kill()
    news = read_results(out)
    assert len(news) >= 300, len(news)
    assert failures(news) == [], failures(news)[:5]
    assert set(shares(news)) == set(NODES), shares(news)
    assert_exactly_once(lab, news)
    assert all(lab.alive(n) for n in NODES), "an agent died on a poison record"
    rss_after = check_rss(lab)

    for n in NODES:
        log = agent_log(lab, n)
        assert "Traceback" not in log and "cycle crashed" not in log and "thread failed" not in log, log[-3000:]
        assert log.count(f"ignoring key={PREFIX}/applied/px1 reason=not bound to a lease") == 1, n
        assert log.count(f"ignoring malformed value key={PREFIX}/applied/px2 reason=draining must be") == 1, n
        assert log.count(f"etcd key is not UTF-8, skipped key={(P + b'/' + bytes([0xff, 0xfe]))!r}") == 1, n
        assert log.count(
            f"etcd key is not UTF-8, skipped key={(P + b'/members/' + bytes([0xff, 0xfe]))!r}") == 1, n
        for sibling in ("/nlbfarm/lab2", "/nlbfarm/labx"):
            assert sibling not in log, f"{n} read a key of {sibling}"
        cp = lab.farmctl(n, "status", "--json")
        assert cp.returncode in (0, 1), cp.stderr
        ids = {m["id"] for m in json.loads(cp.stdout)["members"]}
        assert ids == set(NODES), f"{n} sees members {ids}"
    snap = lab.snapshot()
    assert set(snap.members) == set(NODES) and set(snap.counts()) == set(NODES), snap.counts()
    assert snap.table.generation < 2 ** 53 - 1

    # A drain completes (the orphaned and unreadable records no longer count as live
    # nodes, so rule R does not wait for them) and undrain brings the node back, under load.
    out2 = tmp_path / "drain.jsonl"
    load = subprocess.Popen(lab.loadclient_argv(count=20000, duration=40, out=out2, workers=4, interval=0.02,
                                                timeout=3.0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        t = time.time()
        cp = lab.farmctl("n1", "drain", "n2", "--wait", "--wait-timeout", "30")
        assert cp.returncode == 0, cp.stdout + cp.stderr + timeline(lab, NODES)
        assert "n2 is drained" in cp.stdout, cp.stdout
        drained_s = time.time() - t
        snap = lab.snapshot()
        assert "n2" not in snap.counts() and set(snap.counts()) == {"n1", "n3"}, snap.counts()
        cp = lab.farmctl("n1", "undrain", "n2")
        assert cp.returncode == 0, cp.stderr
        lab.wait_converged(NODES, timeout=30)
        t_back = time.time()
        assert load.poll() is None, "the load ended before the undrain"
        assert load.wait(60) == 0
    finally:
        if load.poll() is None:
            load.kill()
    news = read_results(out2)
    assert failures(news) == [], failures(news)[:5]
    assert_exactly_once(lab, news)
    assert "n2" in shares(news, t0=t_back + 0.5), shares(news, t0=t_back + 0.5)
    assert all(lab.alive(n) for n in NODES)
    rss_end = check_rss(lab)
    print(f"poison records written at {t_poison:.1f}: RSS kB before {rss_before}, after {rss_after}, "
          f"at the end {rss_end}; drain took {drained_s:.1f}s; {len(news)} connections during drain")


def guard_rules(lab: Lab, node: str) -> list[str]:
    """The node's nft rules that drop unknown mid-stream TCP in guarded buckets."""
    rs = lab.run(node, ["nft", "list", "table", "inet", "nlbfarm"]).stdout
    return [ln.strip() for ln in rs.splitlines() if 'counter name "dropped_guarded' in ln]


def guarded_drops(lab: Lab, node: str) -> int:
    """Packets the node dropped as unknown mid-stream TCP in guarded buckets."""
    cp = lab.run(node, ["nft", "-j", "list", "counters", "table", "inet", "nlbfarm"])
    return sum(o["counter"].get("packets", 0) for o in json.loads(cp.stdout)["nftables"]
               if "counter" in o and o["counter"]["name"].startswith("dropped_guarded"))


def test_regression_orphan_applied_record_never_guards_buckets_for_good(make_lab, tmp_path):
    """A well-formed, lease-bound ``applied/<x>`` of a node that has no member record (an
    orphan) stops counting as live after the orphan grace, but its draining list still
    made every node guard those buckets for as long as its lease lived: the clients of a
    node that died then were never reset (their packets were dropped as "the drainer's")
    and hung until their own timeout."""
    lab = make_lab(3)
    ttl = lab.timing.lease_ttl
    record = json.dumps({"generation": 1, "accepting": 0, "draining": [[0, lab.buckets - 1]]}).encode()
    put_raw(lab, [(PREFIX.encode() + b"/applied/pguard", record, 600)])
    orphan_grace = ttl + lab.timing.keepalive_interval + 0.2
    time.sleep(orphan_grace + 1.5)
    guards = {n: guard_rules(lab, n) for n in NODES}
    out = tmp_path / "hold.jsonl"
    hold = subprocess.Popen(lab.holdclient_argv(conns=60, duration=30, out=out, lifetime=20, timeout=15),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        t_kill = time.time()
        lab.kill("n3", "agent")              # its app lives on; its kernel fence expires
        lab.wait_converged(["n1", "n2"], timeout=ttl + 10)
        assert hold.wait(80) == 0
    finally:
        if hold.poll() is None:
            hold.kill()
    holds = read_results(out)
    on_n3 = [r for r in holds if r["node"] == "n3" and r["t0"] < t_kill]
    assert on_n3, "no long-lived connection on n3 before the kill"
    hung = [r for r in on_n3 if not r["ok"] and "Timeout" in (r["error"] or "")]
    late = [r for r in on_n3 if not r["ok"] and r["t1"] - t_kill >= ttl + 5]
    dropped = {n: guarded_drops(lab, n) for n in ("n1", "n2")}
    assert hung == [] and late == [], (
        f"{len(hung)} of {len(on_n3)} connections of the killed n3 hung and {len(late)} learned it later than "
        f"TTL + 5 s, instead of being reset by the new owners; guard rules {orphan_grace + 1.5:.1f}s after the "
        f"orphan record was written: {guards}; packets dropped as guarded: {dropped}")
    assert guards == {n: [] for n in NODES}, f"nodes guard buckets for an orphan record: {guards}"
    print(f"orphan applied record with draining 0..{lab.buckets - 1}: guards {guards}; {len(on_n3)} connections "
          f"on n3 reset after the kill")


# ---- 3. LAN link down while etcd stays reachable ------------------------------------------

def test_regression_lan_link_down_with_etcd_on_second_network_withdraws_and_rejoins(make_lab, tmp_path):
    """A node whose LAN link went down but which still reached etcd over a management
    network kept its buckets in the table (its lease lived): nobody served them until
    the link came back. It must announce `failed` and hand its buckets over."""
    lab = make_lab(3, mgmt=True)
    for n in NODES:
        cfg = yaml.safe_load(lab.config_path(n).read_text())
        assert cfg["etcd"]["endpoints"] == [f"{MGMT_ETCD_ADDR}:2379"], cfg["etcd"]
    # The management network really carries etcd: n2 keeps its lease with the LAN cut
    # only if it does (checked below through its unchanged registration).
    lease_before = lab.member_lease("n2")
    ttl = lab.timing.lease_ttl
    load = Load(lab, tmp_path, duration=45)
    seen = {}
    try:
        load.wait_until(load.t0 + LIFETIME + 2)
        t_fault = time.time()
        lab.run("n2", ["ip", "link", "set", "eth0", "down"])

        def failed():
            m = lab.snapshot().members.get("n2")
            return m is not None and m.state == "failed" and m

        m = wait_for("n2 announced failed", failed, timeout=5, lab=lab)
        seen["failed_after_s"] = time.time() - t_fault
        assert "link eth0" in m.reason and "down" in m.reason, m.reason
        try:
            snap = lab.wait_converged(["n1", "n3"], timeout=10)
        except Exception as exc:
            snap = lab.snapshot()
            raise AssertionError(
                f"the survivors did not take n2's buckets within 10 s of its announcement ({exc}); "
                f"table: {snap.counts()}, applied: "
                f"{ {n: (a.generation, a.accepting) for n, a in snap.applied.items()} }, "
                f"table generation {snap.table.generation}; n2's last cycles:\n"
                + "\n".join([ln for ln in agent_log(lab, "n2").splitlines() if "cycle" in ln][-8:])
                + "\n" + timeline(lab, ["n1", "n3"])) from None
        seen["takeover_s"] = time.time() - t_fault
        assert "n2" in snap.members, "n2 kept its lease through the management network"
        assert set(snap.counts()) == {"n1", "n3"} and sum(snap.counts().values()) == lab.buckets
        assert not lab.fence_open("n2")
        load.wait_until(t_fault + ttl + 4)
        t_restore = time.time()
        lab.run("n2", ["ip", "link", "set", "eth0", "up"])
        snap = lab.wait_converged(NODES, timeout=30)
        seen["rejoin_s"] = time.time() - t_restore
        assert snap.members["n2"].state == "active"
        t_back = time.time()
        news, holds = load.finish(settle=SETTLE_S)
    finally:
        load.stop()
    assert lab.member_lease("n2") == lease_before, "n2 registered again: etcd was not reachable over mgmt"
    broken, never = split_holds(holds)
    check_exactly_once(lab, news, NODES)
    late = failures(news + never, t0=t_fault + ttl + 2)
    assert late == [], (f"{len(late)} new connections failed later than TTL + 2 s after the link went down: "
                        f"{[(round(r['t'] - t_fault, 2), r.get('error')) for r in late][:5]}\n"
                        + timeline(lab, NODES))
    bystanders = [r for r in broken if r["node"] != "n2"]
    assert bystanders == [], bystanders[:5]
    assert "n2" in shares(news, t0=t_back + 0.5), shares(news, t0=t_back + 0.5)
    print(f"LAN link of n2 down, etcd over mgmt: {seen}; {len(failures(news))} of {len(news)} new connections "
          f"failed, {len(broken)} long-lived broken")


# ---- 4. SIGSTOP longer than the TTL ------------------------------------------------------

def test_regression_sigstopped_agent_past_ttl_never_double_serves_and_rejoins(make_lab, tmp_path):
    """An agent frozen (SIGSTOP) past its lease TTL must not serve when it wakes: its fence
    expires by itself in the kernel, the survivors take over after the TTL, and on SIGCONT
    it finds its lease lost, re-registers and rejoins."""
    lab = make_lab(3)
    old_lease = lab.member_lease("n2")
    ft = lab.timing.fence_timeout
    seen = {}

    def freeze():
        t = time.time()
        lab.kill("n2", "agent", sig=signal.SIGSTOP, wait=0)
        while time.time() < t + ft + 3 and lab.fence_open("n2"):
            time.sleep(0.02)
        seen["fence_closed_s"] = time.time() - t
        seen["t_stop"] = t

    def resume():
        seen["t_cont"] = time.time()
        lab.kill("n2", "agent", sig=signal.SIGCONT, wait=0)

    cap = SynAckCapture(lab, tmp_path / "syn.jsonl", duration=150)
    try:
        problem = crash_and_rejoin(lab, tmp_path, "n2", freeze, resume, "SIGSTOP of one agent past the lease TTL")
        summary = cap.finish()
    finally:
        cap.stop()
    stopped_for = seen["t_cont"] - seen["t_stop"]
    assert stopped_for > lab.timing.lease_ttl + 1, stopped_for
    # The kernel closed the fence by itself: the agent could do nothing.
    assert seen["fence_closed_s"] < ft + 1.0, seen
    assert lab.alive("n2"), "the resumed agent exited"
    new_lease = lab.member_lease("n2")
    assert new_lease not in (None, old_lease), (old_lease, new_lease)
    log = agent_log(lab, "n2")
    assert "lease expired" in log or "lease gone" in log, log[-2000:]
    regs = log_times(log, "registered node=n2")
    assert len(regs) >= 2 and regs[-1] > seen["t_cont"] - 0.5, (regs, seen)
    news = read_results(tmp_path / "new.jsonl")
    figures = check_one_synack_per_syn(lab, cap, summary, news)
    assert_exactly_once(lab, news)
    print(f"SIGSTOP {stopped_for:.1f}s: fence closed after {seen['fence_closed_s']:.2f}s, re-registered "
          f"{regs[-1] - seen['t_cont']:.2f}s after SIGCONT; {len(failures(news))} of {len(news)} failed; {figures}")
    if problem is not None:
        raise problem


# ---- 5. restart with the same id while the old lease lives ---------------------------------

def test_regression_restart_with_live_old_lease_is_refused_then_joins(make_lab, tmp_path):
    """A farmd restarted at once after kill -9 used to register beside its own live lease
    (or be confused with it). Without a hand-off state file to adopt it (node.state_dir
    "" here; tests/lab/test_restart.py has the adopting restart) it must be refused
    ("already registered", exit 3) while the old registration lives, and join once it
    is gone: retired by a peer's certificate of death (fence_timeout after the kill) or
    expired. A 2 s fence here gives the new process time to start inside that window on
    a loaded machine. No connection is accepted twice meanwhile."""
    lab = make_lab(3, supervise=True, supervise_delay=0.2, hitless=False,
                   timing=LabTiming(lease_ttl=4, fence_timeout=2.0))
    ttl = lab.timing.lease_ttl
    old_lease = lab.member_lease("n2")
    before = lab.pid("n2", "agent")
    cap = SynAckCapture(lab, tmp_path / "syn.jsonl", duration=120)
    load = Load(lab, tmp_path, duration=35)
    seen = {}
    try:
        load.wait_until(load.t0 + LIFETIME + 2)
        t_kill = time.time()
        lab.kill("n2", "agent")          # the supervisor starts a new one 0.2 s later
        deadline = time.time() + ttl + 15
        last_alive = t_kill
        while time.time() < deadline:
            now = time.time()
            if "gone" not in seen:
                if lab.member_lease("n2") == old_lease and lease_alive(lab, old_lease):
                    last_alive = now
                else:
                    seen["gone"] = now
            lease = lab.member_lease("n2")
            if lease not in (None, old_lease):
                seen["new_lease"], seen["new_seen"] = lease, now
                break
            time.sleep(0.05)
        assert "new_lease" in seen, f"n2 did not register again within {ttl + 15}s: {seen}\n" + timeline(lab, NODES)
        seen["last_alive"] = last_alive
        lab.wait_converged(NODES, timeout=30)
        t_back = time.time()
        news, holds = load.finish(settle=SETTLE_S)
        summary = cap.finish()
    finally:
        load.stop()
        cap.stop()
    assert lab.pid("n2", "agent") != before
    log = agent_log(lab, "n2")
    refused = log_times(log, "already registered")
    assert refused, "the new agent was never refused while the old lease lived:\n" + log[-3000:]
    assert re.search(r"child exited cmd=\S+ rc=3 ", log), log[-3000:]  # the supervisor saw it refuse
    # Refused while the old registration lived, registered only once it was gone.
    assert min(refused) < seen["last_alive"], (refused, seen)
    regs = [t for t in log_times(log, "registered node=n2") if t > t_kill]
    assert regs and min(regs) > seen["last_alive"] - 0.01, (regs, seen)
    assert f"lease={seen['new_lease']:x}" in log
    broken, never = split_holds(holds)
    check_exactly_once(lab, news, NODES)
    assert_exactly_once(lab, news)
    late = failures(news + never, t0=t_kill + ttl + 4)
    assert late == [], [(round(r["t"] - t_kill, 2), r.get("error")) for r in late][:5]
    assert [r for r in broken if r["node"] != "n2"] == []
    figures = check_one_synack_per_syn(lab, cap, summary, news)
    assert "n2" in shares(news, t0=t_back + 0.5)
    print(f"restart at once: {len(refused)} refusals, old lease gone {seen.get('gone', 0) - t_kill:.2f}s and new "
          f"registration {min(regs) - t_kill:.2f}s after the kill; {len(failures(news))} of {len(news)} failed; "
          f"{figures}")


# ---- 6. a lease revoked by an operator ------------------------------------------------------

def test_regression_revoked_lease_closes_fence_and_peers_wait_before_taking_over(make_lab, tmp_path):
    """`etcdctl lease revoke` of a live node's lease: the node kept serving until its next
    keepalive noticed, while peers took its buckets the moment its keys vanished. It must
    close its fence at once, peers must hold off, and it must re-register and rejoin."""
    lab = make_lab(3)
    ttl = lab.timing.lease_ttl
    cp = lab.farmctl("n2", "node", "--json")
    assert cp.returncode in (0, 1), cp.stderr
    old_lease = lab.member_lease("n2")
    assert json.loads(cp.stdout)["lease_id"] == f"{old_lease:x}"
    cap = SynAckCapture(lab, tmp_path / "syn.jsonl", duration=120)
    load = Load(lab, tmp_path, duration=35)
    seen = {}
    try:
        load.wait_until(load.t0 + LIFETIME + 2)
        t_revoke = time.time()
        lab.etcdctl("lease", "revoke", f"{old_lease:x}")

        def registered_again():
            lease = lab.member_lease("n2")
            return lease not in (None, old_lease) and lease

        seen["new_lease"] = wait_for("n2 registered again", registered_again, timeout=10, lab=lab)
        seen["reregistered_s"] = time.time() - t_revoke
        lab.wait_converged(NODES, timeout=30)
        seen["rejoined_s"] = time.time() - t_revoke
        t_back = time.time()
        news, holds = load.finish(settle=SETTLE_S)
        summary = cap.finish()
    finally:
        load.stop()
        cap.stop()
    log = agent_log(lab, "n2")
    noticed = [t for t in log_times(log, "lease expired") + log_times(log, "lease gone") if t >= t_revoke - 0.01]
    assert noticed and min(noticed) - t_revoke < 1.5, (noticed, t_revoke, log[-2000:])
    regs = [t for t in log_times(log, "registered node=n2") if t >= t_revoke - 0.01]
    assert len(regs) == 1, regs
    assert lab.alive("n2")
    broken, never = split_holds(holds)
    check_exactly_once(lab, news, NODES)
    assert_exactly_once(lab, news)
    late = failures(news + never, t0=t_revoke + ttl + 2)
    assert late == [], [(round(r["t"] - t_revoke, 2), r.get("error")) for r in late][:5]
    assert [r for r in broken if r["node"] != "n2"] == [], "connections on other nodes broke"
    figures = check_one_synack_per_syn(lab, cap, summary, news)
    assert "n2" in shares(news, t0=t_back + 0.5)
    print(f"lease revoked: noticed after {min(noticed) - t_revoke:.2f}s, {seen}; {len(failures(news))} of "
          f"{len(news)} failed, {len(broken)} long-lived broken; {figures}")
