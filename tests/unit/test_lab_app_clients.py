"""The lab app (nlbfarm.node.app) and the bounded lab clients over IPv4 and IPv6.

Everything runs on loopback (127.0.0.1 and ::1): one app process serves HTTP
and UDP on both families, and the clients (loadclient, udpprobe, holdclient)
must reach it over either. Bounded: a few connections, sub-second waits.
"""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from nlbfarm import holdclient, loadclient, udpprobe
from nlbfarm.node import app


def _have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 loopback (::1)")


def _free_port(kind: int) -> int:
    """A port free a moment ago on both 127.0.0.1 and ::1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, kind) as s6:
            s6.bind(("::1", 0))
            port = s6.getsockname()[1]
            with socket.socket(socket.AF_INET, kind) as s4:
                try:
                    s4.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port on both loopbacks")


class App:
    def __init__(self, tmp_path):
        self.name = "t1"
        self.port = _free_port(socket.SOCK_STREAM)
        self.udp_port = _free_port(socket.SOCK_DGRAM)
        self.log = tmp_path / "accept.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nlbfarm.node.app", "--name", self.name,
             "--listen", f"127.0.0.1:{self.port}", "--listen6", f"[::1]:{self.port}",
             "--udp-listen", f"127.0.0.1:{self.udp_port}", "--udp-listen6", f"[::1]:{self.udp_port}",
             "--accept-log", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            while True:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()
                with socket.socket(fam, socket.SOCK_DGRAM) as u:
                    u.settimeout(0.2)
                    try:
                        u.sendto(b"ready?", (host, self.udp_port))
                        if u.recv(100):
                            break
                    except OSError:
                        pass
                assert time.monotonic() < deadline, "app did not come up"
                time.sleep(0.05)
            while True:
                try:
                    socket.create_connection((host, self.port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "app did not come up"
                    time.sleep(0.05)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def accept_lines(self) -> list[list[str]]:
        return [line.split() for line in self.log.read_text().splitlines()]


@pytest.fixture(scope="module")
def lab_app(tmp_path_factory):
    a = App(tmp_path_factory.mktemp("labapp"))
    try:
        a.wait_ready()
        yield a
    finally:
        rc = a.stop()
    assert rc == 0, "the app must stop cleanly on SIGTERM"


@pytest.fixture
def keep_sigterm():
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def _http_get(family: int, host: str, port: int) -> tuple[bytes, int]:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect((host, port))
        local_port = s.getsockname()[1]
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data, local_port


# ---------------------------------------------------------------- the app

@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_app_answers_http_and_logs_the_plain_client_address(lab_app, family, host):
    data, local_port = _http_get(family, host, lab_app.port)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"X-Served-By: t1" in head
    assert body == b"t1\n"
    logged = [ln[1:3] for ln in lab_app.accept_lines()]
    assert [host, str(local_port)] in logged
    assert not any(ip.startswith("::ffff:") for ip, _ in logged)


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_app_echoes_udp(lab_app, family, host):
    with socket.socket(family, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(b"y" * 3000, (host, lab_app.udp_port))
        assert u.recv(100) == b"t1 3000\n"


@pytest.mark.parametrize("family, host", [(socket.AF_INET6, "::1"), (None, "::1")])
def test_v6_listener_is_v6_only(family, host):
    srv = app.AppServer((host, 0), "x", None, family)
    try:
        assert srv.socket.family == socket.AF_INET6
        assert srv.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        srv.server_close()


def test_v4_listener_stays_v4():
    srv = app.AppServer(("127.0.0.1", 0), "x", None)
    try:
        assert srv.socket.family == socket.AF_INET
    finally:
        srv.server_close()


@pytest.mark.parametrize("text, want", [
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::]:80", ("::", 80)),
    ("[2001:db8::100]:8080", ("2001:db8::100", 8080)),
    (":::80", ("::", 80)),
])
def test_parse_hostport(text, want):
    assert app.parse_hostport(text) == want


@pytest.mark.parametrize("argv", [
    ["--listen6", "127.0.0.1:80"],
    ["--listen6", "[::1]"],
    ["--udp-listen6", "[nope]:80"],
    ["--listen", ""],
])
def test_app_rejects_bad_listen_options(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        app.main(["--name", "x", *argv])
    assert exc.value.code == 2
    assert "listen" in capsys.readouterr().err


# ---------------------------------------------------------------- loadclient

@pytest.mark.parametrize("vip", ["127.0.0.1", "::1"])
def test_loadclient_reaches_the_app(lab_app, vip):
    res = loadclient.run(vip, lab_app.port, count=6, duration=10, interval=0, workers=2, timeout=2, out=None)
    assert len(res) == 6
    assert all(r["node"] == "t1" and r["error"] is None and "src" not in r for r in res)


def test_loadclient_v6_source_is_recorded(lab_app):
    rec = loadclient.one_request("::1", lab_app.port, 2, "::1")
    assert rec["node"] == "t1" and rec["src"] == "::1" and rec["error"] is None
    assert ["::1", str(rec["port"])] in [ln[1:3] for ln in lab_app.accept_lines()]


def test_loadclient_cli_over_v6(lab_app, tmp_path, keep_sigterm):
    out = tmp_path / "load.jsonl"
    assert loadclient.main(["--vip", "::1", "--port", str(lab_app.port), "--count", "3", "--duration", "10",
                            "--workers", "1", "--timeout", "2", "--sources", "::1", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 3 and all(r["node"] == "t1" and r["src"] == "::1" for r in recs)


@pytest.mark.parametrize("vip, sources, bad", [
    ("::1", "127.0.0.1", "127.0.0.1"),
    ("2001:db8::100", "2001:db8::1,198.18.0.3", "198.18.0.3"),
    ("198.18.0.100", "198.18.0.3,::1", "::1"),
])
def test_loadclient_rejects_mixed_families(vip, sources, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        loadclient.main(["--vip", vip, "--sources", sources, "--count", "1", "--duration", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--sources" in err and f"{bad} is an IPv" in err


# ---------------------------------------------------------------- udpprobe

@pytest.mark.parametrize("vip", ["127.0.0.1", "::1"])
def test_udpprobe_reaches_the_app(lab_app, vip):
    res = udpprobe.probe(vip, lab_app.udp_port, count=3, size=4000, wait=0.5)
    assert len(res) == 3
    assert all(r["replies"] == ["t1 4000"] for r in res)


def test_udpprobe_cli_over_v6(lab_app, capsys):
    assert udpprobe.main(["--vip", "::1", "--port", str(lab_app.udp_port), "--count", "2", "--size", "100",
                          "--wait", "0.3"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["replies"] for r in res] == [["t1 100"], ["t1 100"]]


# ---------------------------------------------------------------- holdclient

@pytest.mark.parametrize("vip", ["127.0.0.1", "::1"])
def test_holdclient_connection_over_both_families(lab_app, vip):
    rec = asyncio.run(holdclient.one(vip, lab_app.port, lifetime=0.3, period=0.1, timeout=2))
    assert rec["ok"] and rec["error"] is None and rec["node"] == "t1" and rec["pings"] >= 2


def test_holdclient_cli_over_v6(lab_app, tmp_path, keep_sigterm):
    out = tmp_path / "hold.jsonl"
    assert holdclient.main(["--vip", "::1", "--port", str(lab_app.port), "--conns", "2", "--lifetime", "0.3",
                            "--period", "0.1", "--duration", "1", "--ramp", "0", "--timeout", "2",
                            "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs and all(r["ok"] and r["node"] == "t1" for r in recs)


@pytest.mark.parametrize("vip, fam", [("::1", socket.AF_INET6), ("2001:db8::100", socket.AF_INET6),
                                      ("198.18.0.100", socket.AF_INET), ("localhost", 0)])
def test_holdclient_family_follows_vip(vip, fam):
    assert holdclient.vip_family(vip) == fam


def test_a_connection_the_client_gave_up_before_accept_is_marked_gone():
    """The accept log's ``gone`` field: closed or reset while queued, versus still open."""
    import socket
    import struct
    import time as _time

    from nlbfarm.node.app import _peer_gone
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        closed = socket.create_connection(srv.getsockname())
        closed.close()
        reset = socket.create_connection(srv.getsockname())
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()
        with socket.create_connection(srv.getsockname()):
            _time.sleep(0.05)
            got = []
            for _ in range(3):
                conn, _addr = srv.accept()
                with conn:
                    got.append(_peer_gone(conn))
    assert got == [True, True, False]
