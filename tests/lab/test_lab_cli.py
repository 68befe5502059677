"""farmctl lab and farmctl status as an operator uses them, including cleanup after a crash."""
import json
import os
import shutil
import subprocess
import sys

import pytest

PREFIX = "tcli"
BIN = os.path.dirname(sys.executable)


def farmctl(*args, check=True, env=None):
    cp = subprocess.run([os.path.join(BIN, "farmctl"), *args], capture_output=True, text=True, timeout=120,
                        env=env)
    if check:
        assert cp.returncode == 0, f"farmctl {' '.join(args)} rc={cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    return cp


@pytest.fixture
def labdir(tmp_path):
    env = dict(os.environ, NLBFARM_LAB_DIR=str(tmp_path))
    yield env
    farmctl("lab", "down", "--prefix", PREFIX, env=env, check=False)


def test_lab_up_status_down_and_crash_cleanup(labdir):
    up = json.loads(farmctl("lab", "up", "--nodes", "2", "--prefix", PREFIX, "--json", env=labdir).stdout)
    assert up["vip"] == "198.18.0.100" and up["url"] == "http://198.18.0.100:80/"
    assert {h: v["netns"] for h, v in up["hosts"].items()} == {
        "lan": "tcli-lan", "etcd": "tcli-etcd", "client": "tcli-client", "n1": "tcli-n1", "n2": "tcli-n2"}
    assert up["hosts"]["n2"]["address"] == "198.18.0.12"
    assert up["agents"]["n1"] == {**up["agents"]["n1"], "netns": "tcli-n1", "grpc": "127.0.0.1:7400",
                                  "agent_running": True, "app_running": True}

    st = json.loads(farmctl("lab", "status", "--prefix", PREFIX, "--json", env=labdir).stdout)
    assert st["agents"].keys() == {"n1", "n2"} and st["etcd"]["running"]

    # farmctl status over gRPC, from inside a node's namespace
    status = json.loads(farmctl("status", "--netns", "tcli-n1", "--json").stdout)
    assert status["healthy"] is True
    assert status["node_id"] == "n1" and int(status["generation"]) >= 1
    assert {m["id"]: m["buckets"] for m in status["members"]} == {"n1": 2048, "n2": 2048}
    human = farmctl("status", "--netns", "tcli-n2").stdout
    assert "n1" in human and "50.0%" in human and "health: ok" in human

    table = json.loads(farmctl("table", "--netns", "tcli-n1", "--json").stdout)
    assert table["bucket_count"] == 4096 and table["unowned"] == 0
    assert {n["node_id"]: n["buckets"] for n in table["nodes"]} == {"n1": 2048, "n2": 2048}
    covered = sorted(b for n in table["nodes"] for r in n["ranges"] for b in range(r["first"], r["last"] + 1))
    assert covered == list(range(4096))
    assert "n1" in farmctl("table", "--netns", "tcli-n1").stdout
    members = json.loads(farmctl("members", "--netns", "tcli-n2", "--json").stdout)
    assert [m["id"] for m in members] == ["n1", "n2"] and all(m["state"] == "active" for m in members)

    # the app answers through the VIP from the client host
    cp = subprocess.run(["ip", "netns", "exec", "tcli-client", sys.executable, "-c",
                         "import urllib.request;print(urllib.request.urlopen('http://198.18.0.100/',timeout=5)"
                         ".read().decode().strip())"], capture_output=True, text=True, timeout=30)
    assert cp.stdout.strip() in {"n1", "n2"}

    # a crashed run: the state directory is gone, processes and namespaces remain
    shutil.rmtree(os.path.join(labdir["NLBFARM_LAB_DIR"], PREFIX))
    bad = farmctl("lab", "status", "--prefix", PREFIX, env=labdir, check=False)
    assert bad.returncode == 3 and "no lab 'tcli' is up" in bad.stderr
    down = farmctl("lab", "down", "--prefix", PREFIX, env=labdir).stdout
    assert "removed 5 namespaces" in down
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tcli-" not in left
    procs = subprocess.run(["pgrep", "-af", "tcli"], capture_output=True, text=True).stdout
    assert "farmd" not in procs and "nlbfarm" not in procs


def test_bad_arguments_get_clear_errors(labdir):
    cp = farmctl("lab", "up", "--prefix", "Bad_Prefix!", env=labdir, check=False)
    assert cp.returncode == 3 and "lab prefix 'Bad_Prefix!' must be 1-8 lowercase letters" in cp.stderr
    cp = farmctl("lab", "up", "--nodes", "0", "--prefix", PREFIX, env=labdir, check=False)
    assert cp.returncode == 3 and "--nodes must be from 1 to 64, got 0" in cp.stderr
    cp = farmctl("status", "--netns", "does-not-exist", check=False)
    assert cp.returncode == 2 and "network namespace 'does-not-exist' does not exist" in cp.stderr
    cp = farmctl("status", "--target", "127.0.0.1:1", "--timeout", "0.5", check=False)
    assert cp.returncode == 4 and "cannot get status from 127.0.0.1:1" in cp.stderr  # unreachable
    cp = farmctl("frobnicate", check=False)
    assert cp.returncode == 2 and "invalid choice" in cp.stderr
