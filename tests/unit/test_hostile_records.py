"""Hostile or absurd etcd content costs one warning, nothing else.

Every record is decoded at the boundary with bounds (coordinator/cluster.py).
Each test feeds the snapshot builder what an operator, a script or a buggy
peer could write under the prefix, and checks that nothing is allocated
beyond B, nothing raises, and the rest of the cluster is read as before.
"""
import json
import time
import tracemalloc

import pytest

from nlbfarm.coordinator.cluster import (
    MAX_GENERATION, Applied, ClusterSettings, Member, TableRecord, build_snapshot, table_digest)
from nlbfarm.coordinator.handover import plan_accept, plan_table

P = "/nlbfarm/t"
B = 64
LEASE = 0x42


def items(extra: dict, lease_of=None) -> dict:
    """A healthy two-node cluster plus ``extra`` (key -> bytes or (bytes, lease))."""
    owners = ["a"] * 32 + ["b"] * 32
    base = {
        f"{P}/cluster": (ClusterSettings(7, B).encode(), 0),
        f"{P}/members/a": (Member("a", 1).encode(), LEASE),
        f"{P}/members/b": (Member("b", 1).encode(), LEASE + 1),
        f"{P}/table": (TableRecord.encode(3, owners), 0),
        f"{P}/applied/a": (Applied(3, 32, table=table_digest(owners)).encode(), LEASE),
        f"{P}/applied/b": (Applied(3, 32, table=table_digest(owners)).encode(), LEASE + 1),
    }
    for k, v in extra.items():
        base[k] = v if isinstance(v, tuple) else (v, LEASE + 9)
    return {k: (v, i + 1, lease) for i, (k, (v, lease)) in enumerate(base.items())}


def snapshot(extra: dict):
    return build_snapshot(P, items(extra), 100)


def healthy(s) -> None:
    assert set(s.members) == {"a", "b"} and s.table is not None and s.table.generation == 3
    assert s.candidates() == {"a": 1, "b": 1}


def test_regression_enormous_draining_range_is_refused_without_allocating():
    # The blackout: applied/<id> with draining [[0, 10**12]] made every agent expand
    # it into a set, hang and be OOM-killed. It is now refused by its bounds.
    tracemalloc.start()
    t0 = time.monotonic()
    s = snapshot({f"{P}/applied/x": (json.dumps({"generation": 3, "draining": [[0, 10 ** 12]]}).encode(), 0),
                  f"{P}/applied/y": json.dumps({"generation": 3, "draining": [[0, 10 ** 12]]}).encode()})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.monotonic() - t0 < 1.0 and peak < 5_000_000
    healthy(s)
    assert "x" not in s.live()          # not lease-bound: ignored
    assert "y" in s.live() and "y" not in s.applied  # lease-bound but unreadable: live, gets nothing
    assert s.draining_elsewhere("a") == frozenset()
    text = "\n".join(s.warnings)
    assert f"key={P}/applied/x reason=not bound to a lease" in text
    assert f"key={P}/applied/y reason=draining must be sorted, disjoint" in text


@pytest.mark.parametrize("draining", [
    [[0, 64]],             # past B
    [[-1, 3]],             # negative
    [[5, 9], [3, 4]],      # unsorted
    [[0, 5], [5, 9]],      # overlapping
    [[0, 5], [6, 9]],      # adjacent: not canonical
    [[0, True]],           # a bool is not a bucket
    [[0, 1]] * 65,         # more ranges than buckets
    "0-63",
])
def test_draining_ranges_outside_the_canonical_form_are_refused(draining):
    with pytest.raises(ValueError, match="draining must"):
        Applied.decode(json.dumps({"generation": 1, "draining": draining}).encode(), B)


def test_canonical_draining_ranges_decode():
    a = Applied.decode(json.dumps({"generation": 1, "draining": [[0, 3], [5, 63]]}).encode(), B)
    assert a.draining == ((0, 3), (5, 63)) and a.draining_buckets == 63


@pytest.mark.parametrize("record, message", [
    ({"generation": MAX_GENERATION + 1}, "generation must be an integer"),
    ({"generation": -1}, "generation must be an integer"),
    ({"generation": 1, "accepting": B + 1}, "accepting must be an integer"),
    ({"generation": 1, "draining_connections": 2 ** 40}, "draining_connections must be an integer"),
    ({"generation": 1, "table": "not hex"}, "table must be a hex digest"),
])
def test_applied_counts_and_generations_are_bounded(record, message):
    with pytest.raises(ValueError, match=message):
        Applied.decode(json.dumps(record).encode(), B)


def test_member_strings_and_lists_are_bounded():
    with pytest.raises(ValueError, match="reason must be a string of at most"):
        Member.decode("a", json.dumps({"id": "a", "weight": 1, "reason": "x" * 10_000}).encode())
    with pytest.raises(ValueError, match="addresses must be a list of at most"):
        Member.decode("a", json.dumps({"id": "a", "weight": 1, "addresses": ["x"] * 100}).encode())


def test_oversized_and_deeply_nested_values_are_refused():
    with pytest.raises(ValueError, match="larger than"):
        Member.decode("a", b" " * (1 << 20))
    with pytest.raises(ValueError, match="nested too deeply"):
        Member.decode("a", b"[" * 10_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        Member.decode("a", json.dumps({"id": "a", "weight": 1}).encode() + b"9" * 5000)


def test_huge_table_generation_is_refused():
    raw = json.dumps({"generation": 10 ** 30, "buckets": B,
                      "owners": {"nodes": ["a"], "owners": ""}}).encode()
    with pytest.raises(ValueError, match="generation must be an integer from 1 to"):
        TableRecord.decode(raw, 1, B)


def test_regression_prefix_is_matched_with_its_trailing_slash():
    # Cluster "t" must not read cluster "t2"'s keys, nor a key named "/nlbfarm/tx".
    s = snapshot({"/nlbfarm/t2/members/c": Member("c", 1).encode(),
                  "/nlbfarm/t2/table": TableRecord.encode(9, ["c"] * B),
                  "/nlbfarm/tmembers/d": Member("d", 1).encode()})
    healthy(s)
    assert "c" not in s.live() and "d" not in s.live()


def test_keys_that_are_not_node_ids_are_ignored():
    s = snapshot({f"{P}/members/a/b": Member("a/b", 1).encode(),
                  f"{P}/members/" + "x" * 64: Member("x" * 64, 1).encode(),
                  f"{P}/members/": b"{}",
                  f"{P}/unknown/thing": b"\xff"})
    healthy(s)
    assert s.live() == {"a", "b"}


def test_regression_member_without_a_lease_is_ignored():
    # A member written by hand without a lease would hold buckets forever.
    s = snapshot({f"{P}/members/ghost": (Member("ghost", 1).encode(), 0)})
    healthy(s)
    assert "ghost" not in s.live()
    assert plan_table(s) is None


def test_unreadable_lease_bound_member_stays_live_and_blocks_its_buckets():
    # b's record was rewritten by a newer version we cannot read: b may still be
    # serving. It gets no buckets, but a may take b's old buckets only after b applied.
    s = build_snapshot(P, items({f"{P}/members/b": (b"{garbled", LEASE + 1),
                                 f"{P}/applied/b": (b"{garbled", LEASE + 1)}), 100)
    assert "b" in s.live() and "b" in s.unreadable and "b" not in s.members
    up = plan_table(s)
    assert up is not None and set(up.owners) == {"a"}
    after = build_snapshot(P, {**items({f"{P}/members/b": (b"{garbled", LEASE + 1),
                                        f"{P}/applied/b": (b"{garbled", LEASE + 1)}),
                               f"{P}/table": (TableRecord.encode(up.generation, up.owners), 200, 0)}, 200)
    plan = plan_accept("a", after, frozenset(range(32)))
    assert plan.accepting == frozenset(range(32)) and plan.waiting_for == ("b",)


def test_cluster_settings_with_a_huge_seed_or_odd_bucket_count_are_refused():
    for raw in (json.dumps({"seed": 2 ** 40, "buckets": B}), json.dumps({"seed": 1, "buckets": 100})):
        s = snapshot({f"{P}/cluster": (raw.encode(), 0)})
        assert s.settings is None
