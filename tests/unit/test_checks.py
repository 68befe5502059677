"""Health checkers against real loopback sockets, rise/fall counting, and the monitor threads."""
from __future__ import annotations

import http.server
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nlbfarm.config import CheckSpec
from nlbfarm.node.checks import CheckResult, CheckState, HealthMonitor, probe


# ---------------------------------------------------------------- helpers

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        routes = {
            "/": (200, b"hello world, status=green"),
            "/down": (503, b"maintenance"),
            "/redirect": (302, b""),
            "/created": (201, b"made"),
        }
        status, body = routes.get(self.path, (404, b"no such page"))
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/down")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _serve(server) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return t


@pytest.fixture
def http_base():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    _serve(server)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def listener():
    """A TCP port that completes handshakes (kernel backlog) but never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def _refused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _http(url: str, **kw) -> CheckSpec:
    return CheckSpec(name="web", type=url.split(":", 1)[0], url=url, **kw)


def _live_in_group(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies do not count: they run nothing)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


# ---------------------------------------------------------------- tcp

def test_tcp_connects(listener):
    r = probe(CheckSpec(name="t", type="tcp", port=listener))
    assert r.ok and r.detail == f"connected to 127.0.0.1:{listener}"


def test_tcp_refused():
    port = _refused_port()
    r = probe(CheckSpec(name="t", type="tcp", port=port))
    assert not r.ok
    assert r.detail == f"connect to 127.0.0.1:{port}: Connection refused"


# ---------------------------------------------------------------- http

@pytest.mark.parametrize("path,kw,ok,detail", [
    ("/", {}, True, "HTTP 200"),
    ("/created", {}, True, "HTTP 201"),
    ("/down", {}, False, "HTTP 503 (expected 2xx/3xx)"),
    ("/nope", {}, False, "HTTP 404 (expected 2xx/3xx)"),
    ("/down", {"expect_status": (503,)}, True, "HTTP 503"),
    ("/", {"expect_status": (204, 503)}, False, "HTTP 200 (expected 204,503)"),
    # Not followed: the 302 itself is judged (following it would land on a 503).
    ("/redirect", {}, True, "HTTP 302"),
    ("/redirect", {"expect_status": (200,)}, False, "HTTP 302 (expected 200)"),
])
def test_http_status(http_base, path, kw, ok, detail):
    r = probe(_http(http_base + path, **kw))
    assert (r.ok, r.detail) == (ok, detail)


def test_http_body_match(http_base):
    r = probe(_http(http_base + "/", body_match=r"status=(green|yellow)"))
    assert r.ok, r.detail
    r = probe(_http(http_base + "/", body_match=r"status=red"))
    assert not r.ok
    assert r.detail.startswith("body does not match 'status=red'")


def test_http_refused():
    port = _refused_port()
    r = probe(_http(f"http://127.0.0.1:{port}/health"))
    assert not r.ok and r.detail == f"GET http://127.0.0.1:{port}/health: Connection refused"


def test_http_timeout_is_bounded(listener):
    started = time.monotonic()
    r = probe(_http(f"http://127.0.0.1:{listener}/", timeout=0.3))
    assert time.monotonic() - started < 0.3 + 0.5
    assert not r.ok and "timed out after 0.3 s" in r.detail


def test_http_trickling_server_is_cut_at_the_timeout():
    """A byte every 50 ms never trips a per-read timeout; the whole-probe deadline must."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop = threading.Event()

    def drip():
        conn, _ = srv.accept()
        with conn:
            try:
                for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                    if stop.is_set():
                        return
                    conn.sendall(bytes([b]))
                    time.sleep(0.05)
            except OSError:
                pass

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        started = time.monotonic()
        r = probe(_http(f"http://127.0.0.1:{srv.getsockname()[1]}/", timeout=0.3))
        assert time.monotonic() - started < 0.3 + 0.5
        assert not r.ok and "timed out after 0.3 s" in r.detail, r.detail
    finally:
        stop.set()
        srv.close()
        t.join(2)


def test_https_verification(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=20)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    _serve(server)
    url = f"https://127.0.0.1:{server.server_address[1]}/"
    try:
        r = probe(_http(url))  # self-signed: not trusted by the default store
        assert not r.ok and "certificate verify failed" in r.detail, r.detail
        r = probe(_http(url, insecure=True))
        assert r.ok and r.detail == "HTTP 200", r.detail
        r = probe(_http(url, ca_file=str(cert), body_match="hello"))
        assert r.ok, r.detail
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- process

def test_process_by_name():
    comm = Path("/proc/self/comm").read_text().rstrip("\n")
    r = probe(CheckSpec(name="p", type="process", process=comm))
    assert r.ok and str(os.getpid()) in r.detail, r.detail
    r = probe(CheckSpec(name="p", type="process", process="no-such-proc-x"))
    assert not r.ok and r.detail == "no process named 'no-such-proc-x'"


def test_process_name_longer_than_comm_matches_truncated():
    comm = Path("/proc/self/comm").read_text().rstrip("\n")
    if len(comm) < 15:
        name = comm + "-longer-suffix-that-is-cut"
        # Only names the kernel truncates compare equal after truncation.
        assert not probe(CheckSpec(name="p", type="process", process=name)).ok
    else:
        assert probe(CheckSpec(name="p", type="process", process=comm + "suffix")).ok


def test_pid_file_live_dead_garbage(tmp_path):
    pidfile = tmp_path / "app.pid"
    spec = CheckSpec(name="p", type="process", pid_file=str(pidfile))

    r = probe(spec)
    assert not r.ok and "No such file or directory" in r.detail

    pidfile.write_text(f"{os.getpid()}\n")
    r = probe(spec)
    assert r.ok and r.detail == f"pid {os.getpid()} from {pidfile} running"

    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text(str(dead.pid))
    r = probe(spec)
    assert not r.ok and r.detail == f"pid {dead.pid} from {pidfile} is not running"

    pidfile.write_text("not a pid\n")
    r = probe(spec)
    assert not r.ok and r.detail == f"pid file {pidfile} does not hold a pid: 'not a pid'"

    pidfile.write_text("-1")
    assert not probe(spec).ok


def test_pid_file_zombie(tmp_path):
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pidfile = tmp_path / "z.pid"
        pidfile.write_text(str(child.pid))
        r = probe(CheckSpec(name="p", type="process", pid_file=str(pidfile)))
        assert not r.ok and r.detail.endswith("is a zombie")
    finally:
        child.wait()


# ---------------------------------------------------------------- command

def test_command_pass_and_fail():
    r = probe(CheckSpec(name="c", type="command", command="echo first; echo; echo all fine; echo"))
    assert r.ok and r.detail == "exit 0: all fine"
    r = probe(CheckSpec(name="c", type="command", command="echo broken >&2; exit 3"))
    assert not r.ok and r.detail == "exit 3: broken"


def test_command_timeout_kills_the_process_group(tmp_path):
    pgfile = tmp_path / "pgid"
    spec = CheckSpec(name="c", type="command", timeout=0.4, command=f"echo $$ > {pgfile}; sleep 30 & sleep 30")
    started = time.monotonic()
    r = probe(spec)
    assert time.monotonic() - started < 0.4 + 0.5
    assert not r.ok and r.detail.startswith("timed out after 0.4 s")
    pgid = int(pgfile.read_text())
    deadline = time.monotonic() + 2
    while _live_in_group(pgid):
        assert time.monotonic() < deadline, f"left running: {_live_in_group(pgid)}"
        time.sleep(0.02)


def test_probe_never_raises():
    # A port validated by pydantic cannot be bad, so break the url instead.
    r = probe(_http("http://127.0.0.1:99999/"))
    assert not r.ok and "error" in r.detail


# ---------------------------------------------------------------- CheckState

P, F = CheckResult(True, "fine", 0.0), CheckResult(False, "broken", 0.0)


@pytest.mark.parametrize("rise,fall,seq,expected", [
    (2, 2, "PP", [None, "passing"]),
    (2, 2, "FF", [None, "failing"]),
    (2, 2, "PFPF", [None, None, None, None]),                       # flapping from unknown: undecided
    (3, 2, "PPFPPP", [None, None, None, None, None, "passing"]),    # a failure restarts the count
    (2, 3, "PPFFPFFF", [None, "passing", None, None, None, None, None, "failing"]),
    (2, 2, "PPFPFPFP", [None, "passing", None, None, None, None, None, None]),  # flapping stays put
    (1, 1, "PFPF", ["passing", "failing", "passing", "failing"]),
    (2, 1, "FPPF", ["failing", None, "passing", "failing"]),
    (3, 2, "FFPPFPPP", [None, "failing", None, None, None, None, None, "passing"]),
    (2, 2, "PPPPP", [None, "passing", None, None, None]),          # no repeated transition
])
def test_check_state_transitions(rise, fall, seq, expected):
    st = CheckState(rise, fall)
    got = [st.record(P if c == "P" else F) for c in seq]
    assert got == expected
    assert st.transitions == sum(1 for e in expected if e)


def test_check_state_bookkeeping():
    now = [100.0]
    st = CheckState(2, 2, clock=lambda: now[0])
    assert (st.state, st.last, st.consecutive, st.transitions) == ("unknown", None, 0, 0)
    now[0] = 101.0
    st.record(P)
    now[0] = 102.0
    assert st.record(P) == "passing"
    assert (st.consecutive, st.changed_at, st.checked_at, st.last) == (2, 102.0, 102.0, P)
    now[0] = 103.0
    st.record(P)
    assert (st.consecutive, st.changed_at, st.checked_at) == (3, 102.0, 103.0)
    st.record(F)
    assert st.consecutive == 1 and st.state == "passing"


# ---------------------------------------------------------------- HealthMonitor

class FakeProbe:
    def __init__(self, **ok: bool):
        self.ok = dict(ok)
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, spec: CheckSpec) -> CheckResult:
        with self.lock:
            self.calls.append(spec.name)
        good = self.ok[spec.name]
        return CheckResult(good, f"{spec.name} {'up' if good else 'down'}", 0.001)


def _spec(name: str, interval: float = 0.1, rise: int = 2, fall: int = 2) -> CheckSpec:
    return CheckSpec(name=name, type="command", command="true", interval=interval, timeout=0.1, rise=rise,
                     fall=fall)


def _wait(cond, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_monitor_without_checks_is_healthy():
    m = HealthMonitor([])
    assert m.healthy() and m.all_decided() and m.failing() == [] and m.statuses() == ()
    m.start()
    m.stop()


def test_monitor_healthy_only_after_rise_passes():
    fake = FakeProbe(a=True, b=True)
    events = []
    m = HealthMonitor([_spec("a", rise=2), _spec("b", rise=3)], lambda *e: events.append(e), probe_fn=fake)
    m.run_once()
    assert not m.healthy() and not m.all_decided() and events == []
    m.run_once()
    assert not m.healthy() and events == [("a", "unknown", "passing", "a up")]
    m.run_once()
    assert m.healthy() and m.all_decided()
    assert events[1] == ("b", "unknown", "passing", "b up")


def test_monitor_threads_report_transitions_and_stop_promptly():
    fake = FakeProbe(a=True, b=True)
    events = []
    seen = threading.Event()

    def on_transition(name, old, new, detail):
        events.append((name, old, new, detail))
        seen.set()

    m = HealthMonitor([_spec("a"), _spec("b")], on_transition, probe_fn=fake)
    m.start()
    try:
        _wait(m.healthy)
        assert sorted(e[0] for e in events) == ["a", "b"]
        fake.ok["b"] = False
        _wait(lambda: m.failing() == ["b"])
        assert events[-1] == ("b", "passing", "failing", "b down")
        assert not m.healthy() and m.all_decided()
        statuses = {s.name: s for s in m.statuses()}
        assert [s.name for s in m.statuses()] == ["a", "b"]
        assert statuses["b"].state == "failing" and statuses["b"].last_ok is False
        assert statuses["b"].detail == "b down" and statuses["b"].transitions == 2
        assert statuses["a"].state == "passing" and 0 <= statuses["a"].checked_age_s < 1
    finally:
        started = time.monotonic()
        m.stop()
        assert time.monotonic() - started < 0.5


def test_monitor_first_probe_is_immediate_and_stop_does_not_wait_for_the_interval():
    fake = FakeProbe(a=True)
    m = HealthMonitor([_spec("a", interval=60)], probe_fn=fake)
    m.start()
    _wait(lambda: fake.calls, timeout=1.0)
    started = time.monotonic()
    m.stop()
    assert time.monotonic() - started < 0.3
    assert fake.calls == ["a"]


def test_monitor_statuses_with_fake_clock():
    now = [1000.0]
    fake = FakeProbe(a=False)
    m = HealthMonitor([_spec("a", fall=1)], probe_fn=fake, clock=lambda: now[0])
    (s,) = m.statuses()
    assert (s.state, s.last_ok, s.detail, s.checked_age_s, s.consecutive) == ("unknown", None, "", -1.0, 0)
    now[0] = 1005.0
    m.run_once()
    now[0] = 1007.5
    (s,) = m.statuses()
    assert (s.state, s.last_ok, s.checked_age_s, s.since_s, s.transitions) == ("failing", False, 2.5, 2.5, 1)


def test_monitor_survives_a_raising_probe_and_callback():
    def bad_probe(spec):
        raise RuntimeError("boom")

    def bad_callback(*a):
        raise ValueError("callback bug")

    m = HealthMonitor([_spec("a", fall=1)], bad_callback, probe_fn=bad_probe)
    m.run_once()
    assert m.failing() == ["a"]
    assert m.statuses()[0].detail == "probe error: RuntimeError: boom"
