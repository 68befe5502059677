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
   instant the process can have died), within ``ARMED_WINDOW_S`` after a
   connection that was verified (rule 1) when it was made closed, with no
   verified answer in between; the
   records go no earlier than ``refused_at + F + CERT_MARGIN_S + 0.2 % of F``
   with F = max(fence_ms, this node's fence_timeout) (two machines' clocks
   may drift apart by up to 0.1 % under NTP). Until then the watcher keeps
   asking: anything but another refusal cancels the certificate.
5. The peer's agent held its own idle connection to this node's listener
   (its watcher's, from the record's IP address) while the connection that
   closed was verified, and that one is gone too (``back``, from the kernel's
   socket table). A process that dies loses all its sockets at once; one
   behind a firewall that rejects the peer port keeps the connection it
   opened. Seen open again later than ``BACK_GRACE_S`` after the refusal,
   it cancels the certificate; the fence counts from when it was first seen
   gone (the process may have lived until then).
6. They go in one transaction, conditioned on both records' revisions as read
   just before and checked against rules 1-3: a successor that swapped itself
   in (``Agent._adopt``), a hand-off marked meanwhile, or an operator's
   change makes it fail. A successor writes no fence element before its swap.
   Then both leases are revoked, so that the node, if it lives after all,
   finds them gone at its next keepalive and starts from nothing.

What a certificate cannot tell: something on the path that resets both idle
connections (this node's to the peer's listener and the peer's to this
node's) and refuses new ones looks like death. A firewall that rejects the
peer port does not: it leaves the connection the live peer opened. Filter
the peer port with ``drop`` anyway: a rejected port costs a certificate
attempt and a warning every time the idle connection closes.
"""
from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import selectors
import socket
import struct
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
# After a verified connection closed, a refusal within this long certifies
# (rule 4), as long as nothing verified answered in between: a process that
# dies closes its descriptors one by one, so its listener may still complete
# a handshake for an instant after the idle connection's close arrived (and
# then answer nothing).
ARMED_WINDOW_S = 1.0
# Within that window, after a connection that nothing answered, ask again
# this soon.
ARMED_RETRY_S = 0.05
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
# How long after the refusal the dead process's own connection to this node
# may still look open (its kernel closes it in the same instant, but its FIN
# travels separately).
BACK_GRACE_S = 0.1
# A socket-table query gives up after this long (it only lists sockets on the
# peer listener's port, but bounds the time and memory of a huge table anyway).
DIAG_TIMEOUT_S = 0.2


class Verdict(enum.Enum):
    DEAD = "certified dead: its listener refused and its fence has closed"
    WAIT = "its listener refused; its fence may still be open"
    GONE = "no member record"
    OTHER_INSTANCE = "the record names another agent process"
    UNVERIFIED = "that agent process never answered at the record's peer address"
    HANDING_OVER = "a planned restart is under way: a successor adopts the record"
    NO_FIGURE = "the record gives no fence_ms (an agent without certificates)"
    NOT_REFUSED = "its listener did not refuse"
    UNCORROBORATED = "its agent's own connection to this node was never seen"
    STILL_CONNECTED = ("its agent's own connection to this node is still open: it lives "
                       "(does a firewall reject the peer port?)")


class Back(enum.Enum):
    """The peer agent's own idle connection to this node's listener (rule 5)."""

    NEVER_SEEN = "never seen while the closed connection was verified"
    OPEN = "open"
    CLOSED = "gone"


def judge(record, instance: str, verified: bool, refused_at: float | None, now: float,
          own_fence_timeout: float, back: Back, back_gone_at: float | None = None) -> tuple[Verdict, float]:
    """May the node of ``record`` be retired now? Returns the verdict and, for WAIT, when.

    ``instance``: the agent process whose listener refused; ``verified``: it
    answered at the record's peer address as itself; ``refused_at``: when the
    refusal arrived (None: none); ``back``: its agent's connection to this
    node, as the kernel lists it now; ``back_gone_at``: when it was first seen
    gone (the process may have lived until then: its fence counts from there).
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
    if back is Back.NEVER_SEEN:
        return Verdict.UNCORROBORATED, 0.0
    if back is Back.OPEN and now - refused_at >= BACK_GRACE_S:
        return Verdict.STILL_CONNECTED, 0.0
    fence_s = max(record.fence_ms / 1000, own_fence_timeout)
    alive_at = max(refused_at, back_gone_at) if back_gone_at is not None else refused_at
    due = alive_at + fence_s + CERT_MARGIN_S + CLOCK_DRIFT * fence_s
    if now < due or back is not Back.CLOSED:
        return Verdict.WAIT, max(due, refused_at + BACK_GRACE_S)
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


def connect(endpoint: tuple[str, int], timeout: float = CONNECT_TIMEOUT_S,
            source: str | None = None) -> tuple[Outcome, socket.socket | None]:
    """One connection attempt: a connected non-blocking socket, a refusal, or no answer.

    ``source``: this node's own peer address, so that the peer finds this
    connection in its socket table by the IP of this node's record (rule 5);
    if it is not local here (an address translated on the way), any.
    """
    family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source is not None and (":" in source) == (family == socket.AF_INET6):
        try:
            s.bind((source, 0))
        except OSError:
            pass
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


# sock_diag (linux/inet_diag.h): list the TCP sockets on one local port.
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_BC_S_EQ = 11
_TCPF_ESTABLISHED = 1 << 1
_DIAG_MSG_LEN = 72
_NETLINK_SOCK_DIAG = 4


def _diag_request(family: int, local_port: int) -> bytes:
    """A dump of the established TCP sockets of ``family`` whose local port is ``local_port``.

    The filter is the kernel's bytecode for ``sport = local_port`` (as ``ss``
    builds it): the kernel skips every other socket, so a busy node's table
    of client connections costs nothing here.
    """
    bytecode = struct.pack("=BBH", _INET_DIAG_BC_S_EQ, 8, 12) + struct.pack("=BBH", 0, 0, local_port)
    attr = struct.pack("=HH", 4 + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
    req = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, _TCPF_ESTABLISHED) + bytes(48)
    body = req + attr
    return struct.pack("=IHHII", 16 + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body


def _remote_of(msg: bytes, family: int) -> str | None:
    """The remote address of one inet_diag_msg."""
    if len(msg) < _DIAG_MSG_LEN:
        return None
    dst = msg[4 + 4 + 16:4 + 4 + 32]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, dst[:4])
    ip = ipaddress.ip_address(dst)
    return str(ip.ipv4_mapped or ip)


class BackChannel:
    """Rule 5's evidence: does a peer hold an established connection to this node's listener?

    Asks the kernel's socket table (sock_diag) for the established TCP
    sockets on the listener's local port and looks for the peer's IP among
    their remote addresses. IPv4 peers may show as IPv4-mapped IPv6
    addresses on a dual-stack listener.
    """

    def __init__(self, local_port: int, timeout: float = DIAG_TIMEOUT_S):
        self.local_port = local_port
        self.timeout = timeout

    def open_from(self, ip: str) -> bool | None:
        """True/False; None: the socket table could not be read in time."""
        try:
            want = str(ipaddress.ip_address(ip))
        except ValueError:
            return None
        families = (socket.AF_INET, socket.AF_INET6) if ":" not in want else (socket.AF_INET6,)
        for family in families:
            found = self._dump_has(family, want)
            if found is None or found:
                return found
        return False

    def _dump_has(self, family: int, want: str) -> bool | None:
        end = time.monotonic() + self.timeout
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
        except OSError:
            return None
        try:
            s.sendall(_diag_request(family, self.local_port))
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                s.settimeout(left)
                data = s.recv(65536)
                off = 0
                while off + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, off)
                    if length < 16:
                        return None
                    if kind == _NLMSG_DONE:
                        return False
                    if kind == _NLMSG_ERROR:
                        return None
                    if kind == _SOCK_DIAG_BY_FAMILY and _remote_of(data[off + 16:off + length], family) == want:
                        return True
                    off += (length + 3) & ~3
        except (OSError, ValueError):
            return None
        finally:
            s.close()


@dataclass(frozen=True)
class Watched:
    """A peer's agent process as its member record names it."""

    id: str
    instance: str
    addr: str


class _State:
    __slots__ = ("peer", "endpoint", "sock", "verified", "back_seen", "refused_at",
                 "back_gone_at", "next_try", "received", "opened_at", "armed_until", "armed_back_seen",
                 "closed_lived")

    def __init__(self, peer: Watched, endpoint: tuple[str, int]):
        self.peer = peer
        self.endpoint = endpoint
        self.sock: socket.socket | None = None
        self.verified = False
        self.back_seen = False          # the peer's connection to us, seen while this one was verified
        self.refused_at: float | None = None
        self.back_gone_at: float | None = None  # when the peer's connection here was first seen gone
        self.next_try = 0.0
        self.received = 0
        self.opened_at = 0.0
        self.armed_until = 0.0         # a refusal before this certifies (a verified connection closed)
        self.armed_back_seen = False   # back_seen of that connection (rule 5 for its refusal)
        self.closed_lived: float | None = None  # how long the connection that just closed lived


class LivenessWatch:
    """The one thread that holds idle connections to the peers' listeners and certifies deaths.

    ``peers()`` lists the peers' agent processes (from the member records);
    ``identify(peer)`` asks one (EtcdReachability) and returns True if it
    answered as that node and instance; ``back_open(ip)`` tells whether the
    peer at ``ip`` holds a connection to this node's listener (True/False,
    None: unknown, :class:`BackChannel`); ``retire(peer, refused_at, back,
    back_gone_at)`` applies :func:`judge` to a fresh read and deletes the records if it says
    DEAD, returning the verdict (``Agent.retire_dead``). ``source``: this
    node's own peer IP, which its connections come from.
    """

    def __init__(self, peers: Callable[[], list[Watched]], identify: Callable[[Watched], bool],
                 retire: Callable[[Watched, float, Back, float | None], tuple[Verdict, float]],
                 back_open: Callable[[str], bool | None], source: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._peers = peers
        self._identify = identify
        self._retire = retire
        self._back_open = back_open
        self.source = source
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
                    log.warning("peer address unusable peer=%s addr=%s: not an IP address and port, so its death "
                                "cannot be certified (peers wait for its lease to expire)", node_id, peer.addr)
                continue
            self._states[node_id] = _State(peer, endpoint)
        sleep = IDLE_WAKE_S
        for st in list(self._states.values()):
            now = self.clock()
            if st.refused_at is not None:
                outcome, sock = connect(st.endpoint, source=self.source)
                if outcome is not Outcome.REFUSED:
                    # Something answers (or nothing at all) after all: no certificate.
                    log.info("certificate withdrawn peer=%s addr=%s outcome=%s: its listener answers again",
                             st.peer.id, st.peer.addr, outcome.value)
                    if sock is not None:
                        sock.close()
                    st.refused_at, st.next_try = None, self.clock()
                    continue
                back = self._back(st)
                verdict, due = self._retire(st.peer, st.refused_at, back, st.back_gone_at)
                if verdict is Verdict.WAIT:
                    sleep = min(sleep, RECHECK_S, max(0.0, due - self.clock()))
                    continue
                if verdict is not Verdict.DEAD:
                    log.info("peer not retired peer=%s verdict=%s: its listener refused", st.peer.id, verdict.value)
                st.refused_at = None
                st.next_try = now + RETRY_S
            if st.sock is None and now >= st.next_try:
                self._attempt(st)
            elif st.sock is not None and st.verified and not st.back_seen:
                st.back_seen = self._back_open(st.endpoint[0]) is True
            if st.sock is None:
                sleep = min(sleep, max(0.0, st.next_try - self.clock()))
            if st.refused_at is not None:
                sleep = 0.0
        return sleep

    def _attempt(self, st: _State) -> None:
        """Connect. A refusal certifies only while armed: within ``ARMED_WINDOW_S`` after a
        verified connection closed, with nothing verified answering in between (a refusal
        later could come from whatever holds the address by then, or from a firewall)."""
        outcome, sock = connect(st.endpoint, source=self.source)
        now = self.clock()
        armed = now < st.armed_until
        st.verified = st.back_seen = False
        lived, st.closed_lived = st.closed_lived, None
        if outcome is Outcome.CONNECTED:
            if lived is not None and lived < SHORT_LIVED_S:
                sock.close()  # it closed at once last time: do not spin on it
                st.armed_until, st.next_try = 0.0, now + RETRY_S
                return
            st.sock, st.received, st.opened_at = sock, 0, now
            self._sel.register(sock, selectors.EVENT_READ, st)
            # Every connection is verified after it is made: whoever answers
            # now listens where this idle connection goes.
            st.verified = self._identify(st.peer)
            if not st.verified:
                self._drop(st)
                # Nothing answered: a dying listener, or someone else's. Still
                # armed, ask again soon: the refusal comes once it is gone.
                st.next_try = now + (ARMED_RETRY_S if armed else RETRY_S)
                return
            st.armed_until = 0.0
            st.back_seen = self._back_open(st.endpoint[0]) is True
            return
        if outcome is Outcome.REFUSED and armed:
            log.warning("peer listener refused peer=%s addr=%s instance=%s: its agent is dead; retiring it once "
                        "its fence has closed", st.peer.id, st.peer.addr, st.peer.instance)
            st.refused_at, st.back_gone_at = now, None
            st.armed_until = 0.0
            return
        if armed:
            st.next_try = now + ARMED_RETRY_S  # no answer: a dying listener's full backlog, say
            return
        st.next_try = now + RETRY_S

    def _back(self, st: _State) -> Back:
        """Rule 5 for a waiting certificate: the peer's own connection to this node, now."""
        if not st.armed_back_seen:
            return Back.NEVER_SEEN
        if self._back_open(st.endpoint[0]) is False:
            # The first time it is seen gone bounds the death: the fence counts
            # from here. Not from the last time it was seen open: this watcher
            # may have stalled in between while the peer lived on.
            if st.back_gone_at is None:
                st.back_gone_at = self.clock()
            return Back.CLOSED
        st.back_gone_at = None
        return Back.OPEN

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
        now = self.clock()
        if st.verified:
            st.armed_until, st.armed_back_seen = now + ARMED_WINDOW_S, st.back_seen
        st.closed_lived = now - st.opened_at
        if st.peer.id in self._states:
            self._attempt(st)

    def _drop(self, st: _State) -> None:
        if st.sock is not None:
            try:
                self._sel.unregister(st.sock)
            except (KeyError, ValueError):
                pass
            st.sock.close()
            st.sock = None
