"""Handover rules and the cluster snapshot, pinned on small tables."""
import json
import random

import pytest

from nlbfarm.coordinator.cluster import (
    Applied, ClusterSettings, Member, TableRecord, build_snapshot, table_digest)
from nlbfarm.coordinator.handover import plan_accept, plan_table

P = "/nlbfarm/t"
B = 64


def kv(items):
    return {k: (v if isinstance(v, bytes) else json.dumps(v).encode(), i + 1)
            for i, (k, v) in enumerate(items.items())}


def snap(members=(), table=None, applied=None, weights=None, extra=None, leaving=(), tables=None):
    """``applied`` maps node -> generation; the record names the contents of that
    generation's table from ``tables`` (default: the snapshot's own table)."""
    items = {f"{P}/cluster": ClusterSettings(seed=7, buckets=B).encode()}
    tables = dict(tables or {})
    if table is not None:
        tables.setdefault(table[0], table[1])
    for m in members:
        w = (weights or {}).get(m, 1)
        items[f"{P}/members/{m}"] = Member(m, w, "leaving" if m in leaving else "active").encode()
    if table is not None:
        gen, owners = table
        items[f"{P}/table"] = TableRecord.encode(gen, owners)
    for n, g in (applied or {}).items():
        digest = table_digest(tables[g]) if g in tables else ""
        items[f"{P}/applied/{n}"] = Applied(g, table=digest).encode()
    items.update(extra or {})
    return build_snapshot(P, kv(items), 100)


def test_first_table_is_planned_from_the_candidates():
    up = plan_table(snap(["a", "b"]))
    assert up.generation == 1 and up.reason == "first table" and up.expected_revision == 0
    assert up.owners == ["a"] * 32 + ["b"] * 32


def test_no_update_when_table_matches():
    owners = ["a"] * 32 + ["b"] * 32
    assert plan_table(snap(["a", "b"], table=(3, owners))) is None


def test_leave_is_named_and_only_moves_the_leavers_buckets():
    owners = ["a"] * 22 + ["b"] * 21 + ["c"] * 21
    up = plan_table(snap(["a", "c"], table=(4, owners), applied={"a": 4, "c": 4}))
    assert up.generation == 5 and up.reason == "left=b" and up.moved == 21
    assert all(o == n for o, n in zip(owners, up.owners) if o != "b")


def test_leaving_member_is_not_a_candidate_but_stays_live():
    s = snap(["a", "b"], table=(2, ["a"] * 32 + ["b"] * 32), leaving=("b",))
    assert s.candidates() == {"a": 1}
    assert "b" in s.live()
    assert plan_table(s).reason == "left=b"


def test_generation_follows_the_table_not_what_peers_report():
    # A record a node (or anyone) published cannot push generations up: the
    # next table follows the current one. Reports of the same generation for
    # other contents are told apart by the digest (test below).
    up = plan_table(snap(["a"], table=(3, ["b"] * 64), applied={"a": 9}))
    assert up.generation == 4


def test_generation_exceeds_any_published_one_without_a_table():
    # The table key was deleted or overwritten by hand: continue above the reports.
    up = plan_table(snap(["a"], applied={"a": 9}))
    assert up.generation == 10


def test_regression_generation_is_capped_against_a_hostile_report():
    from nlbfarm.coordinator.cluster import MAX_GENERATION
    up = plan_table(snap(["a"], applied={"a": MAX_GENERATION}))
    assert up.generation == MAX_GENERATION


def test_regression_same_generation_other_contents_does_not_count_for_rule_r():
    # After an etcd restore (or a hand-written table) b reports generation 2
    # for other contents: a must not take new buckets on that report.
    owners = ["a"] * 48 + ["b"] * 16
    other = ["b"] * 64
    s = snap(["a", "b"], table=(2, owners), applied={"b": 2}, tables={2: other})
    plan = plan_accept("a", s, frozenset(range(32)))
    assert plan.accepting == frozenset(range(32)) and plan.waiting_for == ("b",)


def test_empty_cluster_writes_nothing():
    assert plan_table(snap([])) is None


@pytest.mark.parametrize("accepting, applied, expect_accepting, waiting", [
    # carried-over buckets stay accepted while peers catch up
    (set(range(0, 32)), {"b": 1}, set(range(0, 32)), ("b",)),
    # new buckets only once every live peer applied this generation
    (set(range(0, 32)), {"b": 2}, set(range(0, 48)), ()),
    # a peer ahead of us (newer generation) also blocks: our view is stale
    (set(range(0, 32)), {"b": 3}, set(range(0, 32)), ("b",)),
    # a peer with no applied record yet blocks
    (set(), {}, set(), ("b",)),
])
def test_accept_rule(accepting, applied, expect_accepting, waiting):
    owners = ["a"] * 48 + ["b"] * 16
    s = snap(["a", "b"], table=(2, owners), applied=applied)
    plan = plan_accept("a", s, frozenset(accepting))
    assert plan.generation == 2
    assert plan.target == frozenset(range(48))
    assert plan.accepting == frozenset(expect_accepting)
    assert plan.waiting_for == waiting


def test_released_buckets_are_dropped_at_once():
    s = snap(["a", "b"], table=(2, ["a"] * 16 + ["b"] * 48), applied={"b": 1})
    plan = plan_accept("a", s, frozenset(range(32)))
    assert plan.accepting == frozenset(range(16)) and plan.complete


def test_dead_peer_without_lease_does_not_block():
    # c's member and applied keys are gone with its lease: it is not waited for.
    s = snap(["a", "b"], table=(5, ["a"] * 32 + ["b"] * 32), applied={"b": 5})
    assert plan_accept("a", s, frozenset()).accepting == frozenset(range(32))


def test_no_table_means_nothing_accepted():
    plan = plan_accept("a", snap(["a"]), frozenset({1, 2}))
    assert plan.accepting == frozenset() and plan.generation == 0


def test_no_bucket_is_accepted_twice_in_random_interleavings():
    """Simulate nodes applying tables in random orders; check exclusivity at every step."""
    from nlbfarm.coordinator.table import rebalance
    rng = random.Random(1)
    for _trial in range(30):
        nodes = ["a", "b", "c", "d"]
        tables = {}
        owners = None
        for g in range(1, 6):
            members = {n: 1 for n in rng.sample(nodes, rng.randint(2, 4))}
            owners = rebalance(owners, members, B)
            tables[g] = owners
        accepting = {n: frozenset() for n in nodes}
        applied = {}
        seen = {n: 0 for n in nodes}
        for _step in range(200):
            n = rng.choice(nodes)
            seen[n] = min(5, seen[n] + rng.choice([0, 1]))
            if seen[n] == 0:
                continue
            s = snap(nodes, table=(seen[n], tables[seen[n]]), applied=applied, tables=tables)
            plan = plan_accept(n, s, accepting[n])
            accepting[n] = plan.accepting
            applied[n] = plan.generation
            for b in range(B):
                holders = [x for x in nodes if b in accepting[x]]
                assert len(holders) <= 1, f"bucket {b} accepted by {holders}"


def test_malformed_values_are_ignored_with_a_warning():
    s = snap(["a"], extra={
        f"{P}/members/x": b"{not json",
        f"{P}/members/y": json.dumps({"id": "y", "weight": "heavy"}).encode(),
        f"{P}/members/z": json.dumps({"id": "other", "weight": 1}).encode(),
        f"{P}/applied/a": b"[]",
        f"{P}/table": json.dumps({"generation": 1, "buckets": 64, "owners": {"nodes": [], "owners": "!!"}}).encode(),
    })
    assert set(s.members) == {"a"}
    assert s.table is None and s.table_revision > 0
    text = "\n".join(s.warnings)
    for key in ("members/x", "members/y", "members/z", "applied/a", "table"):
        assert f"key={P}/{key}" in text
    # A writer can still replace the bad table by CAS on its revision.
    assert plan_table(s).expected_revision == s.table_revision


def test_table_with_wrong_bucket_count_is_rejected():
    s = snap(["a"], extra={f"{P}/table": TableRecord.encode(1, ["a"] * 128)})
    assert s.table is None and "has 128 buckets, the cluster has 64" in s.warnings[0]


def test_applied_draining_and_drain_requests_parse_and_validate():
    s = snap(["a", "b"], table=(2, ["a"] * 32 + ["b"] * 32), extra={
        f"{P}/applied/b": json.dumps({"generation": 2, "accepting": 32, "draining": [[0, 3], [10, 10]],
                                      "draining_connections": 7}).encode(),
        f"{P}/drain/a": json.dumps({"timeout": 30}).encode(),
        f"{P}/drain/b": json.dumps({"timeout": -1}).encode(),
        f"{P}/applied/a": json.dumps({"generation": 2, "draining": [[5, 1]]}).encode(),
    })
    assert s.applied["b"].draining == ((0, 3), (10, 10)) and s.applied["b"].draining_buckets == 5
    assert s.draining_elsewhere("a") == frozenset({0, 1, 2, 3, 10})
    assert s.drains["a"].timeout == 30.0 and "b" not in s.drains
    text = "\n".join(s.warnings)
    assert "drain/b reason=timeout must be seconds from 0 to 86400" in text
    assert "applied/a reason=draining must be sorted, disjoint [first, last] bucket ranges inside 0..63, got [5, 1]" in text


def test_draining_member_is_not_a_candidate():
    items = {f"{P}/cluster": ClusterSettings(seed=7, buckets=B).encode(),
             f"{P}/members/a": Member("a", 1, "draining").encode(),
             f"{P}/members/b": Member("b", 1).encode()}
    s = build_snapshot(P, kv(items), 5)
    assert s.candidates() == {"b": 1} and "a" in s.live()
