"""The agent towards an etcd with TLS, client-certificate authentication and user/password auth.

One etcd per module, on random loopback ports, with a CA made at test time
(``pki``): ``--cert-file --key-file --trusted-ca-file --client-cert-auth``,
then ``etcdctl user add`` / ``role`` / ``auth enable``. The agent works with CA,
client certificate, user and password; each thing missing or wrong is
refused with a message from nlbfarm that names it; no secret reaches a log.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from nlbfarm.config import parse_config
from nlbfarm.coordinator.etcd import EtcdStore, etcd3
from nlbfarm.coordinator.store import StoreAuthError
from nlbfarm.errors import ConfigError, StoreError, StoreUnavailable
from nlbfarm.node.agent import Agent
from nlbfarm.node.standins import NoVip, RecordingDataPlane

pytestmark = pytest.mark.integration

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL_BIN = shutil.which("etcdctl") or "/usr/bin/etcdctl"
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TlsEtcd:
    """One etcd member serving only TLS with client-certificate auth; auth enabled after start."""

    def __init__(self, root: Path, pki):
        self.root = root
        self.pki = pki
        self.data_dir = root / "data"
        self.log_path = root / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen | None = None
        self.root_password = secrets.token_hex(12)
        self.user = "farm"
        self.password = "pw-" + secrets.token_hex(16)
        self.password_file = root / "etcd-password"
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)

    def _argv(self) -> list[str]:
        url = f"https://{self.endpoint}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        name = "nlbfarm-tls-test"
        return [ETCD_BIN, "--name", name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{name}={peer}", "--initial-cluster-token", f"{name}-{self.client_port}",
                "--cert-file", self.pki.etcd.crt, "--key-file", self.pki.etcd.key,
                "--trusted-ca-file", self.pki.ca.crt, "--client-cert-auth",
                "--election-timeout", "500", "--heartbeat-interval", "50",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            c = etcd3.client("127.0.0.1", self.client_port, timeout=1.0, ca_cert=self.pki.ca.crt,
                             cert_cert=self.pki.client.crt, cert_key=self.pki.client.key)
            try:
                c.status()
                return
            except Exception as exc:
                last = exc
            finally:
                c.close()
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"TLS etcd not up within {START_TIMEOUT_S}s: {last!r}; {self.log_tail()}")

    def etcdctl(self, *args: str) -> str:
        cp = subprocess.run(
            [ETCDCTL_BIN, "--endpoints", f"https://{self.endpoint}", "--cacert", self.pki.ca.crt,
             "--cert", self.pki.client.crt, "--key", self.pki.client.key, *args],
            capture_output=True, text=True, timeout=20, env={**os.environ, "ETCDCTL_API": "3"})
        if cp.returncode != 0:
            raise RuntimeError(f"etcdctl {args[:3]} failed: {cp.stderr}")
        return cp.stdout

    def enable_auth(self) -> None:
        self.etcdctl("user", "add", f"root:{self.root_password}")
        self.etcdctl("user", "add", f"{self.user}:{self.password}")
        self.etcdctl("role", "add", "farm")
        self.etcdctl("role", "grant-permission", "farm", "--prefix=true", "readwrite", "/nlbfarm/")
        self.etcdctl("user", "grant-role", self.user, "farm")
        self.etcdctl("auth", "enable")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory, pki):
    if not (os.access(ETCD_BIN, os.X_OK) and os.access(ETCDCTL_BIN, os.X_OK)):
        pytest.skip("etcd / etcdctl not found")
    server = TlsEtcd(tmp_path_factory.mktemp("tls-etcd"), pki)
    atexit.register(server.kill)  # last resort if the teardown never runs
    try:
        server.start()
        server.enable_auth()
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd(tls_etcd):
    tls_etcd.start()  # a test may have restarted it
    return tls_etcd


def secure_store(e: TlsEtcd, **overrides) -> EtcdStore:
    kw = dict(timeout=1.0, retry_deadline=3.0, ca_file=e.pki.ca.crt, cert_file=e.pki.client.crt,
              key_file=e.pki.client.key, username=e.user, password_file=str(e.password_file))
    kw.update(overrides)
    return EtcdStore([e.endpoint], **kw)


def agent_config(e: TlsEtcd, cluster: str, node: str = "n1", **etcd_overrides):
    etcd = {"endpoints": [e.endpoint], "timeout": 1.0, "retry_deadline": 3.0,
            "ca_file": e.pki.ca.crt, "cert_file": e.pki.client.crt, "key_file": e.pki.client.key,
            "username": e.user, "password_file": str(e.password_file), **etcd_overrides}
    return parse_config({
        "node": {"id": node, "addresses": ["198.18.0.11"]},
        "cluster": {"name": cluster, "vips": ["198.18.0.100"], "buckets": 64},
        "etcd": {k: v for k, v in etcd.items() if v is not None},
    })


@pytest.fixture
def cluster():
    return f"t{uuid.uuid4().hex[:8]}"


def test_agent_registers_through_tls_client_cert_and_password(etcd, cluster, caplog):
    """The membership steps of farmd (as test_membership does them) with CA, client cert, user, password."""
    caplog.set_level(logging.DEBUG)
    a = Agent(agent_config(etcd, cluster))
    try:
        assert a.store.tls and a.store.username == "farm"
        a._wait_for_etcd()
        a.settings = a._ensure_settings()
        a._register()
        kv = a.store.get(f"/nlbfarm/{cluster}/members/n1")
        assert kv.lease == a.lease_id and json.loads(kv.value)["id"] == "n1"
        assert a.store.refresh_lease(a.lease_id) > 0  # the lease keepalive stream carries the token
        # A watch (driven by the store itself) sees changes: its stream is authenticated too.
        seen, got = [], threading.Event()

        def on_event(ev):
            seen.append(ev)
            if ev.kind == "put" and ev.key.endswith("/probe"):
                got.set()

        w = a.store.watch_prefix(f"/nlbfarm/{cluster}/", on_event)
        try:
            deadline = time.monotonic() + 10
            while not any(e.kind == "resync" for e in seen) and time.monotonic() < deadline:
                time.sleep(0.02)
            a.store.put(f"/nlbfarm/{cluster}/probe", b"1")
            assert got.wait(5), [e.kind for e in seen]
        finally:
            w.cancel()
        a.store.revoke_lease(a.lease_id)
        a.keeper.release()
    finally:
        a.store.close()
    assert_no_secret(etcd, caplog.text)


def test_failover_to_the_next_endpoint_authenticates_there(etcd):
    """A dead first endpoint: the store moves on, and the new connection gets its own TLS and token."""
    s = EtcdStore(["127.0.0.1:1", etcd.endpoint], timeout=1.0, retry_deadline=5.0, ca_file=etcd.pki.ca.crt,
                  cert_file=etcd.pki.client.crt, key_file=etcd.pki.client.key, username=etcd.user,
                  password_file=str(etcd.password_file))
    try:
        s.put("/nlbfarm/failover", b"1")
        assert s.endpoint == etcd.endpoint and s.get("/nlbfarm/failover").value == b"1"
    finally:
        s.close()


def test_the_password_alone_is_not_enough_without_a_client_certificate(etcd):
    """--client-cert-auth: a TLS client without a certificate is refused at the handshake."""
    s = secure_store(etcd, cert_file=None, key_file=None, timeout=0.5, retry_deadline=1.0)
    try:
        with pytest.raises(StoreUnavailable) as ei:
            s.get("/nlbfarm/x")
    finally:
        s.close()
    msg = str(ei.value)
    assert "requires a client certificate (set etcd.cert_file and etcd.key_file)" in msg, msg
    assert etcd.password not in msg


def test_a_certificate_from_another_ca_is_refused(etcd, pki):
    s = secure_store(etcd, cert_file=pki.stranger.crt, key_file=pki.stranger.key, timeout=0.5,
                     retry_deadline=1.0)
    try:
        with pytest.raises(StoreUnavailable, match="etcd refused the client certificate in etcd.cert_file"):
            s.get("/nlbfarm/x")
    finally:
        s.close()


def test_wrong_password_is_refused_at_once_with_a_clear_message(etcd, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + secrets.token_hex(8)
    pw = tmp_path / "pw"
    pw.write_text(wrong + "\n")
    s = secure_store(etcd, password_file=str(pw))
    started = time.monotonic()
    try:
        with pytest.raises(StoreAuthError) as ei:
            s.get("/nlbfarm/x")
    finally:
        s.close()
    assert time.monotonic() - started < 2, "wrong credentials are not worth retrying"
    msg = str(ei.value)
    assert f"etcd at {etcd.endpoint} refused user 'farm': wrong user name or password" in msg
    assert "etcd.password_file" in msg
    assert wrong not in msg and wrong not in caplog.text and wrong not in repr(ei.value)


def test_unknown_user_is_refused(etcd):
    s = secure_store(etcd, username="nobody")
    try:
        with pytest.raises(StoreAuthError, match="refused user 'nobody'"):
            s.put("/nlbfarm/x", b"1")
    finally:
        s.close()


def test_no_credentials_on_an_etcd_with_auth_names_the_missing_settings(etcd):
    """Client certificate only: its CN is no etcd user, so etcd denies every key."""
    s = secure_store(etcd, username=None, password_file=None)
    try:
        with pytest.raises(StoreError) as ei:
            s.get("/nlbfarm/x")
    finally:
        s.close()
    assert "etcd has authentication on: set etcd.username and etcd.password_file" in str(ei.value)


def test_a_user_without_permission_outside_its_prefix_is_told_so(etcd):
    s = secure_store(etcd)
    try:
        with pytest.raises(StoreError, match="etcd user 'farm' has no read-write permission"):
            s.put("/elsewhere/x", b"1")
    finally:
        s.close()


def test_plaintext_client_against_tls_etcd_is_told_to_set_ca_file(etcd):
    s = EtcdStore([etcd.endpoint], timeout=0.5, retry_deadline=1.0)
    try:
        with pytest.raises(StoreUnavailable, match="if it serves TLS \\(https\\), set etcd.ca_file"):
            s.get("/nlbfarm/x")
    finally:
        s.close()


def test_untrusted_server_certificate_is_named(etcd, pki):
    s = secure_store(etcd, ca_file=pki.other_ca.crt, timeout=0.5, retry_deadline=1.0)
    try:
        with pytest.raises(StoreUnavailable, match="etcd's certificate is not signed by the CA in etcd.ca_file"):
            s.get("/nlbfarm/x")
    finally:
        s.close()


def test_an_expired_token_is_replaced_without_the_caller_noticing(etcd):
    s = secure_store(etcd, timeout=3.0, retry_deadline=10.0)
    try:
        s.put("/nlbfarm/tok", b"1")
        client, _ = s._current()
        # As if etcd had forgotten our token. (A simple token ends in the raft
        # index it was issued at; etcd waits for that index, so use a past one.)
        client.metadata = (("token", "forgotten.1"),)
        assert s.get("/nlbfarm/tok").value == b"1"
        now, _ = s._current()
        assert now.metadata != (("token", "forgotten.1"),)
        if now is client:  # normally: re-authenticated on the same connection, no endpoint switch
            assert dict(client.metadata)["token"]
    finally:
        s.close()


def test_watch_survives_an_etcd_restart_that_invalidates_its_token(etcd, cluster):
    """etcd keeps simple tokens in memory: after a restart the watch must authenticate again."""
    prefix = f"/nlbfarm/{cluster}/"
    s = secure_store(etcd, retry_deadline=10.0)
    seen, listed, got = [], threading.Event(), threading.Event()

    def on_event(ev):
        seen.append(ev)
        if ev.kind == "resync":
            listed.set()
        if ev.kind == "put" and ev.key == prefix + "after":
            got.set()

    w = s.watch_prefix(prefix, on_event)
    try:
        assert listed.wait(10), "the watch never listed the prefix"
        s.put(prefix + "before", b"1")  # after the first listing: delivered as an event
        etcd.stop()
        etcd.start()
        s.put(prefix + "after", b"2")  # the unary path re-authenticates too
        assert got.wait(15), [(e.kind, e.key) for e in seen]
        assert [e.key for e in seen if e.kind == "put"] == [prefix + "before", prefix + "after"]
    finally:
        w.cancel()
        s.close()


def test_config_refuses_inline_passwords_and_names_bad_files(etcd, tmp_path):
    base = {"node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100"]}}
    with pytest.raises(ConfigError) as ei:
        parse_config({**base, "etcd": {"endpoints": [etcd.endpoint], "username": "farm",
                                       "password": "hunter2-inline"}})
    assert "etcd: password: the etcd password is not accepted in the configuration" in str(ei.value)
    assert "hunter2-inline" not in str(ei.value)
    with pytest.raises(ConfigError, match=r"etcd.cert_file: cannot read /nonexistent/c.pem: No such file"):
        parse_config({**base, "etcd": {"endpoints": [etcd.endpoint], "ca_file": etcd.pki.ca.crt,
                                       "cert_file": "/nonexistent/c.pem", "key_file": etcd.pki.client.key}})
    with pytest.raises(ConfigError, match="etcd: cert_file and key_file go together"):
        parse_config({**base, "etcd": {"endpoints": [etcd.endpoint], "ca_file": etcd.pki.ca.crt,
                                       "cert_file": etcd.pki.client.crt}})
    with pytest.raises(ConfigError, match="etcd.key_file: .* does not hold a PEM private key"):
        parse_config({**base, "etcd": {"endpoints": [etcd.endpoint], "ca_file": etcd.pki.ca.crt,
                                       "cert_file": etcd.pki.client.crt, "key_file": etcd.pki.client.crt}})
    with pytest.raises(ConfigError, match="etcd: username and password_file go together"):
        parse_config({**base, "etcd": {"endpoints": [etcd.endpoint], "username": "farm"}})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="etcd.password_file: .* is empty"):
        parse_config({**base, "etcd": {"endpoints": [etcd.endpoint], "username": "farm",
                                       "password_file": str(empty)}})
    with pytest.raises(ConfigError, match="endpoints use https:// but ca_file is not set"):
        parse_config({**base, "etcd": {"endpoints": [f"https://{etcd.endpoint}"]}})
    cfg = agent_config(etcd, "c")
    for text in (repr(cfg), str(cfg), cfg.model_dump_json()):
        assert etcd.password not in text


def assert_no_secret(e: TlsEtcd, *texts: str) -> None:
    for t in texts:
        assert e.password not in t, "the etcd password leaked"
        assert e.root_password not in t


def test_no_secret_in_logs_farmctl_output_or_metrics(etcd, pki, cluster, tmp_path, caplog, capsys,
                                                     monkeypatch):
    """A whole agent on TLS etcd with auth, its API with mutual TLS and a token; then every log line,
    every farmctl output and the metrics are searched for the password, the token and etcd's auth token."""
    from prometheus_client import generate_latest

    from nlbfarm import cli
    from nlbfarm.node.status import read_token, serve_status

    for var in ("NLBFARM_TLS_CA", "NLBFARM_TLS_CERT", "NLBFARM_TLS_KEY", "NLBFARM_CONFIG", "NLBFARM_TARGET",
                "NLBFARM_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(tmp_path / "none.yaml"))
    caplog.set_level(logging.DEBUG)
    api_token = "tok-" + secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(api_token + "\n")
    token_file.chmod(0o600)
    cfg_path = tmp_path / "farmd.yaml"
    cfg_path.write_text(json.dumps({
        "node": {"id": "n1", "addresses": ["198.18.0.11"]},
        "cluster": {"name": cluster, "vips": ["198.18.0.100"], "buckets": 64},
        "etcd": {"endpoints": [etcd.endpoint], "timeout": 1.0, "retry_deadline": 3.0, "ca_file": pki.ca.crt,
                 "cert_file": pki.client.crt, "key_file": pki.client.key, "username": etcd.user,
                 "password_file": str(etcd.password_file)},
        "status": {"listen": "127.0.0.1:0", "token_file": str(token_file), "tls_cert_file": pki.node.crt,
                   "tls_key_file": pki.node.key, "tls_client_ca_file": pki.ca.crt},
    }))
    from nlbfarm.config import load_config
    cfg = load_config(cfg_path)
    agent = Agent(cfg, dataplane=RecordingDataPlane(), vip=NoVip())
    servers = []
    outputs = []
    try:
        agent.start()
        servers = serve_status(agent, cfg.status.listen, None, read_token(cfg.status.token_file),
                               tls_cert_file=cfg.status.tls_cert_file, tls_key_file=cfg.status.tls_key_file,
                               tls_client_ca_file=cfg.status.tls_client_ca_file)
        target = f"127.0.0.1:{servers[0].bound_port}"
        deadline = time.monotonic() + 10
        while agent.local.accepting != frozenset(range(64)) and time.monotonic() < deadline:
            agent.last_sentence = agent.cycle()
            time.sleep(0.05)
        assert len(agent.local.accepting) == 64, agent.last_sentence
        tls = ["--target", target, "--tls-ca", pki.ca.crt, "--tls-cert", pki.node.crt, "--tls-key", pki.node.key]
        # Each command with the exit code it must give: every one worked (0) but
        # the drain with a wrong token, which is refused (2, an error).
        for argv, want in ((["status", *tls], 0), (["status", "--json", *tls], 0), (["node", "--json", *tls], 0),
                           (["members", *tls], 0), (["drain", "n1", "--token-file", str(token_file), *tls], 0),
                           (["undrain", "n1", "--token-file", str(token_file), *tls], 0),
                           (["drain", "n1", "--token-file", str(etcd.password_file), *tls], 2),  # a wrong token
                           (["events", *tls], 0)):
            rc = cli.main(argv)
            out, err = capsys.readouterr()
            assert rc == want, (argv, rc, out, err)
            outputs += [out, err]
        assert "wrong token" in outputs[-3]
        outputs.append(generate_latest(agent.metrics.registry).decode())
        assert "nlbfarm_agent_info" in outputs[-1]
        outputs += [repr(cfg), repr(agent.store.__dict__), json.dumps(agent.status()), json.dumps(agent.node_view())]
        etcd_token = dict(agent.store._current()[0].metadata)["token"]
    finally:
        for s in servers:
            s.stop(None)
        agent.stopping.set()
        agent.shutdown()
    texts = outputs + [caplog.text]
    assert_no_secret(etcd, *texts)
    for t in texts:
        assert api_token not in t, "the API token leaked"
        assert etcd_token not in t, "etcd's auth token leaked"


def test_an_unreadable_certificate_during_a_reconnect_is_retried_not_fatal(etcd, cluster, tmp_path, caplog):
    """A certificate renewal that briefly removes the files while the store reconnects:
    calls fail with etcd unreachable naming the file, the watch thread keeps trying, and
    both work again once the files are back."""
    caplog.set_level(logging.WARNING)
    files = {}
    for name, src in (("ca.crt", etcd.pki.ca.crt), ("client.crt", etcd.pki.client.crt),
                      ("client.key", etcd.pki.client.key)):
        files[name] = tmp_path / name
        shutil.copy(src, files[name])
    prefix = f"/nlbfarm/{cluster}/"
    # The first endpoint is dead, so the first call has to reconnect (to the real one).
    s = EtcdStore(["127.0.0.1:1", etcd.endpoint], timeout=0.5, retry_deadline=1.0, ca_file=str(files["ca.crt"]),
                  cert_file=str(files["client.crt"]), key_file=str(files["client.key"]), username=etcd.user,
                  password_file=str(etcd.password_file))
    got = threading.Event()
    w = None
    try:
        for p in files.values():
            p.rename(p.with_name(p.name + ".renewing"))
        with pytest.raises(StoreUnavailable, match=r"cannot reconnect to etcd at .*cannot read .*ca\.crt"):
            s.get(prefix + "x")
        def on_event(ev):
            # The put may land before the watch is back: then its first listing
            # (a resync) carries the key instead of a put event.
            if ev.key == prefix + "after" or (ev.kind == "resync" and prefix + "after" in (ev.snapshot or {})):
                got.set()

        w = s.watch_prefix(prefix, on_event)
        time.sleep(1.5)  # the watch fails over and over meanwhile
        assert w._thread.is_alive(), "the watch thread died on an unreadable certificate"
        assert "watch cannot reconnect" in caplog.text
        for p in files.values():
            p.with_name(p.name + ".renewing").rename(p)
        deadline = time.monotonic() + 15
        while True:
            try:
                s.put(prefix + "after", b"1")
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert s.endpoint == etcd.endpoint
        assert got.wait(15), "the watch did not deliver once the certificate was back"
    finally:
        if w is not None:
            w.cancel()
        s.close()
