"""The gRPC API with TLS and mutual TLS, as farmctl and the peer probes use it.

Certificates come from the throwaway CA made at test time (``pki``). The
server is farmd's own (``serve_status``) in front of a stand-in agent.
"""
from __future__ import annotations

import json
import logging
import socket

import pytest

from nlbfarm import cli
from nlbfarm.config import parse_config
from nlbfarm.errors import ConfigError
from nlbfarm.node.events import EventBus
from nlbfarm.node.peers import Peer, PeerProbe, peer_tls
from nlbfarm.node.status import serve_status

pytestmark = pytest.mark.integration

TOKEN = "api-token-" + "5f3c9a0e7b1d2468ace0"


class FakeAgent:
    instance = "feedc0de"
    me = "n1"

    def __init__(self):
        self.events = EventBus()
        self.drained = []

    def status(self):
        return {"node_id": "n1", "cluster": "/nlbfarm/t", "generation": 1, "bucket_count": 64, "members": [],
                "applied_generation": 1, "owned_buckets": 64, "accepting_buckets": 64, "draining_buckets": 0,
                "fence_open": True, "etcd_state": "connected", "last_cycle": "ok", "vips": ["198.18.0.100"]}

    def etcd_reachability(self):
        return True, False, 3.0

    def request_drain(self, node, timeout):
        self.drained.append(node)
        return f"{node} is draining"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in ("NLBFARM_TLS_CA", "NLBFARM_TLS_CERT", "NLBFARM_TLS_KEY", "NLBFARM_TLS_SERVER_NAME",
                "NLBFARM_CONFIG", "NLBFARM_TARGET", "NLBFARM_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(tmp_path / "no-farmctl.yaml"))
    monkeypatch.setattr(cli, "DEFAULT_TOKEN_FILE", str(tmp_path / "no-token"))


@pytest.fixture
def serve():
    """serve(tls=..., mtls=..., peer=...) -> (main target, peer target or None, agent)."""
    started = []

    def start(pki=None, mtls=False, peer=False, token=TOKEN):
        agent = FakeAgent()
        kw = {}
        if pki is not None:
            kw = {"tls_cert_file": pki.node.crt, "tls_key_file": pki.node.key,
                  "tls_client_ca_file": pki.ca.crt if mtls else None}
        servers = serve_status(agent, "127.0.0.1:0", "127.0.0.1:0" if peer else None, token, **kw)
        started.extend(servers)
        targets = [f"127.0.0.1:{s.bound_port}" for s in servers]
        return targets[0], (targets[1] if peer else None), agent

    yield start
    for s in started:
        s.stop(None)


def farmctl(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_plaintext_stays_the_default(serve, capsys):
    target, _, _ = serve()
    rc, out, err = farmctl(capsys, "status", "--target", target, "--json")
    assert rc == 0 and json.loads(out)["node_id"] == "n1", err


def test_server_tls_works_with_tls_ca(serve, pki, capsys):
    target, _, _ = serve(pki)
    rc, out, err = farmctl(capsys, "status", "--target", target, "--tls-ca", pki.ca.crt, "--json")
    assert rc == 0 and json.loads(out)["node_id"] == "n1", err


def test_plaintext_farmctl_against_tls_is_told_to_give_a_ca(serve, pki, capsys):
    target, _, _ = serve(pki)
    rc, _, err = farmctl(capsys, "status", "--target", target)
    assert rc == 2
    assert f"the agent at {target} speaks TLS and farmctl connected in plaintext" in err, err
    assert "--tls-ca" in err


def test_tls_farmctl_against_plaintext_is_told_so(serve, pki, capsys):
    target, _, _ = serve()
    rc, _, err = farmctl(capsys, "members", "--target", target, "--tls-ca", pki.ca.crt)
    assert rc == 2 and f"the agent at {target} speaks plaintext" in err, err


def test_untrusted_server_certificate_is_named(serve, pki, capsys):
    target, _, _ = serve(pki)
    rc, _, err = farmctl(capsys, "status", "--target", target, "--tls-ca", pki.other_ca.crt)
    assert rc == 2 and f"not signed by the CA in {pki.other_ca.crt} (--tls-ca)" in err, err


def test_server_name_override_for_a_certificate_without_the_dialled_name(serve, pki, capsys):
    target, _, _ = serve(pki)
    by_name = target.replace("127.0.0.1", "localhost")  # not in the node certificate
    rc, _, err = farmctl(capsys, "status", "--target", by_name, "--tls-ca", pki.ca.crt)
    assert rc == 2 and "does not name localhost: give --tls-server-name" in err, err
    rc, out, err = farmctl(capsys, "status", "--target", by_name, "--tls-ca", pki.ca.crt,
                           "--tls-server-name", "n1.farm.test", "--json")
    assert rc == 0, err


def test_mutual_tls_refuses_a_client_without_certificate(serve, pki, capsys):
    target, _, _ = serve(pki, mtls=True)
    rc, _, err = farmctl(capsys, "status", "--target", target, "--tls-ca", pki.ca.crt)
    assert rc == 2
    assert f"the agent at {target} requires a client certificate (mutual TLS" in err, err
    assert "--tls-cert and --tls-key" in err


def test_mutual_tls_refuses_a_certificate_from_another_ca(serve, pki, capsys):
    target, _, _ = serve(pki, mtls=True)
    rc, _, err = farmctl(capsys, "status", "--target", target, "--tls-ca", pki.ca.crt,
                         "--tls-cert", pki.stranger.crt, "--tls-key", pki.stranger.key)
    assert rc == 2 and f"refused the client certificate {pki.stranger.crt} (--tls-cert)" in err, err


def test_mutual_tls_accepts_a_certificate_of_the_farm_ca(serve, pki, capsys):
    target, _, agent = serve(pki, mtls=True)
    rc, out, err = farmctl(capsys, "status", "--target", target, "--tls-ca", pki.ca.crt,
                           "--tls-cert", pki.node.crt, "--tls-key", pki.node.key, "--json")
    assert rc == 0 and json.loads(out)["node_id"] == "n1", err


def test_tls_settings_from_the_environment(serve, pki, capsys, monkeypatch):
    target, _, _ = serve(pki, mtls=True)
    monkeypatch.setenv("NLBFARM_TLS_CA", pki.ca.crt)
    monkeypatch.setenv("NLBFARM_TLS_CERT", pki.node.crt)
    monkeypatch.setenv("NLBFARM_TLS_KEY", pki.node.key)
    monkeypatch.setenv("NLBFARM_TARGET", target)
    rc, out, err = farmctl(capsys, "status", "--json")
    assert rc == 0 and json.loads(out)["node_id"] == "n1", err
    monkeypatch.delenv("NLBFARM_TLS_KEY")
    rc, _, err = farmctl(capsys, "status")
    assert rc == 2 and "--tls-cert and --tls-key go together" in err and "$NLBFARM_TLS_CERT" in err, err


def test_tls_settings_from_a_farmctl_yaml(serve, pki, capsys, tmp_path, monkeypatch):
    target, _, _ = serve(pki, mtls=True)
    f = tmp_path / "farmctl.yaml"
    f.write_text(f"target: '{target}'\ntls_ca: {pki.ca.crt}\ntls_cert: {pki.node.crt}\ntls_key: {pki.node.key}\n")
    rc, out, err = farmctl(capsys, "status", "--config", str(f), "--json")
    assert rc == 0, err
    monkeypatch.setenv("NLBFARM_CONFIG", str(f))  # the variable names the file too
    assert farmctl(capsys, "members")[0] == 0
    f.write_text("tls_cafile: /x\n")
    rc, _, err = farmctl(capsys, "status", "--config", str(f))
    assert rc == 2 and "unknown key tls_cafile" in err, err


def test_drain_over_mutual_tls_with_farmds_own_config(serve, pki, capsys, tmp_path, caplog):
    """On a node, `farmctl --config /etc/nlbfarm/farmd.yaml` uses the node's certificate and token."""
    caplog.set_level(logging.DEBUG)
    target, _, agent = serve(pki, mtls=True)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    farmd_yaml = tmp_path / "farmd.yaml"
    farmd_yaml.write_text(
        "node: {id: n1}\ncluster: {vips: [198.18.0.100]}\netcd: {endpoints: ['127.0.0.1:2379']}\n"
        f"status: {{listen: '{target}', token_file: {token}, tls_cert_file: {pki.node.crt}, "
        f"tls_key_file: {pki.node.key}, tls_client_ca_file: {pki.ca.crt}}}\n")
    rc, out, err = farmctl(capsys, "drain", "n2", "--config", str(farmd_yaml))
    assert rc == 0 and agent.drained == ["n2"], err
    rc, out2, err2 = farmctl(capsys, "status", "--config", str(farmd_yaml), "--json")
    assert rc == 0, err2
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-0123456789\n")
    rc, out3, err3 = farmctl(capsys, "drain", "n2", "--config", str(farmd_yaml), "--token-file", str(wrong))
    assert rc == 2 and "wrong token" in err3
    for text in (out, err, out2, err2, out3, err3, caplog.text):
        assert TOKEN not in text and "not-the-token-0123456789" not in text


def test_farmd_yaml_with_server_tls_only_needs_a_ca(pki, capsys, tmp_path):
    farmd_yaml = tmp_path / "farmd.yaml"
    farmd_yaml.write_text(f"status: {{tls_cert_file: {pki.node.crt}, tls_key_file: {pki.node.key}}}\n")
    rc, _, err = farmctl(capsys, "status", "--config", str(farmd_yaml))
    assert rc == 2 and "does not name the CA" in err and "give --tls-ca" in err, err
    rc, _, err = farmctl(capsys, "status", "--config", str(farmd_yaml), "--tls-ca", pki.ca.crt,
                         "--target", f"127.0.0.1:{free_port()}")
    assert rc == 4 and "cannot get status" in err  # got past the settings; nothing listens there (exit 4)


def status_config(pki, peer: bool, **status):
    return parse_config({
        "node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100"]},
        "etcd": {"endpoints": ["127.0.0.1:2379"]},
        "status": {"peer_listen": "198.18.0.11:7401" if peer else None, **status},
    })


def test_peers_use_the_node_certificate_over_mutual_tls(serve, pki, caplog):
    _, peer_target, _ = serve(pki, mtls=True, peer=True)
    cfg = status_config(pki, True, tls_cert_file=pki.node.crt, tls_key_file=pki.node.key,
                        tls_client_ca_file=pki.ca.crt)
    probe = PeerProbe("n2", timeout=2.0, tls=peer_tls(cfg.status))
    try:
        assert probe.etcd_down_for_all([Peer("n1", "feedc0de", peer_target)]) == (True, "1 peers cannot reach etcd either")
    finally:
        probe.close()
    caplog.set_level(logging.WARNING)
    plain = PeerProbe("n2", timeout=2.0, tls=None)  # a peer that does not speak TLS is not answered
    try:
        assert plain.etcd_down_for_all([Peer("n1", "feedc0de", peer_target)]) == (False, "peer n1 did not answer")
    finally:
        plain.close()
    stranger = PeerProbe("n2", timeout=2.0, tls=peer_tls(status_config(
        pki, True, tls_cert_file=pki.stranger.crt, tls_key_file=pki.stranger.key,
        tls_client_ca_file=pki.other_ca.crt).status))
    try:
        assert stranger.etcd_down_for_all([Peer("n1", "feedc0de", peer_target)])[0] is False
    finally:
        stranger.close()
    assert "peer probe failed on TLS peer=n1" in caplog.text and "untrusted-server" in caplog.text


@pytest.mark.parametrize("status, words", [
    ({"tls_cert_file": "/nonexistent/node.crt", "tls_key_file": "KEY"}, "status.tls_cert_file: cannot read"),
    ({"tls_cert_file": "CRT"}, "status: tls_cert_file and tls_key_file go together"),
    ({"tls_client_ca_file": "CA"}, "tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file"),
    ({"tls_cert_file": "CRT", "tls_key_file": "KEY", "peer_listen": "198.18.0.11:7401"},
     "peer_listen with TLS needs tls_client_ca_file"),
    ({"tls_cert_file": "KEY", "tls_key_file": "KEY"}, "status.tls_cert_file: "),
    ({"tls_cert_file": "CRT", "tls_key_file": "relative.key"}, "status.tls_key_file: must be an absolute path"),
])
def test_status_tls_config_errors_name_the_field(pki, status, words):
    files = {"CRT": pki.node.crt, "KEY": pki.node.key, "CA": pki.ca.crt}
    status = {k: files.get(v, v) for k, v in status.items()}
    with pytest.raises(ConfigError) as ei:
        parse_config({"node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100"]},
                      "etcd": {"endpoints": ["127.0.0.1:2379"]}, "status": status})
    assert words in str(ei.value), str(ei.value)


def test_farmd_check_validates_the_tls_files(pki, tmp_path):
    import subprocess
    import sys
    pw = tmp_path / "pw"
    pw.write_text("secret-password-value\n")

    def check(status_extra: str) -> subprocess.CompletedProcess:
        cfg = tmp_path / "farmd.yaml"
        cfg.write_text(
            "node: {id: n1}\ncluster: {vips: [198.18.0.100]}\n"
            f"etcd: {{endpoints: ['127.0.0.1:2379'], ca_file: {pki.ca.crt}, cert_file: {pki.client.crt}, "
            f"key_file: {pki.client.key}, username: farm, password_file: {pw}}}\n"
            f"status: {{tls_cert_file: {pki.node.crt}, {status_extra}}}\n")
        return subprocess.run([sys.executable, "-m", "nlbfarm.node.agent", "--config", str(cfg), "--check"],
                              capture_output=True, text=True, timeout=60)

    ok = check(f"tls_key_file: {pki.node.key}, tls_client_ca_file: {pki.ca.crt}")
    assert ok.returncode == 0 and "is valid" in ok.stdout, ok.stderr
    bad = check(f"tls_key_file: {tmp_path}/missing.key")
    assert bad.returncode == 2 and "status.tls_key_file: cannot read" in bad.stderr, bad.stderr
    for cp in (ok, bad):
        assert "secret-password-value" not in cp.stdout + cp.stderr
