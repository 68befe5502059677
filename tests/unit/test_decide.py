"""The pure decision core, pinned by reason and sentence, and the defects it was built to fix.

Each regression test is named after a defect found when the farm was tried
as a new user would, or in review, and fails on the code before the fix.
"""
import json
import threading
import time
from types import MappingProxyType, SimpleNamespace

import pytest

from nlbfarm.config import parse_config
from nlbfarm.coordinator.cluster import Applied, ClusterSettings, Member, TableRecord, build_snapshot
from nlbfarm.errors import ConfigError
from nlbfarm.node.decide import (
    FenceReason, LeaseView, LocalState, Observations, Reason, Timing, after_adopt, after_keepalive_failed,
    after_keepalive_ok, after_probe, answers_reachable, decide, fence_deadline, remember_table)
from nlbfarm.node.lease import LeaseKeeper
from nlbfarm.node.peers import Peer, judge_answers

P = "/nlbfarm/t"
B = 64
T = Timing(3, 1, 0.5, 1.0)
NOW = 1000.0
OWNERS = ["a"] * 22 + ["b"] * 21 + ["c"] * 21


def snap(members=("a", "b", "c"), owners=OWNERS, gen=5, applied=None, extra=None, rev=100,
         state=("active", "no checks configured"), a_state=None):
    table = TableRecord(gen, B, tuple(owners))
    items = {f"{P}/cluster": (ClusterSettings(7, B).encode(), 1, 0),
             f"{P}/table": (TableRecord.encode(gen, list(owners)), 2, 0)}
    for i, m in enumerate(members):
        st = a_state if (m == "a" and a_state) else state
        items[f"{P}/members/{m}"] = (Member(m, 1, st[0], reason=st[1], instance=f"{m}-1").encode(), 3, 10 + i)
    for n, g in (applied if applied is not None else {m: gen for m in members}).items():
        items[f"{P}/applied/{n}"] = (Applied(g, table=table.digest).encode(), 4, 20 + list(members).index(n)
                                     if n in members else 99)
    items.update(extra or {})
    return build_snapshot(P, items, rev)


def lease(age=0.1, **kw):
    return LeaseView(registered=True, lease_id=10, applied_lease=20, last_ok_sent=NOW - age, **kw)


def obs(lease_view=None, link_up=True, state=("active", "no checks configured"), **kw):
    return Observations(now=NOW, lease=lease_view or lease(), link_up=link_up, desired_state=state[0],
                        desired_reason=state[1], conn_scan_at=NOW, **kw)


def accepting(me, s):
    return frozenset(i for i, o in enumerate(s.table.owners) if o == me)


def local_for(me, s, **kw):
    acc = accepting(me, s)
    return LocalState(accepting=acc, published=Applied(s.table.generation, len(acc), table=s.table.digest),
                      published_revision=s.revision, node_state="active", state_reason="no checks configured",
                      seen_tables=MappingProxyType({s.table.generation: s.table.owners}), **kw)


# ---- reasons and sentences ---------------------------------------------------------------

@pytest.mark.parametrize("setup, reason, words", [
    (dict(), Reason.APPLIED, "generation 5 applied: accepting 22 of 64 buckets"),
    (dict(lease_view=lease(age=1.2)), Reason.KEEPALIVE_LATE, "etcd keepalive late (1.2 s)"),
    (dict(lease_view=lease(age=2.9)), Reason.FENCE_CLOSED, "fence closed (no keepalive in time)"),
    (dict(lease_view=lease(age=2.5, consensus_at=NOW - 0.5)), Reason.STATIC, "etcd unreachable for every peer"),
    (dict(link_up=False), Reason.LINK_DOWN, "link eth0 is down: fence closed"),
    (dict(lease_view=lease(lost=True)), Reason.LEASE_LOST, "lease lost: released every bucket"),
    (dict(state=("draining", "an operator asked this node to drain")), Reason.STATE_CHANGE,
     "state draining (an operator asked this node to drain)"),
])
def test_decide_reason_and_sentence(setup, reason, words):
    s = snap()
    local = local_for("a", s)
    if not setup.get("link_up", True):  # already announced failed and out of the table
        down = ("failed", "link eth0 is down")
        s = snap(owners=["b"] * 32 + ["c"] * 32, gen=6, a_state=down)
        setup = dict(setup, state=down)
    plan = decide("a", T, s, local, obs(**setup))
    assert plan.reason is reason
    assert words in plan.sentence()


def test_n_cores_on_one_snapshot_never_accept_the_same_bucket():
    # MetalLB's layer2 test shape: several deciders, one input, no overlap.
    s = snap(owners=["b"] * 32 + ["c"] * 32, gen=6, applied={"a": 5, "b": 6, "c": 5},
             a_state=("draining", "an operator asked this node to drain"))
    old = snap()
    plans = {m: decide(m, T, s, local_for(m, old), obs(state=("draining", "an operator asked this node to drain")
                                                        if m == "a" else ("active", "no checks configured")))
             for m in ("a", "b", "c")}
    for x in plans:
        for y in plans:
            if x < y:
                assert not (plans[x].kernel.accepting & plans[y].kernel.accepting), (x, y)
    assert plans["b"].reason is Reason.WAITING_FOR_PEERS and plans["a"].kernel.accepting == frozenset()


# ---- regressions ------------------------------------------------------------------------------

def test_regression_rule_e_answer_from_this_node_does_not_count():
    # A wildcard peer_listen made a cut-off node dial itself and hear its own "no".
    me_answer = SimpleNamespace(node_id="a", instance="a-1", voting=True, reachable=False)
    down, why = judge_answers("a", "a-1", [Peer("b", "b-1", "0.0.0.0:7401")], {"b": me_answer})
    assert not down and "leads back here" in why


def test_regression_rule_e_answer_from_another_process_does_not_count():
    other = SimpleNamespace(node_id="b", instance="b-2", voting=True, reachable=False)
    down, why = judge_answers("a", "a-1", [Peer("b", "b-1", "10.0.0.2:7401")], {"b": other})
    assert not down and "another agent process" in why
    ok = SimpleNamespace(node_id="b", instance="b-1", voting=True, reachable=False)
    assert judge_answers("a", "a-1", [Peer("b", "b-1", "10.0.0.2:7401")], {"b": ok})[0]


def test_regression_unregistered_agent_does_not_vote():
    # A freshly started agent answered "etcd unreachable" before it had registered.
    assert answers_reachable(LeaseView(), T, NOW) is None
    answer = SimpleNamespace(node_id="b", instance="b-1", voting=False, reachable=False)
    assert judge_answers("a", "a-1", [Peer("b", "b-1", "x:1")], {"b": answer}) == (
        False, "peer b is not registered and does not vote")


def test_regression_fresh_registration_takes_the_acquire_grace():
    v = after_adopt(10, 20, NOW, NOW, T)
    assert v.acquire_after == NOW + T.acquire_grace
    s = snap(members=("a",), owners=["a"] * B, gen=2, applied={"a": 1})
    local = LocalState(seen_tables=MappingProxyType({1: tuple(["x"] * B)}))
    plan = decide("a", T, s, local, obs(lease_view=v))
    assert plan.kernel.accepting == frozenset() and plan.reason is Reason.ACQUIRE_GRACE


def test_regression_default_timings_keep_rule_e_ahead_of_the_fence():
    # One keepalive tick during an outage outlasted the fence, so rule E could
    # not keep the fence open in the outage it exists for.
    assert T.problems() == []
    v = lease(age=T.late_after)
    v = after_keepalive_failed(v, NOW - T.late_after + T.keepalive_interval)
    started = NOW  # the probe starts once the keepalive is late
    v = after_probe(v, started, v.last_ok_sent, True, T, started + 0.01)
    until, why = fence_deadline(v, T, True)
    assert why is FenceReason.RULE_E and until - (NOW + T.probe_timeout + T.fence_refresh) >= T.fence_timeout


def test_regression_timings_that_cannot_ride_out_an_outage_are_refused():
    with pytest.raises(ConfigError, match=r"2 x keepalive_interval \+ probe .* must be at most lease_ttl"):
        parse_config({"node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100"]},
                      "etcd": {"endpoints": ["127.0.0.1:2379"], "timeout": 0.5},
                      "timing": {"lease_ttl": 2, "fence_timeout": 1, "keepalive_interval": 0.5}})


@pytest.mark.parametrize("listen", ["0.0.0.0:7401", "[::]:7401", "127.0.0.1:7401", "localhost:7401"])
def test_regression_wildcard_or_loopback_peer_listen_needs_an_advertised_address(listen):
    base = {"node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100"]}, "etcd": {"endpoints": ["e:2379"]}}
    with pytest.raises(ConfigError, match="set peer_advertise"):
        parse_config({**base, "status": {"peer_listen": listen}})
    cfg = parse_config({**base, "status": {"peer_listen": listen, "peer_advertise": "10.0.0.11:7401"}})
    assert cfg.status.peer_address == "10.0.0.11:7401"
    with pytest.raises(ConfigError, match="peer_advertise 0.0.0.0:7401 is a wildcard"):
        parse_config({**base, "status": {"peer_listen": listen, "peer_advertise": "0.0.0.0:7401"}})


def test_regression_link_down_keeps_publishing_so_peers_take_over():
    # The LAN link went down with etcd reachable another way: the node announced
    # failed but never published its release, and peers waited for it forever.
    s = snap(owners=["b"] * 32 + ["c"] * 32, gen=6, applied={"a": 5, "b": 6, "c": 6},
             a_state=("failed", "link eth0 is down"))
    plan = decide("a", T, s, local_for("a", snap()), obs(link_up=False, state=("failed", "link eth0 is down")))
    assert plan.reason is Reason.LINK_DOWN and plan.fence_until is None
    assert plan.kernel.accepting == frozenset()
    assert plan.publish is not None and plan.publish.generation == 6 and plan.publish.accepting == 0


def test_regression_applied_record_is_compared_with_etcd_not_only_memory():
    # Someone overwrote applied/a in etcd; the agent compared only with what it
    # remembered writing and never corrected it.
    s = snap()
    lie = {f"{P}/applied/a": (Applied(99, 64).encode(), 50, 20)}
    forged = snap(extra=lie, rev=101)
    local = local_for("a", s)
    assert decide("a", T, s, local, obs()).publish is None
    plan = decide("a", T, forged, local, obs())
    assert plan.publish is not None and plan.publish.generation == 5


def test_regression_member_key_deleted_is_recreated():
    s = snap(members=("b", "c"), applied={"a": 5, "b": 5, "c": 5})
    plan = decide("a", T, s, local_for("a", snap()), obs())
    assert plan.reason is Reason.MEMBER_MISSING and plan.recreate_member
    assert "a" in s.live()  # applied/a keeps it live: peers wait for its release


def test_regression_no_writes_while_the_keepalive_is_late():
    # The loop blocked in etcd writes that retry for 10 s against a 3 s lease.
    s = snap()
    plan = decide("a", T, s, local_for("a", s), obs(lease_view=lease(age=1.5),
                                                    state=("failed", "check http failing")))
    assert plan.member_write is None and plan.table_write is None and plan.publish is None


class Boom:
    def __init__(self):
        self.calls = 0

    def refresh_all(self, leases, deadline=None):
        self.calls += 1
        raise RuntimeError("cannot read /etc/nlbfarm/etcd.crt")


def test_regression_keepalive_thread_survives_an_unexpected_error():
    # An unreadable certificate during a probe killed the keepalive thread; the
    # agent lived on as a zombie that never re-registered.
    farm = Boom()
    keeper = LeaseKeeper("a", Timing(3, 1, 0.05, 1.0), farm, SimpleNamespace(refresh_fence=lambda u: None,
                                                                               close_fence=lambda: None),
                         link_up=lambda: True, member_present=lambda: True, peers=lambda: [],
                         probe=SimpleNamespace(etcd_down_for_all=lambda p: (False, "")), wake=threading.Event())
    keeper.adopt(10, 20, time.monotonic())
    keeper.start()
    try:
        time.sleep(0.6)
        assert farm.calls >= 3  # it kept trying after each failure
        assert all(t.is_alive() for t in keeper._threads)
    finally:
        keeper.stop()


def test_keepalive_transitions():
    v = lease(age=0.0)
    v = after_keepalive_failed(v, NOW + 0.5)
    assert v.stale_since == NOW + 0.5
    v2 = after_keepalive_ok(v, NOW + 0.9, NOW + 0.9, T)  # T.fresh_window is 1.0
    assert v2.stale_since is None and v2.acquire_after == v.acquire_after  # stale < fresh window: no grace
    v3 = after_keepalive_ok(v, NOW + 3.0, NOW + 3.0, T)
    assert v3.acquire_after == NOW + 3.0 + T.acquire_grace  # it may have told a peer "no"


def test_regression_slow_keepalives_that_never_fail_still_take_the_acquire_grace():
    # Simulation seed 4940: etcd slow for everyone, each keepalive succeeded
    # (none failed), only after the fresh window. Meanwhile the node answered a
    # cut-off peer "no" from the age of its last success; the peer kept serving
    # under rule E, and this node took its buckets at once when its lease ran out.
    v = lease(age=0.0)
    v2 = after_keepalive_ok(v, NOW + 0.5, NOW + T.fresh_window + 0.1, T)  # sent in time, answered late
    assert answers_reachable(v, T, NOW + T.fresh_window) is False  # what it told a peer meanwhile
    assert v2.acquire_after == NOW + T.fresh_window + 0.1 + T.acquire_grace
    v3 = after_keepalive_ok(v, NOW + 0.5, NOW + T.fresh_window - 0.1, T)  # never said "no"
    assert v3.acquire_after == v.acquire_after


def test_regression_rule_e_extends_a_fence_and_never_reopens_one():
    # Simulation seed 2173: a node cut off from etcd closed its fence when its
    # lease ran out, and a peer took its buckets. Later etcd was slow for
    # everyone; every peer answered "no", and rule E reopened the cut-off
    # node's fence over buckets the peer was serving.
    v = lease(age=0.0)
    lease_until = NOW + T.lease_ttl - T.margin
    late = after_probe(v, lease_until + 0.01, v.last_ok_sent, True, T, lease_until + 0.02)
    assert late.consensus_at is None
    assert fence_deadline(late, T, True) == (lease_until, FenceReason.OPEN)
    # Begun in time, but the answers came after the deadline (the prober stalled).
    stalled = after_probe(v, lease_until - 0.3, v.last_ok_sent, True, T, lease_until + 0.5)
    assert stalled.consensus_at is None
    # A probe while the lease still holds extends it, and the next one, inside
    # that window after the lease's own deadline, extends it again.
    first = after_probe(v, lease_until - 0.5, v.last_ok_sent, True, T, lease_until - 0.49)
    assert fence_deadline(first, T, True) == (lease_until - 0.5 + T.rule_e_window, FenceReason.RULE_E)
    second = after_probe(first, lease_until + 1.0, v.last_ok_sent, True, T, lease_until + 1.01)
    assert fence_deadline(second, T, True) == (lease_until + 1.0 + T.rule_e_window, FenceReason.RULE_E)
    end = lease_until - 0.5 + T.rule_e_window
    gap = after_probe(first, end, v.last_ok_sent, True, T, end + 0.01)
    assert gap.consensus_at == first.consensus_at  # after that window ended: no reopening


def test_remember_table_keeps_the_last_three_and_recent_ones():
    local = LocalState()
    for g in range(1, 6):
        local = remember_table(local, TableRecord(g, B, tuple(["a"] * B)), NOW + g * 100, 10)
    assert sorted(local.seen_tables) == [3, 4, 5]
    for g in range(6, 80):  # a burst within the memory window: kept, up to a cap
        local = remember_table(local, TableRecord(g, B, tuple(["a"] * B)), NOW + 1000, 10)
    assert len(local.seen_tables) == 64 and max(local.seen_tables) == 79


def test_regression_tables_that_change_faster_than_the_grace_keep_their_owners():
    # Found by the simulation (seed 907): four tables in a second after a
    # partition, and the table naming the vanished owner had been forgotten.
    local = LocalState()
    local = remember_table(local, TableRecord(1, B, tuple(["x"] * B)), NOW, T.table_memory)
    for g in range(2, 6):
        local = remember_table(local, TableRecord(g, B, tuple(["a"] * B)), NOW + 0.1 * g, T.table_memory)
    assert 1 in local.seen_tables


def test_hostile_applied_record_cannot_push_republish_storms():
    s = snap()
    huge = {f"{P}/applied/x9": (json.dumps({"generation": 1, "trust_after": 10 ** 9}).encode(), 60, 77)}
    plan = decide("a", T, snap(extra=huge), local_for("a", s), obs())
    assert plan.publish is None  # a claimed rewind above etcd's revision is ignored
