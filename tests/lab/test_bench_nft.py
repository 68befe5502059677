"""Smoke tests of the nftables benchmarks: they run (quick), check what they claim, render.

Never asserts a timing: only the structure of the result, that every apply was
one transaction, that the foreign packets were counted by the intended drop
rule, and that report() and plot() produce their output. Each benchmark
creates and removes its own namespaces (bnr-*, bnf-*).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                                reason="needs root and nftables")

SUMMARY_KEYS = {"benchmark", "metric", "value", "compared_with"}


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip() and line.split()[0].startswith(prefix)]


def _check_common(result: dict, mod, tmp_path) -> None:
    assert {"params", "summary", "notes"} <= result.keys()
    assert result["summary"], "no summary rows"
    for row in result["summary"]:
        assert SUMMARY_KEYS <= row.keys()
        assert isinstance(row["value"], str) and row["value"]
    assert all(isinstance(n, str) for n in result["notes"])
    plots = mod.plot(result, tmp_path)
    assert plots
    for name in plots:
        path = tmp_path / name
        assert path.suffix == ".png" and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = mod.report(result, plots)
    assert "|---" in text and plots[0] in text


def test_rule_programming_quick(tmp_path):
    from nlbfarm.bench import rule_programming as mod
    result = mod.run(lambda m: None, quick=True)
    assert result["params"]["buckets"] == [256, 4096] and result["params"]["nodes"] == [2, 8]
    rows = result["rows"]
    assert {(r["buckets"], r["nodes"], r["layout"]) for r in rows} == {
        (b, n, lay) for b in (256, 4096) for n in (2, 8) for lay in mod.LAYOUTS}
    for r in rows:
        assert len(r["first_trials"]) == len(r["replace_trials"]) == 2
        assert r["first_ms"] > 0 and r["replace_ms"] > 0
        assert r["genid_deltas"] == [1]
        assert [v["genid_delta"] for v in r["verify"]] == [1, 1]
        assert [v["monitor_generations"] for v in r["verify"]] == [1, 1]
        assert r["kernel"]["bucket_elements"] == r["bucket_elements"]
    strided = next(r for r in rows if r["layout"] == "strided" and r["buckets"] == 4096 and r["nodes"] == 2)
    assert strided["ranges"] == 2048
    tx = result["transactions"]
    assert tx["all_exactly_one"] and tx["genid_deltas"] == [1] and tx["monitor_counts"] == [1]
    # The counting can see more than one: the deliberate two-transaction control.
    assert tx["control_two_transactions"] == {"genid_delta": 2, "monitor_generations": 2}
    assert result["kernel_matches_built"]
    _check_common(result, mod, tmp_path)
    assert _namespaces(mod.NS_PREFIX) == []


def test_foreign_packets_quick(tmp_path):
    if shutil.which("trafgen") is None:
        pytest.skip("trafgen (netsniff-ng) is not installed")
    from nlbfarm.bench import foreign_packets as mod
    result = mod.run(lambda m: None, quick=True)
    rows = result["rows"]
    assert list(rows) == list(mod.VARIANTS)
    for v, r in rows.items():
        assert r["sent"] == mod.QUICK_PACKETS
        assert r["dropped_by_intended_rule"] == r["sent"], v
        assert r["counted_other"] == 0, v
        assert r["all_dropped_by_intended_rule"], v
        assert r["pps"] > 0 and r["ns_per_packet"] > 0
    assert result["accept_check"]["accepted"] == result["accept_check"]["sent"] > 0
    assert result["accept_check"]["dropped_foreign"] == 0
    assert result["verified"]
    _check_common(result, mod, tmp_path)
    assert _namespaces(mod.NS_PREFIX) == []


def test_foreign_rulesets_use_the_project_rules():
    """Pure: the variants are the project's ruleset, moved, not a re-implementation."""
    from nlbfarm.bench import foreign_packets as mod
    from nlbfarm.node.dataplane import PRIO_POST_CT, build_ruleset
    _, ranges = mod.owned_ranges()
    spec = mod.make_spec(ranges)
    assert mod.ruleset("prerouting", spec) == build_ruleset(spec, fence_write_s=int(spec.fence_timeout))
    post = mod.ruleset("postct", spec)
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in post
              if "chain" in c.get("add", {}) and c["add"]["chain"]["family"] == "inet"}
    assert chains["prerouting"]["prio"] == PRIO_POST_CT
    ingress = mod.ruleset("ingress", spec)
    assert all(next(iter(c.values())).get(k, {}).get("family", "netdev") == "netdev"
               for c in ingress for k in ("table", "chain", "rule", "set", "counter", "element"))
    hook = next(c["add"]["chain"] for c in ingress if c.get("add", {}).get("chain", {}).get("hook"))
    assert hook["hook"] == "ingress" and hook["dev"] == mod.RX_IF
    assert any("jhash" in str(c) for c in ingress)
