"""Health checks of the farm module: is the application this node serves actually working?

A node whose application is down must stop taking buckets even though the node
itself (and its etcd lease) is fine. Checks are the usual kinds (HAProxy,
SafeKit checkers): a TCP connect, an HTTP(S) GET, a process that must exist, a
command that must exit 0.

One result is not a verdict: a check flips to failing only after ``fall``
consecutive failures and back to passing after ``rise`` consecutive passes, so
one slow answer does not move buckets around the farm.

``probe`` never raises and never takes much longer than the check's timeout:
it runs in the checker threads, and a stuck checker would freeze the node's
health at its last value.
"""
from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Sequence

from nlbfarm.config import CheckSpec
from nlbfarm.node.module import run_shell

log = logging.getLogger("nlbfarm.checks")

_BODY_MAX = 64 * 1024
_COMM_MAX = 15  # the kernel truncates /proc/<pid>/comm to 15 characters
_DEAD_STATES = frozenset({"Z", "X"})  # zombie, dead: the process no longer runs

UNKNOWN, PASSING, FAILING = "unknown", "passing", "failing"


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str
    duration: float


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(exc) or type(exc).__name__


def _probe_tcp(spec: CheckSpec) -> tuple[bool, str]:
    where = _hostport(spec.host, spec.port)
    try:
        with socket.create_connection((spec.host, spec.port), timeout=spec.timeout):
            return True, f"connected to {where}"
    except OSError as exc:
        return False, f"connect to {where}: {_reason(exc, spec.timeout)}"


def _ssl_context(spec: CheckSpec) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=spec.ca_file)
    if spec.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _status_ok(spec: CheckSpec, status: int) -> tuple[bool, str]:
    if spec.expect_status:
        return status in spec.expect_status, ",".join(str(s) for s in spec.expect_status)
    return 200 <= status < 400, "2xx/3xx"


class _Watchdog:
    """Shuts the connection's socket down at the deadline.

    http.client's timeout applies to each socket operation, so a server that
    trickles its answer a byte at a time could hold a probe far beyond the
    check's timeout. Shutting the socket down from another thread wakes any
    blocked read at once. The plain socket method is used on TLS sockets too:
    ``SSLSocket.shutdown`` also drops the TLS state the probing thread is using.
    """

    def __init__(self, conn: http.client.HTTPConnection, timeout: float):
        self.conn = conn
        self.fired = False
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self.conn.sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _shown_url(url: urllib.parse.SplitResult) -> str:
    """The URL as details show it: no query or credentials, which may hold secrets."""
    return f"{url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}{url.path or '/'}"


def _probe_http(spec: CheckSpec) -> tuple[bool, str]:
    url = urllib.parse.urlsplit(spec.url)
    host, port = url.hostname, url.port  # .port raises ValueError on a bad port: probe() reports it
    if not host:
        return False, "no host in the check's url"
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    if url.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=spec.timeout,
                                                                       context=_ssl_context(spec))
    else:
        conn = http.client.HTTPConnection(host, port, timeout=spec.timeout)
    watchdog = _Watchdog(conn, spec.timeout)
    try:
        with watchdog:
            conn.request("GET", target, headers={"User-Agent": "nlbfarm-check", "Connection": "close"})
            resp = conn.getresponse()  # http.client never follows redirects: a 302 is the answer
            ok, expected = _status_ok(spec, resp.status)
            if not ok:
                return False, f"HTTP {resp.status} (expected {expected})"
            if spec.body_match is None:
                return True, f"HTTP {resp.status}"
            body = b""
            while len(body) < _BODY_MAX:
                chunk = resp.read(_BODY_MAX - len(body))
                if not chunk:
                    break
                body += chunk
        if watchdog.fired:  # the shutdown may surface as a clean EOF, not an error
            return False, f"GET {_shown_url(url)}: timed out after {spec.timeout:g} s"
        if re.search(spec.body_match, body.decode("utf-8", errors="replace")):
            return True, f"HTTP {resp.status}, body matches {spec.body_match!r}"
        return False, f"body does not match {spec.body_match!r} (HTTP {resp.status}, {len(body)} bytes read)"
    except (OSError, http.client.HTTPException) as exc:
        reason = f"timed out after {spec.timeout:g} s" if watchdog.fired else _reason(exc, spec.timeout)
        return False, f"GET {_shown_url(url)}: {reason}"
    finally:
        conn.close()


def _proc_state(pid: int) -> str | None:
    """The one-letter state of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (in parentheses) may itself contain spaces and ")": the state
    # follows the last ")".
    fields = stat.rpartition(")")[2].split()
    return fields[0] if fields else None


def _probe_process_name(name: str) -> tuple[bool, str]:
    comm = name[:_COMM_MAX]
    alive, dead = [], []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", "rb") as f:
                if f.read().decode("utf-8", errors="replace").rstrip("\n") != comm:
                    continue
        except OSError:  # exited while we looked
            continue
        state = _proc_state(int(entry))
        if state is None:
            continue
        (dead if state in _DEAD_STATES else alive).append(int(entry))
    if alive:
        alive.sort()
        shown = ",".join(str(p) for p in alive[:5]) + (",..." if len(alive) > 5 else "")
        return True, f"process {name!r} running pid={shown}"
    if dead:
        return False, f"process {name!r} is a zombie pid={','.join(str(p) for p in sorted(dead)[:5])}"
    return False, f"no process named {name!r}"


def _probe_pid_file(path: str) -> tuple[bool, str]:
    try:
        with open(path, "rb") as f:
            text = f.read(64).decode("ascii", errors="replace").strip()
    except OSError as exc:
        return False, f"pid file {path}: {exc.strerror or exc}"
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        return False, f"pid file {path} does not hold a pid: {text[:20]!r}"
    state = _proc_state(pid)
    if state is None:
        return False, f"pid {pid} from {path} is not running"
    if state in _DEAD_STATES:
        return False, f"pid {pid} from {path} is a zombie"
    return True, f"pid {pid} from {path} running"


def _probe_command(spec: CheckSpec) -> tuple[bool, str]:
    result = run_shell(spec.command, spec.timeout)
    return result.ok, result.detail


def probe(spec: CheckSpec) -> CheckResult:
    """Run one check once. Never raises: a problem is a failed result naming it."""
    started = time.monotonic()
    try:
        if spec.type == "tcp":
            ok, detail = _probe_tcp(spec)
        elif spec.type in ("http", "https"):
            ok, detail = _probe_http(spec)
        elif spec.type == "process":
            ok, detail = _probe_process_name(spec.process) if spec.process else _probe_pid_file(spec.pid_file)
        elif spec.type == "command":
            ok, detail = _probe_command(spec)
        else:
            ok, detail = False, f"unknown check type {spec.type!r}"
    except Exception as exc:  # a bug or an unexpected input must not kill the checker thread
        ok, detail = False, f"{spec.type} check error: {type(exc).__name__}: {exc}"
    return CheckResult(ok, detail, time.monotonic() - started)


# A seeded cause comes from a state file: bounded like any outside input.
MAX_SEED_CAUSE = 512


class CheckState:
    """rise/fall counting for one check: ``unknown`` until decided, then ``passing`` or ``failing``."""

    def __init__(self, rise: int, fall: int, clock: Callable[[], float] = time.monotonic):
        self.rise = rise
        self.fall = fall
        self._clock = clock
        self.state = UNKNOWN
        self.last: CheckResult | None = None
        self.consecutive = 0  # results in a row with the same outcome as ``last``
        self.checked_at: float | None = None
        self.changed_at = clock()
        self.transitions = 0
        # The detail of the result that caused the last transition: stable
        # while the state lasts, unlike the latest probe's detail.
        self.cause = ""

    def record(self, result: CheckResult) -> str | None:
        """Count one result; return the new state if this result changed it, else None."""
        now = self._clock()
        if self.last is not None and self.last.ok == result.ok:
            self.consecutive += 1
        else:
            self.consecutive = 1
        self.last = result
        self.checked_at = now
        if result.ok and self.state != PASSING and self.consecutive >= self.rise:
            new = PASSING
        elif not result.ok and self.state != FAILING and self.consecutive >= self.fall:
            new = FAILING
        else:
            return None
        self.state = new
        self.changed_at = now
        self.transitions += 1
        self.cause = result.detail
        return new


@dataclass(frozen=True)
class CheckStatus:
    name: str
    type: str
    state: str
    last_ok: bool | None
    detail: str
    consecutive: int
    checked_age_s: float  # -1 before the first result
    transitions: int
    since_s: float
    cause: str = ""  # the detail that caused the current state


class HealthMonitor:
    """Runs every check in its own thread, every ``interval``, and keeps each one's state.

    One thread per check so a slow check (a command with a long timeout)
    does not delay the others. ``on_transition(name, old, new, detail)`` is
    called from the checker thread, outside the lock, so it may call back into
    the monitor; it must be cheap (it delays that check's next probe).
    """

    def __init__(self, specs: Sequence[CheckSpec],
                 on_transition: Callable[[str, str, str, str], None] | None = None, *,
                 probe_fn: Callable[[CheckSpec], CheckResult] = probe,
                 clock: Callable[[], float] = time.monotonic):
        self._specs = tuple(specs)
        self._on_transition = on_transition
        self._probe_fn = probe_fn
        self._clock = clock
        self._lock = threading.Lock()
        self._states = {s.name: CheckState(s.rise, s.fall, clock) for s in self._specs}
        self._stop: threading.Event | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self._stop is not None:
            return
        # A fresh event per run: a thread still finishing a probe from an
        # earlier run keeps seeing its own (set) event and exits.
        stop = self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(spec, stop), name=f"check-{spec.name}",
                                          daemon=True) for spec in self._specs]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the checker threads; waits at most ``timeout`` s for a probe in flight, then leaves it."""
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.debug("checker thread still busy at stop thread=%s", t.name)
        self._threads = []

    def _run(self, spec: CheckSpec, stop: threading.Event) -> None:
        # Scheduling uses the real monotonic clock: ``clock`` only stamps
        # state ages, so a test's fake clock cannot stall or spin this loop.
        next_at = time.monotonic()
        while not stop.is_set():
            self.run_check(spec, stop)
            next_at += spec.interval
            now = time.monotonic()
            if next_at < now:  # a probe overran its interval: skip the missed ticks, do not burst
                next_at = now
            if stop.wait(next_at - now):
                return

    def run_check(self, spec: CheckSpec, stop: threading.Event | None = None) -> CheckResult:
        """Probe one check now and record the result (the threads' step; also usable directly)."""
        try:
            result = self._probe_fn(spec)
        except Exception as exc:  # an injected probe may raise; ``probe`` itself does not
            result = CheckResult(False, f"probe error: {type(exc).__name__}: {exc}", 0.0)
        if stop is not None and stop.is_set():
            return result  # stopped while probing: the monitor no longer reports
        with self._lock:
            st = self._states[spec.name]
            old = st.state
            new = st.record(result)
            consecutive = st.consecutive
        if new is None:
            log.debug("check probe check=%s ok=%s duration=%.3fs detail=%r", spec.name, result.ok,
                      result.duration, result.detail)
            return result
        log.log(logging.INFO if new == PASSING else logging.WARNING,
                "check %s check=%s type=%s from=%s after=%d reason=%r", new, spec.name, spec.type, old,
                consecutive, result.detail)
        if self._on_transition is not None:
            try:
                self._on_transition(spec.name, old, new, result.detail)
            except Exception:
                log.exception("check transition callback failed check=%s", spec.name)
        return result

    def run_once(self) -> None:
        """Probe every check once, in order, in the calling thread."""
        for spec in self._specs:
            self.run_check(spec)

    def statuses(self) -> tuple[CheckStatus, ...]:
        now = self._clock()
        with self._lock:
            out = []
            for spec in self._specs:
                st = self._states[spec.name]
                out.append(CheckStatus(
                    name=spec.name, type=spec.type, state=st.state,
                    last_ok=None if st.last is None else st.last.ok,
                    detail="" if st.last is None else st.last.detail,
                    consecutive=st.consecutive,
                    checked_age_s=-1.0 if st.checked_at is None else max(0.0, now - st.checked_at),
                    transitions=st.transitions,
                    since_s=max(0.0, now - st.changed_at), cause=st.cause))
            return tuple(out)

    def seed(self, states: dict) -> None:
        """Start from verdicts a predecessor process reached (a hitless restart).

        ``states`` maps check name -> (state, cause); unknown names and
        states other than passing/failing are ignored. Without this a
        successor's checks would start unknown, and the node would announce
        "starting" (and give up its buckets) until they pass again.
        """
        with self._lock:
            for name, (state, cause) in states.items():
                st = self._states.get(name)
                if st is not None and state in (PASSING, FAILING):
                    st.state, st.cause = state, str(cause)[:MAX_SEED_CAUSE]

    def verdicts(self) -> dict:
        """name -> (state, cause) of every check: what a successor process seeds from."""
        with self._lock:
            return {name: (st.state, st.cause) for name, st in self._states.items()}

    def healthy(self) -> bool:
        """True when every check is passing (and when there are none)."""
        with self._lock:
            return all(st.state == PASSING for st in self._states.values())

    def failing(self) -> list[str]:
        with self._lock:
            return [s.name for s in self._specs if self._states[s.name].state == FAILING]

    def all_decided(self) -> bool:
        with self._lock:
            return all(st.state != UNKNOWN for st in self._states.values())
