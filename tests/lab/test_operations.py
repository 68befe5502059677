"""Operating the farm for real: Debian's nginx as the farm module, health checks that
withdraw a node and bring it back, farmctl (status, node, events, drain) against
live agents, the API refusing changes without credentials, and Prometheus metrics
scraped over HTTP.

One lab (prefix "tops") of three nodes, each running nginx started by its farmd.
Each test leaves all three nodes active.
"""
import json
import signal
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nlbfarm.analysis import failures, read_results, shares
from nlbfarm.lab import ETCD_PREFIX, Lab

NODES = ["n1", "n2", "n3"]
INTERVAL, FALL, RISE = 0.5, 2, 2


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(prefix="tops", state_root=tmp_path_factory.mktemp("labstate"), app="nginx",
              check_interval=INTERVAL, check_fall=FALL, check_rise=RISE)
    with lab.running(nodes=3, wait=60):
        yield lab


def farmctl_json(lab, node, *args):
    cp = lab.farmctl(node, *args, "--json")
    assert cp.returncode in (0, 1), f"farmctl {args} rc={cp.returncode}: {cp.stderr}"
    return cp.returncode, json.loads(cp.stdout)


def member(snap, node):
    return snap.members.get(node)


def wait_for(what, pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")


def scrape(lab, node) -> dict:
    """GET /metrics inside the node's namespace (the endpoint binds loopback) and parse it."""
    cp = lab.run(node, ["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9740/metrics"])
    out = {}
    for fam in text_string_to_metric_families(cp.stdout):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(metrics, name, **labels):
    return metrics.get((name, tuple(sorted(labels.items()))))


def test_nginx_started_by_the_module_serves_every_node(lab):
    snap = lab.wait_converged(NODES, timeout=30)
    assert all(member(snap, n).state == "active" for n in NODES)
    for n in NODES:
        assert lab.alive(n, "app"), f"{n}: nginx (started by farmd's module) is not running"
        rc, v = farmctl_json(lab, n, "node")
        assert rc == 0 and v["state"] == "active" and v["state_reason"] == "all checks passing"
        assert {c["name"]: c["state"] for c in v["checks"]} == {"http": "passing", "master": "passing"}
        assert v["module"] == "nginx"


def test_nginx_failure_withdraws_the_node_and_its_return_brings_it_back(lab, tmp_path):
    lab.wait_converged(NODES, timeout=30)
    out = tmp_path / "load.jsonl"
    events = subprocess.Popen(["ip", "netns", "exec", lab.ns("n1"), lab.farmctl_bin, "events", "--follow",
                               "--new-only", "--for", "40", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # timeout 3 s: like a real client, SYNs dropped during a handover are retransmitted after 1 s.
    load = subprocess.Popen(lab.loadclient_argv(count=100000, duration=30, out=out, workers=2,
                                                interval=0.01, timeout=3.0),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        t_stop = time.time()
        lab.stop_nginx("n2")
        # Withdrawn within the check window (interval x fall), plus the table
        # write and the handover: no lease has to expire.
        window = INTERVAL * FALL
        snap = wait_for("n2 withdrawn", lambda: (s := lab.snapshot()) and s.table
                        and "n2" not in s.counts() and member(s, "n2").state == "failed" and s, timeout=window + 5)
        t_out = time.time()
        took = t_out - t_stop
        assert took < window + 2.5, f"n2 left the table {took:.1f}s after nginx stopped (window {window}s)"
        assert "check http failing" in member(snap, "n2").reason
        assert member(snap, "n2") is not None, "a failed node keeps its lease: no lease wait involved"
        lab.wait_converged(["n1", "n3"], timeout=10)

        rc, st = farmctl_json(lab, "n1", "status")
        assert rc == 1 and any("n2 is failed" in p for p in st["problems"]), st["problems"]
        rc, v = farmctl_json(lab, "n2", "node")
        assert rc == 1 and v["state"] == "failed" and v["owned_buckets"] == 0
        assert {c["name"]: c["state"] for c in v["checks"]}["http"] == "failing"
        m = scrape(lab, "n2")
        assert sample(m, "nlbfarm_check_up", check="http", type="http") == 0
        assert sample(m, "nlbfarm_node_state", state="failed") == 1
        assert sample(m, "nlbfarm_owned_buckets") == 0

        time.sleep(4)
        t_start = time.time()
        lab.start_nginx("n2")
        lab.wait_converged(NODES, timeout=INTERVAL * RISE + 10)
        t_back = time.time()
        time.sleep(3)
    finally:
        load.wait(timeout=60)
        events.send_signal(signal.SIGINT)  # farmctl events --follow ends on Ctrl-C
        ev_out, ev_err = events.communicate(timeout=30)
    assert events.returncode == 0, ev_err
    results = read_results(out)
    # While n2 was out, its buckets were served by n1 and n3 without a failure
    # (from one second after the withdraw, for clients that raced the handover).
    during = [r for r in results if t_out + 1 <= r["t"] < t_start]
    assert len(during) > 100
    assert not failures(results, t_out + 1, t_start), failures(results, t_out + 1, t_start)[:5]
    assert set(shares(results, t_out + 1, t_start)) == {"n1", "n3"}
    # Back: n2 serves again and nothing fails after the return settled.
    assert "n2" in shares(results, t_back + 0.5)
    assert not failures(results, t_back + 0.5), failures(results, t_back + 0.5)[:5]
    # Failures are confined to the check window around the stop.
    bad = failures(results)
    marks = {"stop": t_stop, "out": t_out, "start": t_start, "back": t_back}
    assert all(t_stop - 0.1 <= r["t"] < t_out + 1 for r in bad), (
        [r for r in bad if not t_stop - 0.1 <= r["t"] < t_out + 1][:5], marks)

    evs = [json.loads(line) for line in ev_out.splitlines() if line.strip()]
    states = [(e["node_id"], e["fields"].get("old"), e["fields"].get("new")) for e in evs
              if e["kind"] == "member_state"]
    assert ("n2", "active", "failed") in states and ("n2", "failed", "active") in states, evs
    assert any(e["kind"] == "table_changed" for e in evs)
    # n2 itself saw its check fall and rise.
    cp = lab.farmctl("n2", "events", "--json")
    own = [json.loads(line) for line in cp.stdout.splitlines()]
    flips = [(e["fields"]["check"], e["fields"]["new"]) for e in own if e["kind"] == "check_transition"]
    assert ("http", "failing") in flips and flips[-1][1] == "passing"


def test_changes_need_the_token(lab, tmp_path):
    lab.wait_converged(NODES, timeout=30)
    farmctl = lab.farmctl_bin
    no_token = lab.run("n1", [farmctl, "drain", "n2"], check=False)
    assert no_token.returncode == 2 and "UNAUTHENTICATED" in no_token.stderr, no_token.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 48 + "\n")
    bad = lab.run("n1", [farmctl, "drain", "n2", "--token-file", str(wrong)], check=False)
    assert bad.returncode == 2 and "wrong token" in bad.stderr, bad.stderr
    # Nothing was written: no drain request, n2 still active.
    cp = lab.run("etcd", ["etcdctl", "--endpoints", ",".join(lab.etcd_endpoints()), "get", "--prefix",
                          f"{ETCD_PREFIX}/lab/drain/", "--keys-only"])
    assert cp.stdout.strip() == ""
    assert member(lab.snapshot(), "n2").state == "active"

    # With the token, drain through the CLI works and completes; undrain brings n2 back.
    cp = lab.farmctl("n1", "drain", "n2", "--wait", "--wait-timeout", "30")
    assert cp.returncode == 0 and "n2 is drained" in cp.stdout, cp.stdout + cp.stderr
    snap = lab.snapshot()
    assert member(snap, "n2").state == "draining" and "n2" not in snap.counts()
    cp = lab.farmctl("n1", "undrain", "n2")
    assert cp.returncode == 0, cp.stderr
    lab.wait_converged(NODES, timeout=15)
    cp = lab.farmctl("n1", "events", "--json")
    kinds = [(e["kind"], e["node_id"]) for e in map(json.loads, cp.stdout.splitlines())]
    assert ("drain_requested", "n2") in kinds and ("undrain_requested", "n2") in kinds


def test_metrics_scraped_over_http(lab, tmp_path):
    lab.wait_converged(NODES, timeout=30)
    out = tmp_path / "load.jsonl"
    subprocess.run(lab.loadclient_argv(count=300, duration=20, out=out, workers=2), check=True, timeout=60)
    assert not failures(read_results(out))
    rc, st = farmctl_json(lab, "n1", "status")
    assert rc == 0 and st["healthy"]
    m = scrape(lab, "n1")
    owned = next(x for x in st["members"] if x["id"] == "n1")["buckets"]
    assert sample(m, "nlbfarm_members", state="active") == 3
    assert sample(m, "nlbfarm_node_state", state="active") == 1
    assert sample(m, "nlbfarm_owned_buckets") == owned == sample(m, "nlbfarm_accepting_buckets")
    assert sample(m, "nlbfarm_table_generation") == int(st["generation"])
    assert sample(m, "nlbfarm_applied_generation") == int(st["generation"])
    assert sample(m, "nlbfarm_fence_open") == 1
    assert sample(m, "nlbfarm_etcd_session", state="connected") == 1
    assert sample(m, "nlbfarm_check_up", check="http", type="http") == 1
    assert sample(m, "nlbfarm_check_up", check="master", type="process") == 1
    assert sample(m, "nlbfarm_apply_duration_seconds_count") >= 1
    assert sample(m, "nlbfarm_membership_change_to_apply_seconds_count") >= 1
    accepted = sample(m, "nlbfarm_packets_total", vip=st["vips"][0], rule="accepted")
    foreign = sample(m, "nlbfarm_packets_total", vip=st["vips"][0], rule="dropped_foreign")
    assert accepted > 0 and foreign > 0, (accepted, foreign)
    assert sample(m, "nlbfarm_bytes_total", vip=st["vips"][0], rule="accepted") > accepted * 40
    info = [k for k in m if k[0] == "nlbfarm_agent_info"]
    assert info and dict(info[0][1])["node"] == "n1"
    text = lab.run("n1", ["curl", "-sS", "http://127.0.0.1:9740/metrics"]).stdout
    assert open(lab.token_file).read().strip() not in text, "the API token must never be exported"


def restart_agent(lab, node):
    lab.kill(node, "agent", sig=signal.SIGTERM, wait=lab.timing.stop_drain_timeout + 15)
    assert not lab.alive(node), f"{node}'s farmd did not exit after SIGTERM"
    lab.start_agent(node)


def node_view(lab, node):
    return farmctl_json(lab, node, "node")[1]


def test_restart_action_with_loop_protection_then_stop_action(lab, tmp_path):
    """on_failure: restart runs stop+start at most restart_limit times in the window, then the
    node stays withdrawn until its checks pass; on_failure: stop stops the application and keeps
    the node out until the agent restarts."""
    marker = tmp_path / "n3.fail"
    gate = {"name": "gate", "type": "command", "command": f"test ! -e {marker}"}
    lab.module_overrides["n3"] = {"on_failure": "restart", "restart_limit": 1, "restart_window": 600,
                                  "extra_checks": [gate]}
    try:
        restart_agent(lab, "n3")
        lab.wait_converged(NODES, timeout=30)
        pid_before = lab.pid("n3", "app")
        marker.touch()
        wait_for("n3 restarted nginx once", lambda: node_view(lab, "n3")["restarts_in_window"] == 1,
                 timeout=INTERVAL * FALL + 5)
        wait_for("the loop protection", lambda: any(
            e["fields"].get("action") == "restart_limit"
            for e in map(json.loads, lab.farmctl("n3", "events", "--json").stdout.splitlines())), timeout=15)
        assert lab.pid("n3", "app") != pid_before and lab.alive("n3", "app"), "nginx was not restarted"
        v = node_view(lab, "n3")
        assert v["state"] == "failed" and v["restarts_in_window"] == 1 and "check gate failing" in v["state_reason"]
        assert "n3" not in lab.snapshot().counts()
        marker.unlink()  # the checks pass again: n3 rejoins by itself
        lab.wait_converged(NODES, timeout=INTERVAL * RISE + 10)

        lab.module_overrides["n3"] = {"on_failure": "stop", "extra_checks": [gate]}
        restart_agent(lab, "n3")
        lab.wait_converged(NODES, timeout=30)
        marker.touch()
        wait_for("n3 stopped", lambda: (m := member(lab.snapshot(), "n3")) and m.state == "stopped",
                 timeout=INTERVAL * FALL + 5)
        wait_for("nginx stopped by the module", lambda: not lab.alive("n3", "app"), timeout=15)
        lab.wait_converged(["n1", "n2"], timeout=10)
        marker.unlink()
        time.sleep(INTERVAL * RISE + 1)
        assert member(lab.snapshot(), "n3").state == "stopped", "a stopped node must wait for its agent's restart"
    finally:
        marker.unlink(missing_ok=True)
        lab.module_overrides.pop("n3", None)
        restart_agent(lab, "n3")
        lab.wait_converged(NODES, timeout=30)
