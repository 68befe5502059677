"""Certificates of death: telling a dead agent from a silent one, so its buckets move at once.

When farmd dies (kill -9, a crash, the OOM killer) and its machine lives, that
machine's kernel closes the agent's sockets: its peer listener
(``status.peer_listen``) is gone, and a connection to it is refused (a TCP
reset) within a round trip. A partition, a paused process or a dead machine
gives no such answer; the connection just times out. A refusal therefore
proves that no process listens at that address *now*. The process a member
record names binds its listener before it registers and keeps it until it
exits (``node/agent.py`` stops the listeners last), so a refusal proves that
process is dead. Only that process refreshed its fence element, and every
element it wrote lasts at most the record's ``fence_ms``: once that long has
passed after the refusal, its kernel accepts nothing any more, and the node's
records can go at once, as if its leases had expired.

Each node keeps one idle TCP connection to every peer's listener, which costs
nothing while nothing happens (no bytes, no timers): the peer's kernel closes
it when the agent dies, and the watcher then asks again at once. The rules
(:func:`judge`, pure, so the simulation runs them too):

1. The record names an agent process (``instance``) that answered at the
   record's peer address, as that node and that instance (``verified``): the
   address leads to that process's machine, not to another node's, nor back
   here. The address must be an IP literal, so that it keeps meaning that machine.
2. The record does not say ``handing_over``: a planned restart holds a longer
   element for its successor (``node/handoff.py``).
3. The record gives ``fence_ms`` (agents without it get no certificate).
4. The refusal came at ``refused_at`` (when its answer arrived, the latest
   instant the process can have died), on the first attempt after a
   connection that was verified (rule 1) when it was made, closed; the
   records go no earlier than ``refused_at + F + CERT_MARGIN_S + 0.2 % of F``
   with F = max(fence_ms, this node's fence_timeout) (two machines' clocks
   may drift apart by up to 0.1 % under NTP). Until then the watcher keeps
   asking: anything but another refusal cancels the certificate.
5. They go in one transaction, conditioned on both records' revisions as read
   just before and checked against rules 1-3: a successor that swapped itself
   in (``Agent._adopt``), a hand-off marked meanwhile, or an operator's
   change makes it fail. A successor writes no fence element before its swap.
   Then both leases are revoked, so that the node, if it lives after all,
   finds them gone at its next keepalive and starts from nothing.

What a certificate cannot tell: a firewall on the path that answers with a
reset or ICMP port-unreachable, for the listener's port, both on the idle
connection and to new ones, looks like death. Peers would then take the
node's buckets while it serves; it closes its fence as soon as its watch
shows its records gone. Filter the peer port with ``drop``, never ``reject``.
"""
from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("nlbfarm.liveness")

# Between the element's longest life and the records' deletion: the two
# machines' clocks run at slightly different rates, and the kernel counts the
# element's timeout in jiffies.
CERT_MARGIN_S = 0.05
# Two machines' monotonic clocks, each slewed by NTP by up to 500 ppm.
CLOCK_DRIFT = 2e-3
# While a certificate waits, the watcher asks again this often.
RECHECK_S = 0.1
# A connection that closes sooner than this after it opened (a proxy in
# front of nothing, a peer that resets at once) waits RETRY_S before the next.
SHORT_LIVED_S = 1.0
# How long one connection attempt may take before it counts as "no answer".
CONNECT_TIMEOUT_S = 0.3
# After a failed attempt (timeout, unreachable), or a refusal that did not
# lead to a retirement, ask again after this long.
RETRY_S = 1.0
# What the watcher reads from an idle connection before it reconnects: a
# peer's listener sends its HTTP/2 settings once, never much more.
MAX_IDLE_BYTES = 64 << 10
# The watcher re-reads the member list this often while nothing happens.
IDLE_WAKE_S = 1.0


class Verdict(enum.Enum):
    DEAD = "certified dead: its listener refused and its fence has closed"
    WAIT = "its listener refused; its fence may still be open"
    GONE = "no member record"
    OTHER_INSTANCE = "the record names another agent process"
    UNVERIFIED = "that agent process never answered at the record's peer address"
    HANDING_OVER = "a planned restart is under way: a successor adopts the record"
    NO_FIGURE = "the record gives no fence_ms (an agent without certificates)"
    NOT_REFUSED = "its listener did not refuse"


def judge(record, instance: str, verified: bool, refused_at: float | None, now: float,
          own_fence_timeout: float) -> tuple[Verdict, float]:
    """May the node of ``record`` be retired now? Returns the verdict and, for WAIT, when.

    ``instance``: the agent process whose listener refused; ``verified``: it
    answered at the record's peer address as itself; ``refused_at``: when the
    refusal arrived (None: none).
    """
    if record is None:
        return Verdict.GONE, 0.0
    if record.instance != instance or not instance:
        return Verdict.OTHER_INSTANCE, 0.0
    if not verified:
        return Verdict.UNVERIFIED, 0.0
    if record.handing_over:
        return Verdict.HANDING_OVER, 0.0
    if record.fence_ms <= 0:
        return Verdict.NO_FIGURE, 0.0
    if refused_at is None:
        return Verdict.NOT_REFUSED, 0.0
    fence_s = max(record.fence_ms / 1000, own_fence_timeout)
    due = refused_at + fence_s + CERT_MARGIN_S + CLOCK_DRIFT * fence_s
    if now < due:
        return Verdict.WAIT, due
    return Verdict.DEAD, due


def ip_endpoint(addr: str) -> tuple[str, int] | None:
    """(ip, port) of a ``host:port`` peer address whose host is an IP literal; None otherwise."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_unspecified:
        return None
    return str(ip), int(port)


class Outcome(enum.Enum):
    CONNECTED = "connected"
    REFUSED = "refused"
    NO_ANSWER = "no answer"


def connect(endpoint: tuple[str, int], timeout: float = CONNECT_TIMEOUT_S) -> tuple[Outcome, socket.socket | None]:
    """One connection attempt: a connected non-blocking socket, a refusal, or no answer."""
    family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(endpoint)
    except ConnectionRefusedError:
        s.close()
        return Outcome.REFUSED, None
    except OSError as exc:
        s.close()
        if exc.errno == errno.ECONNREFUSED:
            return Outcome.REFUSED, None
        return Outcome.NO_ANSWER, None
    s.setblocking(False)
    return Outcome.CONNECTED, s


@dataclass(frozen=True)
class Watched:
    """A peer's agent process as its member record names it."""

    id: str
    instance: str
    addr: str


class _State:
    __slots__ = ("peer", "endpoint", "sock", "verified", "refused_at", "next_try", "received", "opened_at")

    def __init__(self, peer: Watched, endpoint: tuple[str, int]):
        self.peer = peer
        self.endpoint = endpoint
        self.sock: socket.socket | None = None
        self.verified = False
        self.refused_at: float | None = None
        self.next_try = 0.0
        self.received = 0
        self.opened_at = 0.0


class LivenessWatch:
    """The one thread that holds idle connections to the peers' listeners and certifies deaths.

    ``peers()`` lists the peers' agent processes (from the member records);
    ``identify(peer)`` asks one (EtcdReachability) and returns True if it
    answered as that node and instance; ``retire(peer, refused_at)`` applies
    :func:`judge` to a fresh read and deletes the records if it says DEAD,
    returning the verdict (``Agent.retire_dead``).
    """

    def __init__(self, peers: Callable[[], list[Watched]], identify: Callable[[Watched], bool],
                 retire: Callable[[Watched, float], tuple[Verdict, float]],
                 clock: Callable[[], float] = time.monotonic):
        self._peers = peers
        self._identify = identify
        self._retire = retire
        self.clock = clock
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._states: dict[str, _State] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unusable: set[tuple[str, str]] = set()

    # ---- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Re-read the member list now (a member joined or changed)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        self.poke()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for st in self._states.values():
            self._drop(st)
        self._states.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def certified(self) -> dict[str, float]:
        """Peers whose listener refused, and when (for status views)."""
        return {n: st.refused_at for n, st in list(self._states.items()) if st.refused_at is not None}

    # ---- the thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                timeout = self.step()
            except Exception:  # noqa: BLE001 - logged; the watcher must outlive any bug
                log.exception("liveness watcher failed; going on")
                timeout = RETRY_S
            if self._stop.is_set():
                return
            for key, _mask in self._sel.select(timeout):
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                self._readable(key.data)

    def step(self) -> float:
        """One pass over the peers: connect, verify, probe, retire. Returns how long to sleep."""
        wanted = {p.id: p for p in self._peers()}
        self._unusable &= {(p.id, p.addr) for p in wanted.values()}  # bounded by the member list
        for node_id in list(self._states):
            if wanted.get(node_id) != self._states[node_id].peer:
                self._drop(self._states.pop(node_id))
        for node_id, peer in wanted.items():
            if node_id in self._states:
                continue
            endpoint = ip_endpoint(peer.addr)
            if endpoint is None:
                if (node_id, peer.addr) not in self._unusable:
                    self._unusable.add((node_id, peer.addr))
                    log.warning("peer %s advertises %r, not an IP address and port: its death cannot be "
                                "certified (peers wait for its lease to expire)", node_id, peer.addr)
                continue
            self._states[node_id] = _State(peer, endpoint)
        sleep = IDLE_WAKE_S
        for st in list(self._states.values()):
            now = self.clock()
            if st.refused_at is not None:
                outcome, sock = connect(st.endpoint)
                if outcome is not Outcome.REFUSED:
                    # Something answers (or nothing at all) after all: no certificate.
                    log.info("peer %s's listener %s answers again (%s): certificate withdrawn", st.peer.id,
                             st.peer.addr, outcome.value)
                    if sock is not None:
                        sock.close()
                    st.refused_at, st.next_try = None, self.clock()
                    continue
                verdict, due = self._retire(st.peer, st.refused_at)
                if verdict is Verdict.WAIT:
                    sleep = min(sleep, RECHECK_S, max(0.0, due - self.clock()))
                    continue
                if verdict is not Verdict.DEAD:
                    log.info("peer %s's listener refused but it is not retired: %s", st.peer.id, verdict.value)
                st.refused_at = None
                st.next_try = now + RETRY_S
            if st.sock is None and now >= st.next_try:
                self._attempt(st)
            if st.sock is None:
                sleep = min(sleep, max(0.0, st.next_try - self.clock()))
            if st.refused_at is not None:
                sleep = 0.0
        return sleep

    def _attempt(self, st: _State, after_close: bool = False) -> None:
        """Connect. ``after_close``: the first attempt after a verified connection closed, the
        only one whose refusal certifies (a refusal later could come from whatever now
        holds the address, or from a firewall)."""
        outcome, sock = connect(st.endpoint)
        now = self.clock()
        armed, st.verified = st.verified and after_close, False
        if outcome is Outcome.CONNECTED:
            if after_close and now - st.opened_at < SHORT_LIVED_S:
                sock.close()  # it closed at once last time: do not spin on it
                st.next_try = now + RETRY_S
                return
            st.sock, st.received, st.opened_at = sock, 0, now
            self._sel.register(sock, selectors.EVENT_READ, st)
            # Every connection is verified after it is made: whoever answers
            # now listens where this idle connection goes.
            st.verified = self._identify(st.peer)
            if not st.verified:
                self._drop(st)
                st.next_try = now + RETRY_S
            return
        if outcome is Outcome.REFUSED and armed:
            log.warning("peer %s's listener %s refused: its agent (%s) is dead; retiring it once its fence "
                        "has closed", st.peer.id, st.peer.addr, st.peer.instance)
            st.refused_at = now
            return
        st.next_try = now + RETRY_S

    def _readable(self, st: _State) -> None:
        if st.sock is None:
            return
        try:
            data = st.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        st.received += len(data)
        if data and st.received <= MAX_IDLE_BYTES:
            return
        # Closed (or a listener that talks too much): ask again at once.
        self._drop(st)
        if st.peer.id in self._states:
            self._attempt(st, after_close=True)

    def _drop(self, st: _State) -> None:
        if st.sock is not None:
            try:
                self._sel.unregister(st.sock)
            except (KeyError, ValueError):
                pass
            st.sock.close()
            st.sock = None
