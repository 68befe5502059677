"""The data-plane benchmark runs end to end in its quick form (never its timings).

Every scenario either ran with its traffic verified where the scenario says
it must go, or has a note with the error; the report and the plot render.
"""
import json
import os

import pytest

from nlbfarm.bench import dataplane

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark needs root (network namespaces)")


@pytest.fixture(scope="module")
def result():
    messages = []
    res = dataplane.run(messages.append, quick=True)
    res["_progress"] = messages
    return res


def test_result_structure(result):
    assert {"params", "summary", "notes", "scenarios"} <= set(result)
    json.dumps({k: v for k, v in result.items() if k != "_progress"})  # JSON-able
    assert result["params"]["quick"] is True and result["params"]["trials"] == 1
    assert set(result["scenarios"]) == set(dataplane.SCENARIOS)
    for row in result["summary"]:
        assert {"benchmark", "metric", "value", "compared_with"} <= set(row)
        assert isinstance(row["value"], str) and row["value"]
    assert all(isinstance(n, str) for n in result["notes"])


def test_every_scenario_ran_or_has_an_error_note(result):
    notes = " ".join(result["notes"])
    for sc, s in result["scenarios"].items():
        if s["ran"]:
            t = s["trials"][0]
            for m, _, _ in dataplane.METRICS:
                assert m in t
            assert t["conn_rate"] > 0 and t["req_rate"] > 0
        else:
            assert s["errors"], sc
            assert dataplane.LABELS[sc] in notes, f"{sc} did not run and no note says why"


def test_traffic_verified_per_scenario(result):
    ran = {sc: s for sc, s in result["scenarios"].items() if s["ran"]}
    assert dataplane.BASELINE in ran and "farm" in ran, result["notes"]
    for sc, s in ran.items():
        for t in s["trials"]:
            failed = [c for c in t["checks"] if not c["ok"]]
            assert not failed, (sc, failed)
            assert t["checks"], sc
        assert s["verified"], sc
    # the checks name what they compared
    farm = ran["farm"]["trials"][0]
    assert all(farm["per_node_close"][n] > 0 for n in dataplane.NODES)
    for sc in (dataplane.BASELINE, dataplane.FILTER_COST, "multicast-one"):
        one = ran[sc]["trials"][0]
        assert one["per_node_close"]["n1"] > 0 and one["per_node_close"]["n2"] == one["per_node_close"]["n3"] == 0, sc
    # farm-one: n1's filter saw everything and dropped nothing; n2 and n3 were unplugged
    f = ran[dataplane.FILTER_COST]["trials"][0]["filter"]
    assert f["n1"]["accepted"] > 0 and f["n1"]["dropped_foreign"] == 0, f


def test_ratios_against_the_baseline(result):
    s = result["scenarios"]
    assert s[dataplane.BASELINE]["ratio"]["conn_rate"] == 1.0
    for sc in dataplane.SCENARIOS:
        if s[sc]["ran"] and s[sc]["median"]["conn_rate"]:
            assert s[sc]["ratio"]["conn_rate"] > 0


def test_report_and_plot_render(result, tmp_path):
    plots = dataplane.plot(result, tmp_path)
    for p in plots:
        assert (tmp_path / p).stat().st_size > 1000
    text = dataplane.report(result, plots)
    assert "| scenario |" in text
    assert "Target: the farm filter costs at most 5%" in text
    assert any("target" in row["metric"] for row in result["summary"])
    for sc in dataplane.SCENARIOS:
        assert dataplane.LABELS[sc] in text


def test_nothing_left_behind(result):
    from nlbfarm.node import iplib
    left = [n for n in iplib.list_netns() if n.startswith(f"{dataplane.PREFIX}-")]
    assert not left, left
