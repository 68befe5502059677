"""Faults under load: a steady stream of new connections plus 200 long-lived ones.

Each test brings up its own lab, runs both loads through the fault, and
records its figures (failed new connections, broken long-lived connections,
time to recover). With NLBFARM_FAULTS_REPORT set, the figures are written to
that JSON file; `make faults` turns it into the README's "Faults survived" table.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from labkit import agent_log, fresh_labs, logged
from nlbfarm.analysis import failures, match_accepts, read_accepts, read_results
from nlbfarm.node.dataplane import cluster_mac_for
from nlbfarm.lab import CLIENT_ADDR, CLIENT_ADDR6, VIP, VIP6, Lab, LabTiming

pytestmark = pytest.mark.faults

HOLD_CONNS = 200
LIFETIME = 8.0       # seconds each long-lived connection lives (< stop_drain_timeout)
SETTLE_S = LIFETIME + 2  # new connections after the last step, before the load ends
REPORT = os.environ.get("NLBFARM_FAULTS_REPORT")


def record(fault: str, figures: dict) -> None:
    if not REPORT:
        return
    path = Path(REPORT)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[fault] = {**figures, "measured": time.strftime("%Y-%m-%d", time.gmtime())}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def make_lab(tmp_path):
    with fresh_labs("tfault", tmp_path / "lab") as make:
        yield make


class Load:
    """Both client loads, bounded in count and time; they stop by themselves."""

    def __init__(self, lab: Lab, out: Path, duration: float, vip: str = VIP):
        self.lab, self.duration = lab, duration
        self.http_out, self.hold_out = out / "new.jsonl", out / "hold.jsonl"
        self.t0 = time.time()
        self.http = subprocess.Popen(
            lab.loadclient_argv(count=200_000, duration=duration, out=self.http_out, workers=6,
                                interval=0.02, timeout=3.0, vip=vip), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.hold = subprocess.Popen(
            lab.holdclient_argv(conns=HOLD_CONNS, duration=duration, out=self.hold_out, lifetime=LIFETIME, vip=vip),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - time.time()))

    def finish(self, settle: float | None = None) -> tuple[list[dict], list[dict]]:
        """Both loads' records once they have ended.

        ``settle``: end the load that many seconds from now rather than at its
        duration. The clients stop on SIGTERM the graceful way: no new
        connection starts, and every long-lived connection then open still
        lives its whole lifetime (so each one open during the last step is
        observed to the end). ``duration`` stays the bound for a slow machine.
        """
        if settle is not None:
            self.wait_until(time.time() + settle)
            for p in (self.http, self.hold):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        for p in (self.http, self.hold):
            try:
                assert p.wait(self.duration + 60) == 0
            finally:
                if p.poll() is None:
                    p.kill()
        return read_results(self.http_out), read_results(self.hold_out)

    def stop(self) -> None:
        for p in (self.http, self.hold):
            if p.poll() is None:
                p.kill()


def split_holds(holds: list[dict]) -> tuple[list[dict], list[dict]]:
    """(broken long-lived connections, long-lived attempts that never connected).

    An attempt that never got its greeting is a failed *new* connection; a
    connection is broken only if it was established and then lost.
    """
    broken = [r for r in holds if not r["ok"] and r["node"]]
    never = [{"t": r["t0"], "ms": (r["t1"] - r["t0"]) * 1000, "error": r["error"], "node": None, "port": 0}
             for r in holds if not r["ok"] and not r["node"]]
    return broken, never


def held_max(holds: list[dict]) -> int:
    """Most long-lived connections open at one moment (sampled each second)."""
    if not holds:
        return 0
    t, end, best = min(r["t0"] for r in holds), max(r["t1"] for r in holds), 0
    while t < end:
        best = max(best, sum(1 for r in holds if r["t0"] <= t < r["t1"] and r["node"]))
        t += 1.0
    return best


def check_exactly_once(lab: Lab, results: list[dict], nodes: list[str], client: str = CLIENT_ADDR) -> None:
    accepts = read_accepts({n: lab.accept_log(n) for n in nodes}, client)
    assert accepts or not [r for r in results if r["node"]], f"no accept logged from {client}"
    for r, got in zip(results, match_accepts(results, accepts)):
        if len(got) > 1:
            same_port = [x for x in results if x["port"] == r["port"]]
            raise AssertionError(f"connection {r} accepted by {got}; accepts on that port: "
                                 f"{[a for a in accepts if a.port == r['port']]}; attempts on it: {same_port}")


def timeline(lab: Lab, nodes: list[str]) -> str:
    """The agents' decisions, for a failure message."""
    out = []
    for n in nodes:
        lines = agent_log(lab, n).splitlines()
        out += [f"{n}: {line}" for line in lines if "cycle" in line or "etcd" in line][-25:]
    return "\n".join(out)


def farmctl(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess:
    return lab.farmctl(node, *args)


def restart_gracefully(lab: Lab, node: str, nodes: list[str]) -> None:
    lab.kill(node, "agent", sig=signal.SIGTERM, wait=lab.timing.stop_drain_timeout + 15)
    assert not lab.alive(node), f"{node}'s farmd did not exit after SIGTERM"
    lab.start_agent(node)
    lab.wait_converged(nodes, timeout=30)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_planned_changes_break_nothing(make_lab, tmp_path, family):
    """Scale-out 2 -> 3, drain and undrain of a node, rolling restart of all: 0 failed, 0 broken.

    Buckets move here while long-lived connections are open in many of them,
    so this is also the handover test for each address family's drain and guard rules.
    IPv6 skips the rolling restart: a graceful stop hands over through the same
    drain and guard rules as the drain, and the suite's time is better spent elsewhere.
    """
    v6 = family == "ipv6"
    lab = make_lab(3, ipv6=v6)
    lab.kill("n3", "agent", sig=signal.SIGTERM, wait=20)   # start as a 2-node farm
    lab.wait_converged(["n1", "n2"], timeout=20)
    load = Load(lab, tmp_path, duration=60 if v6 else 100, vip=VIP6 if v6 else VIP)
    try:
        load.wait_until(load.t0 + LIFETIME + 2)
        t = time.time()
        lab.start_agent("n3")                                  # scale-out
        lab.wait_converged(["n1", "n2", "n3"], timeout=30)
        steps = {"scale_out_s": time.time() - t}
        t = time.time()
        cp = farmctl(lab, "n1", "drain", "n2", "--wait", "--wait-timeout", "60")
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert "n2 is drained" in cp.stdout
        steps["drain_s"] = time.time() - t
        cp = farmctl(lab, "n1", "undrain", "n2")
        assert cp.returncode == 0, cp.stderr
        lab.wait_converged(["n1", "n2", "n3"], timeout=30)
        # Every step so far happened under load (a slow machine must not let it end early).
        assert load.http.poll() is None and load.hold.poll() is None, "the load ended before the undrain"
        if not v6:
            t = time.time()
            for node in ("n1", "n2", "n3"):                   # rolling restart
                restart_gracefully(lab, node, ["n1", "n2", "n3"])
            steps["rolling_restart_s"] = time.time() - t
        news, holds = load.finish(settle=SETTLE_S)
    finally:
        load.stop()
    broken, never = split_holds(holds)
    news = sorted(news + never, key=lambda r: r["t"])
    figures = {"failed": len(failures(news)), "broken": len(broken), "new_connections": len(news),
               "long_lived": len(holds), "long_lived_open_max": held_max(holds), "recovery_s": 0.0,
               **{k: round(v, 1) for k, v in steps.items()}}
    record("IPv6 planned: scale-out 2->3, drain" if v6 else "planned: scale-out 2->3, drain, rolling restart",
           figures)
    assert figures["long_lived_open_max"] >= HOLD_CONNS * 0.9
    check_exactly_once(lab, news, ["n1", "n2", "n3"], CLIENT_ADDR6 if v6 else CLIENT_ADDR)
    assert failures(news) == [], failures(news)[:5]
    assert broken == [], broken[:5]


def _crash_and_rejoin(lab: Lab, tmp_path: Path, victim: str, crash, rejoin, fault: str,
                      expect_reset: bool = True, vip: str = VIP) -> None:
    ttl = lab.timing.lease_ttl
    nodes = ["n1", "n2", "n3"]
    survivors = [n for n in nodes if n != victim]
    load = Load(lab, tmp_path, duration=45, vip=vip)
    try:
        load.wait_until(load.t0 + LIFETIME + 2)
        t_fault = time.time()
        crash()
        lab.wait_converged(survivors, timeout=ttl + 10)
        t_takeover = time.time()
        load.wait_until(t_fault + ttl + 4)
        rejoin()
        lab.wait_converged(nodes, timeout=30)
        news, holds = load.finish(settle=SETTLE_S)
    finally:
        load.stop()
    broken, never = split_holds(holds)
    late = failures(news + never, t0=t_fault + ttl + 2)
    failed = failures(news) + never
    recovery = max([r["t"] + r["ms"] / 1000 - t_fault for r in failed] + [t_takeover - t_fault])
    record(fault, {"failed": len(failed), "broken": len(broken), "new_connections": len(news),
                   "long_lived": len(holds), "recovery_s": round(recovery, 1),
                   "broken_on_victim": sum(1 for r in broken if r["node"] == victim)})
    check_exactly_once(lab, news, nodes, CLIENT_ADDR6 if ":" in vip else CLIENT_ADDR)
    assert late == [], (f"new connections failed later than TTL + 2 s after the fault at "
                        f"{[(round(r['t'] - t_fault, 2), r['error']) for r in late][:5]}:\n"
                        + timeline(lab, nodes))
    # Only the victim's connections break, and their clients learn it from a
    # reset or close (from the new owner after takeover, or from the victim's
    # kernel when only its processes died), never by hanging until a timeout.
    # The client waits 15 s for an answer: long enough for the TCP
    # retransmission that follows the takeover, whose backoff can reach
    # several seconds by then.
    def rel(rs):
        return [(round(r["t0"] - t_fault, 2), round(r["t1"] - t_fault, 2), r["node"], r["error"]) for r in rs][:5]

    bystanders = [r for r in broken if r["node"] != victim]
    assert bystanders == [], (f"{len(bystanders)} long-lived connections on survivors broke "
                              f"(times relative to the fault, takeover at {t_takeover - t_fault:.2f} s): "
                              f"{rel(bystanders)}\n" + timeline(lab, nodes))

    hung = [r for r in broken if "Timeout" in (r["error"] or "")]
    assert hung == [], f"{len(hung)} long-lived connections hung (times relative to the fault): {rel(hung)}\n" \
        + timeline(lab, nodes)
    if expect_reset:
        # The victim's kernel could not answer: the reset comes from the new owner.
        not_reset = [r for r in broken if r["t0"] < t_fault and "Reset" not in (r["error"] or "")]
        assert not_reset == [], f"not reset: {rel(not_reset)}"
    late_news = [r for r in broken if r["t1"] - t_fault >= ttl + 5]
    assert late_news == [], f"learned too late: {rel(late_news)}"
    assert held_max(holds) >= HOLD_CONNS * 0.9


def test_agent_kill_with_supervisor(make_lab, tmp_path):
    """kill -9 of the agent, app running: its connections reset after takeover; it rejoins."""
    # The supervisor waits past the lease TTL, so the takeover under test always
    # happens first. With a shorter wait the restarted agent may register again
    # in the instant its old lease expires, and the table then never changes:
    # harmless, but a different scenario, and one this test cannot time.
    lab = make_lab(3, supervise=True, supervise_delay=LabTiming().lease_ttl + 1.0)
    before = lab.pid("n2", "agent")
    _crash_and_rejoin(lab, tmp_path, "n2", lambda: lab.kill("n2", "agent"), lambda: None,
                      "kill -9 of one agent (supervised restart)")
    assert lab.pid("n2", "agent") != before, "the supervisor did not restart farmd"


def test_whole_node_kill(make_lab, tmp_path):
    """kill -9 of agent and app: the same, and the node comes back when started again."""
    lab = make_lab(3)
    # Here the victim's kernel lives on and closes the dead app's sockets itself.
    _crash_and_rejoin(lab, tmp_path, "n3", lambda: lab.kill_node("n3"), lambda: lab.start_node("n3"),
                      "kill -9 of a whole node (agent and app)", expect_reset=False)


def test_link_cut(make_lab, tmp_path):
    """The node's LAN link goes down: it withdraws by itself; the others take over."""
    lab = make_lab(3)
    withdrawn = {}

    def cut():
        lab.cut_link("n2")
        deadline = time.time() + 3
        while time.time() < deadline and lab.fence_open("n2"):
            time.sleep(0.05)
        withdrawn["after_s"] = time.time()

    _crash_and_rejoin(lab, tmp_path, "n2", cut, lambda: lab.restore_link("n2"), "LAN link of one node cut")
    log = agent_log(lab, "n2")
    assert "link eth0 is down: fence closed, withdrawing from the farm" in log


def test_ipv6_node_link_down(make_lab, tmp_path):
    """The same link cut with every client on the IPv6 VIP: neighbour discovery keeps them
    on the cluster MAC, the survivors take over, and the victim's clients get a reset."""
    lab = make_lab(3, ipv6=True)

    def cut():
        lab.cut_link("n2")
        deadline = time.time() + 3
        while time.time() < deadline and lab.fence_open("n2"):
            time.sleep(0.05)

    _crash_and_rejoin(lab, tmp_path, "n2", cut, lambda: lab.restore_link("n2"), "IPv6: LAN link of one node cut",
                      vip=VIP6)
    neigh = lab.run("client", ["ip", "-6", "neigh", "show", VIP6]).stdout
    assert cluster_mac_for(VIP) in neigh, neigh  # the cluster MAC, derived from the first VIP


def test_node_cut_off_from_etcd_only(make_lab, tmp_path):
    """etcd unreachable from one node, LAN intact: it steps back before anyone takes its buckets."""
    lab = make_lab(3)
    seen = {}

    def cut():
        t = time.time()
        lab.cut_etcd("n2")
        while time.time() < t + lab.timing.lease_ttl + 5 and lab.fence_open("n2"):
            time.sleep(0.02)
        seen["fence_closed"] = time.time()
        snap = lab.snapshot()
        seen["n2_owner_when_fenced"] = snap.counts().get("n2", 0)

    _crash_and_rejoin(lab, tmp_path, "n2", cut, lambda: lab.restore_etcd("n2"), "one node cut off from etcd")
    # When n2's fence closed, the table still gave n2 its buckets: nobody else served them yet.
    assert seen["n2_owner_when_fenced"] > 0
    log = agent_log(lab, "n2")
    assert "unreachable from this node (peer n1 reaches etcd)" in log or \
        "unreachable from this node (peer n3 reaches etcd)" in log


def _static(lab: Lab, tmp_path: Path, fault: str, outage) -> None:
    nodes = ["n1", "n2", "n3"]
    before = lab.snapshot()
    load = Load(lab, tmp_path, duration=outage.duration + 2 * LIFETIME + 8)
    try:
        load.wait_until(load.t0 + LIFETIME + 2)
        t_fault = time.time()
        outage()
        t_back = time.time()
        lab.wait_converged(nodes, timeout=20)
        recovered = time.time() - t_back
        news, holds = load.finish(settle=SETTLE_S)
    finally:
        load.stop()
    after = lab.snapshot()
    broken, never = split_holds(holds)
    news = sorted(news + never, key=lambda r: r["t"])
    record(fault, {"failed": len(failures(news)), "broken": len(broken), "new_connections": len(news),
                   "long_lived": len(holds), "recovery_s": round(recovered, 1),
                   "outage_s": round(t_back - t_fault, 1)})
    check_exactly_once(lab, news, nodes)
    assert failures(news) == [], failures(news)[:5]
    assert broken == [], broken[:5]
    # Static stability: same table, same registrations (no lease was lost).
    assert after.table.generation == before.table.generation
    assert after.table.owners == before.table.owners
    for n in nodes:
        log = agent_log(lab, n)
        assert "lease expired" not in log and "registered node" in log
        assert log.count("registered node") == 1, f"{n} registered again"


def test_etcd_down_for_everyone_for_60s(make_lab, tmp_path):
    lab = make_lab(3)

    def outage():
        lab.stop_etcd()
        time.sleep(60)
        lab.start_etcd()
    outage.duration = 60
    _static(lab, tmp_path, "etcd fully stopped for 60 s", outage)


def test_regression_etcd_down_for_everyone_at_the_default_timings(make_lab, tmp_path):
    # The simulation found the farm going dark in an etcd outage with the
    # default keepalive (0.5 s) and etcd.timeout (1 s) when the agents' ticks
    # were out of step: the peers' "etcd is down for me too" came after a
    # node's fence deadline. The lab's own timings (0.25 s, 0.5 s) left enough
    # room; the defaults did not.
    lab = make_lab(3, timing=LabTiming(keepalive_interval=0.5, etcd_timeout=1.0))

    def outage():
        # Put n2's ticks out of step with the others' first: each short stop
        # (well inside fence_timeout) delays its keepalive and probe ticks.
        for _ in range(2):
            lab.kill("n2", "agent", sig=signal.SIGSTOP, wait=0)
            time.sleep(0.2)
            lab.kill("n2", "agent", sig=signal.SIGCONT, wait=0)
            time.sleep(1.0)
        lab.stop_etcd()
        time.sleep(12)
        lab.start_etcd()
    outage.duration = 15
    _static(lab, tmp_path, "etcd fully stopped for 12 s, default timings", outage)


def test_etcd_cluster_loses_leader_then_quorum(make_lab, tmp_path):
    lab = make_lab(3, etcd_members=3)

    def outage():
        leader = lab.etcd_leader()
        assert leader is not None
        lab.stop_etcd(leader, sig=signal.SIGKILL)
        time.sleep(10)
        second = next(m for m in lab.etcd_names() if m != leader)
        lab.stop_etcd(second, sig=signal.SIGKILL)       # quorum lost: etcd is down for everyone
        time.sleep(10)
        lab.start_etcd(leader, wait=False)   # one member alone has no quorum: start both, then wait
        lab.start_etcd(second)
    outage.duration = 20
    _static(lab, tmp_path, "3-member etcd: leader killed, then a second member", outage)


def test_etcd_restart_and_compaction_miss_no_table_change(make_lab, tmp_path):
    lab = make_lab(3)
    etcdctl = ["etcdctl", "--endpoints", "127.0.0.1:2379"]
    # etcd restarted with its data: watches resume, and the next change reaches everyone.
    lab.stop_etcd()
    time.sleep(1)
    lab.start_etcd()
    lab.run("etcd", etcdctl + ["put", "/nlbfarm/lab/drain/n3", '{"timeout": 5}'])
    snap = lab.wait_converged(["n1", "n2"], timeout=20)
    g1 = snap.table.generation
    # n1's watch breaks (reset) while the table changes and etcd compacts that history.
    lab.cut_etcd("n1", reset=True)
    lab.run("etcd", etcdctl + ["del", "/nlbfarm/lab/drain/n3"])
    deadline = time.time() + 5
    while time.time() < deadline and lab.snapshot().table.generation == g1:
        time.sleep(0.05)
    rev = json.loads(lab.run("etcd", etcdctl + ["get", "x", "-w", "json"]).stdout)["header"]["revision"]
    lab.run("etcd", etcdctl + ["compact", str(rev)])
    time.sleep(0.5)
    lab.restore_etcd("n1")
    snap = lab.wait_converged(["n1", "n2", "n3"], timeout=20)
    assert snap.table.generation > g1
    log = agent_log(lab, "n1")
    assert "registered node" in log and log.count("registered node") == 1, "n1 re-registered"
    record("etcd restarted, then compaction during a broken watch",
           {"failed": 0, "broken": 0, "recovery_s": 0.0, "missed_table_changes": 0})


def test_drain_timeout_ends_old_connections(make_lab, tmp_path):
    """Connections still open when a drain times out are cut; their clients get a reset."""
    lab = make_lab(2)
    out = tmp_path / "hold.jsonl"
    hold = subprocess.Popen(lab.holdclient_argv(conns=40, duration=40, out=out, lifetime=30),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(4)
        t = time.time()
        cp = farmctl(lab, "n2", "drain", "n1", "--timeout", "3", "--wait", "--wait-timeout", "30")
        took = time.time() - t
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert took < 3 + 5, f"drain --timeout 3 took {took:.1f}s"
        assert hold.wait(80) == 0
    finally:
        if hold.poll() is None:
            hold.kill()
    holds = read_results(out)
    broken, _ = split_holds(holds)
    on_n1 = [r for r in holds if r["node"] == "n1" and r["t0"] < t]
    assert on_n1 and all(not r["ok"] for r in on_n1), "n1's old connections should end at the timeout"
    assert all(r["node"] == "n1" and "Reset" in r["error"] for r in broken), broken[:3]
    assert all(t + 2 < r["t1"] < t + 3 + 4 for r in broken), [round(r["t1"] - t, 1) for r in broken]
    farmctl(lab, "n2", "undrain", "n1")


def test_kill_9_of_one_agent_is_certified_and_taken_over_in_well_under_a_second(make_lab, tmp_path):
    """kill -9 of farmd, the application running, no supervisor: the peers see its listener
    refuse, wait out its fence (0.4 s by default) and retire its records, long before its
    lease would expire. New connections fail for under 2 s here (the issue's goal is 0.6 s
    at p99; ``make bench`` measures it), no connection is accepted twice, and nothing waits
    for the lease."""
    from nlbfarm.bench.failover import recovery
    lab = make_lab(3)
    assert lab.timing.fence_timeout == 0.4 and lab.timing.lease_ttl == 3
    load = Load(lab, tmp_path, duration=30)
    try:
        load.wait_until(load.t0 + 3)
        t_fault = time.time()
        lab.kill("n2", "agent")
        lab.wait_converged(["n1", "n3"], timeout=10)
        t_takeover = time.time()
        news, _holds = load.finish(settle=3)
    finally:
        load.stop()
    rec = recovery(news, t_fault)
    record("kill -9 of one agent, certified by its peers", {
        "failed": rec["failed"], "new_connections": len(news), "recovery_s": rec["recovery_s"]})
    assert rec["recovered"], rec
    assert rec["recovery_s"] < 2.0, (rec, timeline(lab, ["n1", "n3"]))
    assert t_takeover - t_fault < lab.timing.lease_ttl, "the survivors waited for the lease"
    logs = "".join(agent_log(lab, n) for n in ("n1", "n3"))
    assert any(logged(lab, n, "retired_peer", node="n2") for n in ("n1", "n3")), logs[-3000:]
    check_exactly_once(lab, news, ["n1", "n2", "n3"])


def test_regression_a_firewall_that_rejects_the_peer_port_of_a_live_node_is_no_certificate(make_lab, tmp_path):
    """An operator's reject rule on n2's peer port: its peers' connections there are reset and
    refused, exactly what a dead agent's kernel does. n2's own connections to its peers stay
    open, so they know it lives (rule 5): nobody retires it, nothing is accepted twice."""
    from nlbfarm.lab import PEER_PORT
    lab = make_lab(3)
    load = Load(lab, tmp_path, duration=12)
    try:
        load.wait_until(load.t0 + 2)
        lab.run("n2", ["nft", "add table inet fwtest; add chain inet fwtest in { type filter hook input "
                       f"priority 0; policy accept; }}; add rule inet fwtest in tcp dport {PEER_PORT} reject with tcp reset"])
        # Reset the peers' idle connections to n2 (a rejected port usually shows itself when
        # such a connection closes): they dial again at once and are refused.
        lab.run("n2", ["ss", "-K", "-t", "state", "established", f"( sport = :{PEER_PORT} )"])
        time.sleep(4)
        snap = lab.snapshot()
        news, _holds = load.finish(settle=2)
    finally:
        load.stop()
        lab.run("n2", ["nft", "delete table inet fwtest"], check=False)
    assert "n2" in snap.members, "a live node was retired"
    logs = "".join(agent_log(lab, n) for n in ("n1", "n3"))
    assert "retired peer" not in logs
    assert "its agent's own connection to this node is open" in logs, logs[-3000:]
    assert failures(news) == [], failures(news)[:5]
    check_exactly_once(lab, news, ["n1", "n2", "n3"])


def test_a_paused_agent_is_never_certified_dead(make_lab, tmp_path):
    """SIGSTOP: the agent's listener still accepts connections (its kernel answers), so no peer
    may certify it dead; its fence closes by itself and the lease decides, as before."""
    lab = make_lab(3)
    lab.kill("n2", "agent", sig=signal.SIGSTOP, wait=0)
    try:
        deadline = time.time() + lab.timing.lease_ttl + 10
        while time.time() < deadline and "n2" in lab.snapshot().members:
            time.sleep(0.1)
        assert "n2" not in lab.snapshot().members, "n2's lease never expired"
    finally:
        lab.kill("n2", "agent", sig=signal.SIGCONT, wait=0)
    logs = "".join(agent_log(lab, n) for n in ("n1", "n3"))
    assert "retired peer" not in logs
