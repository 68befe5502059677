"""`make demo` in short form: it must run, tear down and write the documented summary."""
import json
import os
import subprocess
import sys


def test_demo_runs_and_writes_summary(tmp_path):
    summary = tmp_path / "summary.json"
    env = dict(os.environ, DEMO_SUMMARY=str(summary), NLBFARM_LAB_DIR=str(tmp_path / "lab"))
    cp = subprocess.run([sys.executable, "-m", "nlbfarm.demo", "--steady", "4", "--down", "7", "--rejoin", "4",
                         "--prefix", "tdemo"], capture_output=True, text=True, timeout=240, env=env)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    assert "kill -9 of n2's agent and app" in cp.stdout and "rebalanced: n1 and n3 hold all buckets" in cp.stdout
    s = json.loads(summary.read_text())
    for key in ("requests", "failed", "failure_window_s", "shares", "rebalance_s"):
        assert key in s
    assert set(s["shares"]) == {"before", "after_kill", "after_rejoin"}
    assert s["accepted_by_two_nodes"] == 0
    assert "n2" not in s["shares"]["after_kill"] and s["shares"]["after_rejoin"]["n2"] > 0
    assert s["rebalance_s"] < s["lease_ttl_s"] + 2
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tdemo-" not in left
