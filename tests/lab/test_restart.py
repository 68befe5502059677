"""Hitless agent restarts: farmd restarted on every node under load moves no bucket,
fails no connection, breaks no held one, and writes no new table generation.

A supervisor (the lab's stand-in for systemd's ``Restart=always``) restarts each
farmd after SIGUSR2 (``systemctl reload farmd``): the old process hands its
leases and kernel state over; the new one adopts them (node/handoff.py).
"""
import json
import signal
import subprocess
import time

import pytest

from nlbfarm.analysis import failures, read_jsonl, read_results
from nlbfarm.lab import Lab, LabTiming
from labkit import agent_log, fresh_labs, logged

NODES = ["n1", "n2", "n3"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(prefix="trst", state_root=tmp_path_factory.mktemp("labstate"), supervise=True,
              supervise_delay=0.3)
    with lab.running(nodes=3, wait=60):
        yield lab


def wait_for(what, pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")


def instance(lab, node):
    m = lab.snapshot().members.get(node)
    return m.instance if m else None




def restart_hitless(lab, node, timeout=15.0):
    """SIGUSR2 to farmd; wait for the successor to adopt (a new instance in the same record)."""
    before = instance(lab, node)
    old_pid = lab.pid(node, "agent")
    assert lab.kill(node, "agent", sig=signal.SIGUSR2, wait=10), f"{node}: farmd was not running"
    assert not Lab._alive(old_pid), f"{node}: farmd did not exit after SIGUSR2"
    wait_for(f"{node}'s successor to adopt", lambda: instance(lab, node) not in (None, before), timeout)
    m = lab.snapshot().members[node]
    assert not m.handing_over and m.state == "active", m


def test_restart_on_every_node_under_load_moves_nothing_and_fails_nothing(lab, tmp_path):
    snap = lab.wait_converged(NODES, timeout=30)
    generation = snap.table.generation
    leases = {n: lab.member_lease(n) for n in NODES}
    held_out, load_out = tmp_path / "held.jsonl", tmp_path / "load.jsonl"
    # Connections held open across every restart, and a stream of new ones,
    # each of which must connect within 0.9 s (a dropped SYN is retried after 1 s).
    held = subprocess.Popen(lab.holdclient_argv(conns=12, duration=40, out=held_out, lifetime=30, period=0.5),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load = subprocess.Popen(lab.loadclient_argv(count=100_000, duration=25, out=load_out, workers=4,
                                                interval=0.01, timeout=0.9),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        for n in NODES:
            restart_hitless(lab, n)
            time.sleep(2)
        assert load.wait(60) == 0
        assert held.wait(60) == 0
    finally:
        for p in (load, held):
            if p.poll() is None:
                p.kill()
                p.wait()
    results = read_results(load_out)
    assert len(results) > 500, f"only {len(results)} connections were tried"
    assert failures(results) == [], f"{len(failures(results))} of {len(results)} connections failed"
    assert {r["node"] for r in results} == set(NODES)
    held_recs = read_jsonl(held_out)
    assert len(held_recs) == 12, held_recs
    broken = [h for h in held_recs if not h["ok"]]
    assert broken == [], f"held connections broke: {broken}"
    assert {h["node"] for h in held_recs} == set(NODES)
    snap = lab.snapshot()
    assert snap.table.generation == generation, "a restart wrote a new table generation"
    assert {n: lab.member_lease(n) for n in NODES} == leases, "a restart registered a new lease"
    for n in NODES:
        assert logged(lab, n, "handing_over", node=n)
        assert logged(lab, n, "adopted_the_previous_agents_lease", node=n)


def test_a_restart_refused_leaves_the_agent_running(lab):
    """While etcd is cut off, a successor could not adopt in time: farmd refuses and goes on."""
    lab.wait_converged(NODES, timeout=30)
    pid = lab.pid("n2", "agent")
    lab.cut_etcd("n2")
    try:
        time.sleep(1.5)  # keepalives late (lab timing: 0.25 s keepalives)
        lab.kill("n2", "agent", sig=signal.SIGUSR2, wait=0.1)
        wait_for("the refusal", lambda: "restart refused" in agent_log(lab, "n2"), 10)
        assert Lab._alive(pid), "farmd exited although it refused the restart"
    finally:
        lab.restore_etcd("n2")
    lab.wait_converged(NODES, timeout=30)
    assert lab.pid("n2", "agent") == pid


def test_a_successor_too_late_registers_anew_and_the_farm_converges(lab):
    """The window is the lease: a successor after it finds no record to adopt, and starts over."""
    lab.wait_converged(NODES, timeout=30)
    state = json.loads(next((lab.dir / "run").glob("farmd-*-n3.json")).read_text())
    assert state["node_id"] == "n3" and state["lease_id"] == lab.member_lease("n3")
    lab.kill("n3", "supervisor", sig=signal.SIGKILL, wait=5)  # no restart: the supervisor is gone
    assert lab.kill("n3", "agent", sig=signal.SIGUSR2, wait=10)
    wait_for("n3's lease to end", lambda: lab.member_lease("n3") is None, 15)
    lab.start_agent("n3")
    snap = lab.wait_converged(NODES, timeout=40)
    assert lab.member_lease("n3") not in (None, state["lease_id"])
    assert logged(lab, "n3", "not_adopting_the_previous_agents_lease", node="n3"), agent_log(lab, "n3")[-3000:]
    assert snap.members["n3"].state == "active"


def test_a_crash_restarted_while_the_fence_lives_is_adopted(tmp_path):
    """kill -9, restarted by the supervisor while the old fence element still lives: the
    kernel went on accepting the node's buckets (its app kept serving), and the successor
    adopts the lease and that element, so no connection fails and nothing moves. A fence
    of 3 s here leaves the successor time to start on a loaded 2-core machine; with the
    default 0.4 s a slower start is certified dead by its peers and registers anew
    (test_safety.py pins the path without a state file)."""
    with fresh_labs("trstc", tmp_path / "lab") as make:
        lab = make(3, supervise=True, supervise_delay=0.3,
                   timing=LabTiming(lease_ttl=6, fence_timeout=3.0))
        snap = lab.wait_converged(NODES, timeout=30)
        generation, lease = snap.table.generation, lab.member_lease("n2")
        old_pid = lab.pid("n2", "agent")
        load_out = tmp_path / "load.jsonl"
        load = subprocess.Popen(lab.loadclient_argv(count=50_000, duration=10, out=load_out, workers=4,
                                                    interval=0.01, timeout=0.9),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)
            lab.kill("n2", "agent", sig=signal.SIGKILL)
            wait_for("n2's successor", lambda: lab.pid("n2", "agent") not in (None, old_pid)
                     and "adopted the previous agent's lease node=n2" in agent_log(lab, "n2"), 15)
            assert load.wait(60) == 0
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        results = read_results(load_out)
        assert len(results) > 200, f"only {len(results)} connections were tried"
        assert failures(results) == [], f"{len(failures(results))} of {len(results)} connections failed"
        assert "n2" in {r["node"] for r in results}
        snap = lab.wait_converged(NODES, timeout=30)
        assert snap.table.generation == generation, "the crash moved buckets"
        assert lab.member_lease("n2") == lease, "the successor registered a new lease"
