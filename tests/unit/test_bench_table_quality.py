"""Tests for the table-quality benchmark (nlbfarm.bench.table_quality).

Only what is guaranteed is asserted: the structure of the result, the balance
and minimal-movement guarantees of ``rebalance`` (recomputed here from its
docstring's definition), and properties the reference schemes have by
construction. Never a timing.
"""
from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction
from math import ceil, floor

import pytest

from nlbfarm.bench import table_quality as tq
from nlbfarm.coordinator.table import counts, moved, rebalance


@pytest.fixture(scope="module")
def quick():
    messages: list[str] = []
    result = tq.run(messages.append, quick=True)
    return result, messages


# --- the result --------------------------------------------------------------

def test_quick_run_returns_the_contract_structure(quick):
    result, messages = quick
    assert messages, "progress was never called"
    json.dumps(result)  # JSON-able
    assert {"params", "summary", "notes", "grid"} <= set(result)
    assert isinstance(result["notes"], list) and all(isinstance(n, str) for n in result["notes"])
    p = result["params"]
    assert p["nodes"] == list(tq.QUICK_NODES) and p["buckets"] == list(tq.QUICK_BUCKETS)
    assert p["ring_vnodes"] == tq.RING_VNODES and p["maglev_m"] == tq.MAGLEV_M

    by_method = Counter(r["method"] for r in result["grid"])
    per_b = len(tq.QUICK_NODES) * len(tq.QUICK_BUCKETS)
    assert by_method == {"ours": per_b, "rendezvous": per_b, "ring": per_b,
                         "maglev": len(tq.QUICK_NODES)}
    for r in result["grid"]:
        assert r["samples"] == r["n"]  # every node joins and leaves once (N <= LEAVERS)
        assert r["balance"] >= 1.0
        for kind in ("join", "leave"):
            assert 0 < r[f"{kind}_best"] <= r[f"{kind}_median"] <= r[f"{kind}_worst"]

    assert len(result["summary"]) >= 3
    for row in result["summary"]:
        assert set(row) >= {"benchmark", "metric", "value", "compared_with"}
        assert row["value"][0].isdigit(), row  # leads with a ratio
        for m in ("Maglev", "rendezvous", "ring"):
            assert m in row["value"]


def test_ours_rows_reach_the_ideal_balance(quick):
    result, _ = quick
    for r in result["grid"]:
        if r["method"] == "ours":
            assert r["ideal"] == round(ceil(r["b"] / r["n"]) / (r["b"] / r["n"]), 4)
            assert r["balance"] <= r["ideal"], r


def test_stateless_references_move_the_same_on_join_and_leave(quick):
    result, _ = quick
    for r in result["grid"]:
        if r["method"] != "ours":
            for stat in ("best", "median", "worst"):
                assert r[f"join_{stat}"] == r[f"leave_{stat}"]
            assert r["join_collateral_max"] == r["leave_collateral_max"]


def test_only_maglev_moves_buckets_between_nodes_that_stay(quick):
    result, _ = quick
    for r in result["grid"]:
        if r["method"] in ("rendezvous", "ring"):  # by construction
            assert r["join_collateral_max"] == r["leave_collateral_max"] == 0, r


# --- nlbfarm's rebalance, recomputed from its docstring ------------------------

def min_moves(previous, members: dict[str, int], buckets: int) -> int:
    """The docstring's lower bound: max(sum max(0, lo-k), orphans + sum max(0, k-hi))."""
    total = sum(members.values())
    have = Counter(previous)
    orphans = sum(1 for o in previous if o not in members)
    short = over = 0
    for node, w in members.items():
        share = Fraction(buckets * w, total)
        short += max(0, floor(share) - have[node])
        over += max(0, have[node] - ceil(share))
    return max(short, orphans + over)


@pytest.mark.parametrize("buckets", [256, 1024])
def test_ours_is_balanced_and_moves_the_minimum(buckets):
    ns = (2, 3, 5, 8)
    grown = {}
    table = [None] * buckets
    for k in range(1, max(ns) + 1):
        members = {tq.node_id(i): 1 for i in range(k)}
        new = rebalance(table, members, buckets)
        if k > 1:
            assert moved(table, new) == min_moves(table, members, buckets)
        table = grown[k] = new

    for n in ns:
        full = grown[n]
        assert set(counts(full).values()) <= {floor(buckets / n), ceil(buckets / n)}
        everyone = {tq.node_id(i): 1 for i in range(n)}
        for x in range(n):
            rest = {tq.node_id(i): 1 for i in range(n) if i != x}
            left = rebalance(full, rest, buckets)
            assert set(counts(left).values()) <= {floor(buckets / (n - 1)), ceil(buckets / (n - 1))}
            assert moved(full, left) == min_moves(full, rest, buckets)
            assert moved(full, left) >= counts(full)[tq.node_id(x)]  # the leaver's buckets all move
            back = rebalance(left, everyone, buckets)
            assert moved(left, back) == min_moves(left, everyone, buckets)

    # The benchmark measures exactly these tables.
    rows = {r["n"]: r for r in tq.measure_ours(buckets, ns)}
    for n in ns:
        assert rows[n]["balance"] == round(max(counts(grown[n]).values()) / (buckets / n), 4)
        growth = moved(grown[n - 1], grown[n]) / (buckets / n)
        assert rows[n]["join_best"] <= round(growth, 4) <= rows[n]["join_worst"]


# --- reference schemes ------------------------------------------------------------

@pytest.mark.parametrize("scheme", [tq.Rendezvous, tq.HashRing])
def test_hashing_references_move_only_the_changing_nodes_buckets(scheme):
    s = scheme(512, 6)
    full = s.owners(range(6))
    assert full == scheme(512, 6).owners(range(6))  # deterministic
    assert set(full) == set(range(6))
    for x in range(6):
        without = s.owners([i for i in range(6) if i != x])
        assert x not in without
        for before, after in zip(full, without):
            # Exactly the leaver's buckets move (and so, backwards, a join only takes).
            assert (before != after) == (before == x)


def paper_maglev(names, m):
    """Pseudocode 1 of the Maglev paper, transcribed literally."""
    n = len(names)
    offset = [tq._h64(x, b"maglev-offset") % m for x in names]
    skip = [tq._h64(x, b"maglev-skip") % (m - 1) + 1 for x in names]
    permutation = [[(offset[i] + j * skip[i]) % m for j in range(m)] for i in range(n)]
    nxt = [0] * n
    entry = [-1] * m
    filled = 0
    while True:
        for i in range(n):
            c = permutation[i][nxt[i]]
            while entry[c] >= 0:
                nxt[i] += 1
                c = permutation[i][nxt[i]]
            entry[c] = i
            nxt[i] += 1
            filled += 1
            if filled == m:
                return entry


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_maglev_table_matches_the_paper_and_is_balanced(n):
    names = [tq.node_id(i) for i in range(n)]
    m = 1031  # prime
    table = tq.maglev_table(names, m)
    assert table == paper_maglev(names, m)
    tally = Counter(table)
    assert sorted(tally) == list(range(n))
    # Backends fill one entry per turn, so their counts differ by at most one.
    assert max(tally.values()) - min(tally.values()) <= 1


def test_maglev_owners_map_back_to_member_indexes():
    mg = tq.Maglev(1031)
    full = mg.owners(range(4))
    assert set(full) == {0, 1, 2, 3}
    without = mg.owners([0, 1, 3])
    assert set(without) == {0, 1, 3}
    # Every entry of the leaver moves; Maglev may move a few others too.
    assert all(a != b for a, b in zip(full, without) if a == 2)


def test_sample_nodes_spreads_and_keeps_the_ends():
    assert tq.sample_nodes(3) == [0, 1, 2]
    s = tq.sample_nodes(64, 8)
    assert len(s) == 8 and s[0] == 0 and s[-1] == 63 and s == sorted(set(s))


# --- plots and report ----------------------------------------------------------------

def test_plot_writes_pngs(quick, tmp_path):
    pytest.importorskip("matplotlib")
    result, _ = quick
    names = tq.plot(result, tmp_path)
    assert names
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_report_mentions_every_method_and_plot(quick):
    result, _ = quick
    text = tq.report(result, ["d/table_quality_balance.png", "d/table_quality_moves.png"])
    for label in tq.LABELS.values():
        assert label in text
    assert "](d/table_quality_balance.png)" in text and "](d/table_quality_moves.png)" in text
    for b in tq.QUICK_BUCKETS:
        assert f"B={b}" in text
    assert not text.startswith("#")  # the runner adds the heading
