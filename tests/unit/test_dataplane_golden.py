"""Golden tests: the exact nftables JSON the agent sends for representative specs.

Regenerate after an intended change with NLBFARM_UPDATE_GOLDEN=1 and review the diff.
"""
import json
import os
from pathlib import Path

import pytest
from dataclasses import replace

from nlbfarm.node.dataplane import (
    DataPlaneSpec, build_fence_refresh, build_ruleset, build_teardown, cluster_mac_for)

GOLDEN = Path(__file__).parent / "golden"

BASE = DataPlaneSpec(interface="eth0", vips=("198.18.0.100",), cluster_mac=cluster_mac_for("198.18.0.100"),
                     buckets=4096, seed=0x1234ABCD, fence_timeout=1)

CASES = {
    "owner_fence_open": replace(BASE, accepting=((0, 1364), (4000, 4000)), fence_open=True),
    "no_buckets_fence_open": replace(BASE, fence_open=True),
    "fence_closed_two_vips": replace(BASE, vips=("198.18.0.100", "198.18.0.101"), accepting=((0, 63),),
                                     fence_open=False),
    # After a rebalance: serves 0-1023 (of which 1000-1023 came from a peer
    # that still drains them) and drains 2048-2100, which it gave away.
    "handover_draining_and_guarded": replace(BASE, accepting=((0, 1023),), draining=((2048, 2100),),
                                             guarded=((1000, 1023),), fence_open=True),
}


def _check(name, cmds):
    path = GOLDEN / f"{name}.json"
    text = json.dumps(cmds, indent=1, sort_keys=True) + "\n"
    if os.environ.get("NLBFARM_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with NLBFARM_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name}: rendered rules differ from {path}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_ruleset_golden(name):
    _check(name, build_ruleset(CASES[name]))


def test_fence_refresh_golden():
    _check("fence_refresh", build_fence_refresh(CASES["owner_fence_open"]))


def test_teardown_golden():
    _check("teardown", build_teardown("nlbfarm"))


def test_one_transaction_replaces_both_tables_and_nothing_else():
    cmds = build_ruleset(CASES["owner_fence_open"])
    tables = {(c[v]["table"]["family"], c[v]["table"]["name"]) for c in cmds for v in c if "table" in c[v]}
    assert tables == {("arp", "nlbfarm"), ("inet", "nlbfarm")}
    for c in cmds:
        (verb, obj), = c.items()
        (_kind, body), = obj.items()
        assert body.get("table", body.get("name")) == "nlbfarm"


def test_filter_runs_before_conntrack():
    cmds = build_ruleset(CASES["owner_fence_open"])
    chains = [c["add"]["chain"] for c in cmds if "add" in c and "chain" in c["add"] and "hook" in c["add"]["chain"]]
    pre = next(ch for ch in chains if ch["hook"] == "prerouting")
    assert pre["prio"] < -200  # conntrack sits at -200


def test_cluster_mac_is_multicast_and_derived_from_vip():
    assert cluster_mac_for("198.18.0.100") == "03:bf:c6:12:00:64"
    assert int(cluster_mac_for("10.0.0.1")[:2], 16) & 1


def test_spec_equality_drives_idempotence():
    a = BASE.with_buckets([(0, 10)])
    b = BASE.with_buckets([(0, 10)])
    assert a == b and build_ruleset(a) == build_ruleset(b)
