"""The failover and control-plane benchmarks run (quick=True) and return the documented structure.

Only the structure is checked, never a timing: these machines are noisy.
"""
from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the benchmarks need root (namespaces, nftables)")


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def _check_contract(mod, result: dict, tmp_path) -> None:
    assert isinstance(mod.TITLE, str) and mod.TITLE
    assert {"params", "summary", "notes"} <= set(result)
    assert isinstance(result["params"], dict) and result["params"]
    assert isinstance(result["notes"], list) and all(isinstance(n, str) for n in result["notes"])
    assert result["summary"], "no summary row"
    for row in result["summary"]:
        assert {"benchmark", "metric", "value", "compared_with"} <= set(row)
        assert all(isinstance(row[k], str) and row[k] for k in ("metric", "value"))
    plots = mod.plot(result, tmp_path)
    assert isinstance(plots, list)
    for name in plots:
        assert (tmp_path / name).stat().st_size > 0
    text = mod.report(result, plots)
    assert isinstance(text, str) and "|---|" in text
    import json
    json.dumps(result)  # the runner writes it as JSON


def test_failover_quick(tmp_path):
    from nlbfarm.bench import failover
    msgs: list[str] = []
    result = failover.run(msgs.append, quick=True)
    _check_contract(failover, result, tmp_path)
    fig = result["figures"]
    assert {"health", "kill_agent"} <= set(fig), result["notes"]
    for kind in ("health", "kill_agent"):
        assert fig[kind]["trials"] == 1
        assert fig[kind]["recovery_s"]["n"] == 1
        assert fig[kind]["connections"] > 0
    assert "keepalived_tuned" in fig or any("keepalived" in n for n in result["notes"])
    p = result["params"]
    assert p["timing"]["lease_ttl_s"] == 3 and "election_timeout_ms" in p["etcd"]
    assert result["membership"]["departures"]["n"] >= 1
    assert _namespaces("bnx-") == []


def test_control_plane_quick(tmp_path):
    from nlbfarm.bench import control_plane
    msgs: list[str] = []
    result = control_plane.run(msgs.append, quick=True)
    _check_contract(control_plane, result, tmp_path)
    fig = result["figures"]
    assert list(fig) == ["8"], result["notes"]
    f = fig["8"]
    assert f["join_converge_s"]["n"] == 1 and f["failure_converge_s"]["n"] == 1
    assert f["join_requests"]["n"] == 1 and f["steady"]["agent_rss_mb"] > 0
    assert _namespaces("bnc-") == []
