"""The farm with TLS everywhere, as real processes: ``Lab(tls=True)``.

One lab (prefix "ttls") of three nodes for the module: etcd serves only
https with ``--client-cert-auth`` and authentication on (user ``farm``,
read-write on ``/nlbfarm/`` only); every farmd presents a client certificate
and reads its password from a file; every agent's API and peer listeners
speak mutual TLS with certificates of the lab's farm CA. The tests show the
farm converging and serving real TCP clients through the VIP, farmctl working
over mutual TLS (and refused without a client certificate), drain and
undrain, survivors taking over after ``kill -9`` of a farmd, etcd refusing
clients without a certificate or with a wrong password, and the etcd password
never reaching a log.

The integration tests (tests/integration/test_etcd_tls.py, test_api_tls.py)
cover each TLS and authentication failure of one agent in-process; this file
is the same configuration with real agents, nftables and traffic.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nlbfarm.analysis import failures, read_results, shares
from nlbfarm.lab import (CLUSTER_NAME, ETCD_ADDR, ETCD_CA, ETCD_CLIENT, ETCD_PREFIX, ETCD_USER, FARM_CA,
                         PEER_PORT, Lab, node_addr)

from labkit import agent_log, read_log

NODES = ["n1", "n2", "n3"]
# Beyond the lease TTL: etcd's lease reaping tick, the survivors' next cycle and
# two table generations (takeover, then every survivor applying it).
TAKEOVER_SLACK_S = 7.0
MEMBER_KEY = f"{ETCD_PREFIX}/{CLUSTER_NAME}/members/n1"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The TLS lab; always taken down, even when up() or a test fails.

    ``up()`` first removes whatever a crashed earlier run left behind.
    The logs stay in pytest's temporary directory for a post-mortem.
    """
    lab = Lab(prefix="ttls", state_root=tmp_path_factory.mktemp("labstate"), tls=True)
    try:
        lab.up(nodes=3, wait=60)
        yield lab
    finally:
        lab.down(keep_logs=True)
    assert lab.lab_namespaces() == [], "the TLS lab left namespaces behind"


def load(lab: Lab, out, count: int = 300, duration: float = 20) -> list[dict]:
    """New TCP connections from the client namespace to the VIP, bounded in count and time."""
    cp = subprocess.run(lab.loadclient_argv(count=count, duration=duration, out=out, workers=4, timeout=3.0),
                        capture_output=True, text=True, timeout=duration + 30)
    assert cp.returncode == 0, f"load client rc={cp.returncode}: {cp.stderr[-500:]}"
    return read_results(out)


def etcdctl_bare(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    """etcdctl in the etcd namespace with exactly ``args``: none of the lab's credentials.
    A refused TLS handshake is a timeout to etcdctl: keep it short."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    return lab.run("etcd", ["etcdctl", "--dial-timeout", "1s", "--command-timeout", "2s", *args],
                   check=False, timeout=20, env=dict(env, ETCDCTL_API="3"))


_PROBE = ("import sys; from nlbfarm import tls; ca, crt, key = (a or None for a in sys.argv[2:5]); "
          "print(tls.probe(sys.argv[1], tls.ClientTLS(ca, crt, key) if ca else None))")


def tls_problem(lab: Lab, target: str, ca: str = "", cert: str = "", key: str = "") -> str:
    """Why etcd refuses a handshake (nlbfarm.tls.probe, from the etcd namespace): etcdctl only
    says "context deadline exceeded". "None" means etcd accepted the TLS session."""
    return lab.run("etcd", [lab.python, "-c", _PROBE, target, ca, cert, key], timeout=20).stdout.strip()


def test_farmctl_lab_up_tls_status_and_down(tmp_path):
    """The operator's way in: `farmctl lab up --tls`. Runs before the module's lab exists."""
    farmctl = str(Path(sys.executable).with_name("farmctl"))
    env = dict(os.environ, NLBFARM_LAB_DIR=str(tmp_path))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([farmctl, *args], capture_output=True, text=True, timeout=120, env=env)

    try:
        cp = run("lab", "up", "--tls", "--nodes", "2", "--prefix", "ttlsc", "--json")
        assert cp.returncode == 0, cp.stderr
        up = json.loads(cp.stdout)
        assert up["etcd"]["endpoint"] == "https://198.18.0.2:2379" and up["tls"]["etcd_user"] == ETCD_USER
        cp = run("lab", "status", "--prefix", "ttlsc")
        config = up["agents"]["n1"]["config"]
        assert cp.returncode == 0 and f"farmctl status --netns ttlsc-n1 --config {config}" in cp.stdout, cp.stdout
        cp = run("status", "--netns", "ttlsc-n1", "--config", config, "--json")
        assert cp.returncode == 0 and json.loads(cp.stdout)["healthy"] is True, cp.stdout + cp.stderr
    finally:
        cp = run("lab", "down", "--prefix", "ttlsc")
    assert cp.returncode == 0 and "removed 5 namespaces" in cp.stdout, cp.stdout + cp.stderr


def test_the_tls_farm_converges_and_serves_through_the_vip(lab, tmp_path):
    snap = lab.wait_converged(NODES, timeout=10)
    assert sum(snap.counts().values()) == lab.buckets
    cfg = yaml.safe_load(lab.config_path("n1").read_text())
    etcd, status = cfg["etcd"], cfg["status"]
    assert all(ep.startswith("https://") for ep in etcd["endpoints"]), etcd["endpoints"]
    assert etcd["username"] == ETCD_USER and etcd["ca_file"] == lab.tls_cert(ETCD_CA).crt
    assert etcd["cert_file"] == lab.tls_cert(ETCD_CLIENT).crt and "password" not in etcd
    assert stat.S_IMODE(os.stat(etcd["password_file"]).st_mode) == 0o600
    assert status["tls_client_ca_file"] == lab.tls_cert(FARM_CA).crt
    for n in NODES:
        log = agent_log(lab, n)
        assert "transport=mutual TLS" in log, f"{n}'s API is not on mutual TLS"
        assert f"registered node={n}" in log
    results = load(lab, tmp_path / "load.jsonl")
    assert len(results) == 300
    assert failures(results) == []
    assert set(shares(results)) == set(NODES), shares(results)


def test_farmctl_over_mutual_tls_with_the_nodes_config(lab):
    cp = lab.farmctl("n1", "status", "--json")
    assert cp.returncode == 0, cp.stderr
    st = json.loads(cp.stdout)
    assert st["healthy"] is True and st["node_id"] == "n1" and st["etcd_state"] == "connected"
    assert {m["id"]: m["state"] for m in st["members"]} == {n: "active" for n in NODES}
    assert sum(int(m["buckets"]) for m in st["members"]) == lab.buckets
    members = json.loads(lab.farmctl("n3", "members", "--json").stdout)
    assert [m["id"] for m in members] == NODES
    # The peer listener across the lab's switch, as peers use it: n1's certificate as
    # client certificate, n2's certificate naming n2's address.
    cp = lab.farmctl("n1", "status", "--json", "--target", f"{node_addr(2)}:{PEER_PORT}")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["node_id"] == "n2"


def test_farmctl_without_a_client_certificate_is_refused(lab):
    ca = lab.tls_cert(FARM_CA).crt
    cp = lab.farmctl("n1", "status", "--tls-ca", ca, config=False)
    assert cp.returncode == 2, cp.stdout + cp.stderr
    assert ("the agent at 127.0.0.1:7400 requires a client certificate (mutual TLS: its "
            "status.tls_client_ca_file is set): give --tls-cert and --tls-key") in cp.stderr, cp.stderr
    # The agents' etcd client certificate is of another CA: it opens no agent API.
    etcd_client = lab.tls_cert(ETCD_CLIENT)
    cp = lab.farmctl("n1", "status", "--tls-ca", ca, "--tls-cert", etcd_client.crt, "--tls-key", etcd_client.key,
                     config=False)
    assert cp.returncode == 2 and f"refused the client certificate {etcd_client.crt}" in cp.stderr, cp.stderr
    cp = lab.farmctl("n1", "status", config=False)
    assert cp.returncode == 2 and "speaks TLS and farmctl connected in plaintext" in cp.stderr, cp.stderr


def test_drain_and_undrain_over_mutual_tls_move_the_buckets(lab, tmp_path):
    cp = lab.farmctl("n1", "drain", "n2", "--wait", "--wait-timeout", "30")
    assert cp.returncode == 0 and "n2 is drained" in cp.stdout, cp.stdout + cp.stderr
    snap = lab.wait_serving(["n1", "n3"], timeout=10)
    assert "n2" not in snap.counts() and sum(snap.counts().values()) == lab.buckets
    results = load(lab, tmp_path / "drained.jsonl", count=150)
    assert failures(results) == [] and set(shares(results)) == {"n1", "n3"}, shares(results)
    cp = lab.farmctl("n3", "undrain", "n2")
    assert cp.returncode == 0, cp.stderr
    snap = lab.wait_converged(NODES, timeout=15)
    assert snap.counts().get("n2", 0) > 0, snap.counts()


def test_etcd_refuses_no_certificate_and_a_wrong_password(lab):
    url = f"https://{ETCD_ADDR}:2379"
    ca, client = lab.tls_cert(ETCD_CA), lab.tls_cert(ETCD_CLIENT)
    with_cert = ["--endpoints", url, "--cacert", ca.crt, "--cert", client.crt, "--key", client.key]
    # The lab's own credentials read the farm's keys...
    assert lab.etcdctl("get", MEMBER_KEY, "--print-value-only").stdout.strip()
    # ...and nothing outside the farm's prefix: the role is limited to it.
    outside = lab.etcdctl("get", "/elsewhere", check=False)
    assert outside.returncode != 0 and "permission denied" in outside.stderr, outside.stderr
    # A plain etcdctl: plaintext to a TLS-only etcd.
    plain = etcdctl_bare(lab, "--endpoints", f"{ETCD_ADDR}:2379", "get", MEMBER_KEY)
    assert plain.returncode != 0 and MEMBER_KEY not in plain.stdout, plain.stdout + plain.stderr
    assert "context deadline exceeded" in plain.stderr, plain.stderr
    assert tls_problem(lab, f"{ETCD_ADDR}:2379") == "needs-tls"
    # TLS, etcd's CA, but no client certificate (--client-cert-auth).
    no_cert = etcdctl_bare(lab, "--endpoints", url, "--cacert", ca.crt, "get", MEMBER_KEY)
    assert no_cert.returncode != 0 and MEMBER_KEY not in no_cert.stdout, no_cert.stdout + no_cert.stderr
    assert "context deadline exceeded" in no_cert.stderr, no_cert.stderr
    assert tls_problem(lab, f"{ETCD_ADDR}:2379", ca.crt) == "cert-required"
    assert tls_problem(lab, f"{ETCD_ADDR}:2379", ca.crt, client.crt, client.key) == "None"  # the control
    # The client certificate and the farm user with a wrong password.
    wrong = etcdctl_bare(lab, *with_cert, "--user", ETCD_USER, "--password", "not-the-password", "get", MEMBER_KEY)
    assert wrong.returncode != 0 and MEMBER_KEY not in wrong.stdout, wrong.stdout + wrong.stderr
    assert "authentication failed, invalid user ID or password" in wrong.stderr, wrong.stderr
    # The client certificate alone: its CN is no etcd user, so it may read nothing.
    cert_only = etcdctl_bare(lab, *with_cert, "get", MEMBER_KEY)
    assert cert_only.returncode != 0 and MEMBER_KEY not in cert_only.stdout, cert_only.stdout + cert_only.stderr
    assert "permission denied" in cert_only.stderr, cert_only.stderr


def test_kill_9_of_a_farmd_survivors_take_over_within_the_lease_ttl(lab, tmp_path):
    ttl = lab.timing.lease_ttl
    lab.wait_converged(NODES, timeout=15)
    t_kill = time.monotonic()
    assert lab.kill("n3", "agent"), "n3's farmd was not running"
    snap = lab.wait_converged(["n1", "n2"], timeout=ttl + TAKEOVER_SLACK_S)
    took = time.monotonic() - t_kill
    print(f"takeover_s={took:.2f} lease_ttl_s={ttl}")
    assert set(snap.counts()) == {"n1", "n2"} and sum(snap.counts().values()) == lab.buckets
    assert took < ttl + TAKEOVER_SLACK_S, f"takeover took {took:.1f}s (lease TTL {ttl}s)"
    results = load(lab, tmp_path / "after-kill.jsonl", count=150)
    assert failures(results) == [] and set(shares(results)) == {"n1", "n2"}, shares(results)
    st = json.loads(lab.farmctl("n1", "status", "--json").stdout)
    assert "n3" not in {m["id"] for m in st["members"]}
    # n3 comes back with the same certificates and password file.
    lab.start_agent("n3")
    lab.wait_converged(NODES, timeout=20)


def test_the_etcd_password_never_reaches_a_log(lab):
    password = lab.etcd_password()
    root_password = lab.etcd_root_password_file.read_text().strip()
    agent_logs = sorted(lab.dir.glob("*.agent.log"))
    assert [p.name for p in agent_logs] == [f"{n}.agent.log" for n in NODES]
    files = [*lab.dir.glob("*.log"), *lab.dir.glob("*.yaml"), lab.dir / "lab.json"]
    for path in files:
        text = path.read_text(errors="replace")
        assert password not in text, f"the etcd password is in {path}"
        assert root_password not in text, f"etcd's root password is in {path}"
    # Not vacuous: every agent authenticated to etcd and registered (n3 twice, after its kill).
    for p in agent_logs:  # as written, and as a log pipeline reads it (logfmt unquoted)
        text = read_log(p)
        assert password not in text and root_password not in text, f"the etcd password is in {p}"
        assert "registered node=" in text
