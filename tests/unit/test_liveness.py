"""Certificates of death (node/liveness.py): the pure verdict, and the watcher on real sockets."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace

import pytest

from nlbfarm.coordinator.cluster import Member
from nlbfarm.node.liveness import (
    ARMED_WINDOW_S, BACK_GRACE_S, CERT_MARGIN_S, CLOCK_DRIFT, SHORT_LIVED_S, Back, BackChannel, LivenessWatch, Outcome, Verdict, Watched, connect,
    ip_endpoint, judge)

REC = Member("n2", 1, instance="i-2", peer="10.0.0.2:7401", fence_ms=400)


def ALWAYS_BACK(ip):
    return True


class FakeBack:
    """Rule 5's evidence, as a test sets it: whether the peer's connection to us is open."""

    def __init__(self, open_: bool = True):
        self.open = open_

    def open_from(self, ip):
        return self.open


@pytest.mark.parametrize("record, instance, verified, refused_at, now, verdict", [
    (None, "i-2", True, 0.0, 9.0, Verdict.GONE),
    (REC, "i-old", True, 0.0, 9.0, Verdict.OTHER_INSTANCE),      # a successor swapped itself in
    (replace(REC, instance=""), "", True, 0.0, 9.0, Verdict.OTHER_INSTANCE),
    (REC, "i-2", False, 0.0, 9.0, Verdict.UNVERIFIED),          # never answered at that address
    (replace(REC, handing_over=True), "i-2", True, 0.0, 9.0, Verdict.HANDING_OVER),
    (replace(REC, fence_ms=0), "i-2", True, 0.0, 9.0, Verdict.NO_FIGURE),  # an older agent
    (REC, "i-2", True, None, 9.0, Verdict.NOT_REFUSED),
    (REC, "i-2", True, 1.0, 1.3, Verdict.WAIT),
    (REC, "i-2", True, 1.0, 1.0 + 0.4 + CERT_MARGIN_S + CLOCK_DRIFT * 0.4, Verdict.DEAD),
])
def test_verdicts(record, instance, verified, refused_at, now, verdict):
    assert judge(record, instance, verified, refused_at, now, own_fence_timeout=0.3, back=Back.CLOSED)[0] is verdict


@pytest.mark.parametrize("back, now, verdict", [
    (Back.NEVER_SEEN, 9.0, Verdict.UNCORROBORATED),      # nothing to corroborate the refusal with
    (Back.OPEN, 1.0 + BACK_GRACE_S, Verdict.STILL_CONNECTED),  # alive behind a rejecting firewall
    (Back.OPEN, 9.0, Verdict.STILL_CONNECTED),
    (Back.OPEN, 1.0 + BACK_GRACE_S / 2, Verdict.WAIT),   # the dead process's FIN may trail the refusal
    (Back.CLOSED, 1.3, Verdict.WAIT),
    (Back.CLOSED, 9.0, Verdict.DEAD),
])
def test_regression_a_refusal_needs_the_peers_own_connection_gone_too(back, now, verdict):
    assert judge(REC, "i-2", True, 1.0, now, 0.3, back)[0] is verdict


def test_regression_a_death_just_after_a_firewalls_reset_counts_from_when_it_was_last_seen_alive():
    """Refused at 1.0 by a rejecting firewall, the peer's connection here still open at 1.09,
    then it dies: its last fence element may have been written at 1.09, so not before that
    plus the fence."""
    due = 1.09 + 0.4 + CERT_MARGIN_S + CLOCK_DRIFT * 0.4
    assert judge(REC, "i-2", True, 1.0, 1.5, 0.3, Back.CLOSED, back_gone_at=1.09) == (Verdict.WAIT, due)
    assert judge(REC, "i-2", True, 1.0, due, 0.3, Back.CLOSED, back_gone_at=1.09)[0] is Verdict.DEAD


def test_the_wait_is_the_longer_of_the_record_and_this_nodes_fence():
    # A record that claims a shorter fence than this node's own does not hurry it.
    assert judge(replace(REC, fence_ms=100), "i-2", True, 10.0, 10.0, 0.4, Back.CLOSED) == (
        Verdict.WAIT, 10.0 + 0.4 + CERT_MARGIN_S + CLOCK_DRIFT * 0.4)
    # The margin grows with the fence: clocks drift apart over a long one.
    assert judge(replace(REC, fence_ms=299_000), "i-2", True, 0.0, 0.0, 0.4, Back.CLOSED)[1] > 299.5
    # An adopted planned-restart element: the record's longer figure wins.
    assert judge(replace(REC, fence_ms=2500), "i-2", True, 10.0, 12.0, 0.4, Back.CLOSED)[0] is Verdict.WAIT


@pytest.mark.parametrize("addr, endpoint", [
    ("10.0.0.2:7401", ("10.0.0.2", 7401)),
    ("[fd00::2]:7401", ("fd00::2", 7401)),
    ("node2.example:7401", None),     # a name could resolve elsewhere later
    ("0.0.0.0:7401", None),
    ("10.0.0.2", None),
    ("10.0.0.2:0", None),
    ("10.0.0.2:99999", None),
    ("", None),
])
def test_only_ip_literal_addresses_can_certify(addr, endpoint):
    assert ip_endpoint(addr) == endpoint


def test_member_record_fence_ms_is_checked():
    assert Member.decode("n2", REC.encode()).fence_ms == 400
    assert b"fence_ms" not in Member("n2", 1).encode()   # records without it look as before
    for bad in ("-1", "\"400\"", "1e9", "true", "300001"):
        raw = REC.encode().replace(b'"fence_ms": 400', b'"fence_ms": ' + bad.encode())
        with pytest.raises(ValueError, match="fence_ms must be an integer from 0 to 300000"):
            Member.decode("n2", raw)


def _listener(port: int = 0):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(8)
    return srv


def _wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_connect_tells_refused_from_no_answer():
    srv = _listener()
    port = srv.getsockname()[1]
    outcome, s = connect(("127.0.0.1", port))
    assert outcome is Outcome.CONNECTED
    s.close()
    srv.close()
    assert connect(("127.0.0.1", port))[0] is Outcome.REFUSED
    # A listener whose backlog is full drops the SYN: no answer in time, as
    # from a paused machine or across a cut link.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    held = []
    try:
        for _ in range(8):
            outcome, s = connect(full.getsockname(), timeout=0.2)
            if outcome is not Outcome.CONNECTED:
                break
            held.append(s)
        assert outcome is Outcome.NO_ANSWER
    finally:
        for s in held:
            s.close()
        full.close()


def test_a_listener_that_goes_away_is_certified_and_retired_after_the_fence():
    """The whole path on real sockets: idle connection, close, refusal, wait, retire."""
    srv = _listener()
    port = srv.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(srv.accept()[0]), daemon=True).start()
    peer = Watched("n2", "i-2", f"127.0.0.1:{port}")
    record = replace(REC, peer=peer.addr)
    retired: list[tuple[float, float]] = []
    back = FakeBack()

    def retire(p, refused_at, back, back_gone_at=None):
        verdict, due = judge(record, p.instance, True, refused_at, time.monotonic(), 0.2, back)
        if verdict is Verdict.DEAD:
            retired.append((refused_at, time.monotonic()))
        return verdict, due

    w = LivenessWatch(lambda: [peer], lambda p: True, retire, back.open_from)
    w.start()
    try:
        _wait_for(lambda: accepted)
        assert accepted, "the watcher never connected"
        time.sleep(0.2)
        assert not retired
        died = time.monotonic()
        srv.close()
        accepted[0].close()   # what the dead process's kernel does
        back.open = False     # ... to its own connection to this node as well
        _wait_for(lambda: retired)
        assert retired, "the refusal was never certified"
        refused_at, at = retired[0]
        assert refused_at - died < 0.5          # noticed at once, not on a poll
        assert at - refused_at >= 0.4 + CERT_MARGIN_S - 0.01  # never before the record's fence
        assert at - died < 2.0
    finally:
        w.stop()


def test_an_unverified_listener_is_never_certified():
    srv = _listener()
    port = srv.getsockname()[1]
    peer = Watched("n2", "i-2", f"127.0.0.1:{port}")
    calls = []
    w = LivenessWatch(lambda: [peer], lambda p: False, lambda p, t, b, o: calls.append(t) or (Verdict.DEAD, t),
                      ALWAYS_BACK)
    w.start()
    try:
        time.sleep(0.3)
        srv.close()
        time.sleep(1.5)
        assert calls == []
    finally:
        w.stop()


def _accepting(srv, accepted):
    def run():
        while True:
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                return
    threading.Thread(target=run, daemon=True).start()


def test_a_listener_back_while_the_certificate_waits_withdraws_it():
    """Refused once, then something listens again before the fence is over (a successor,
    an address that moved): no retirement."""
    srv = _listener()
    port = srv.getsockname()[1]
    accepted = []
    _accepting(srv, accepted)
    peer = Watched("n2", "i-2", f"127.0.0.1:{port}")
    calls = []
    back = FakeBack()

    def retire(p, refused_at, back, back_gone_at=None):
        verdict = judge(replace(REC, peer=peer.addr, fence_ms=1500), p.instance, True, refused_at,
                        time.monotonic(), 0.2, back)
        calls.append(verdict[0])
        return verdict

    w = LivenessWatch(lambda: [peer], lambda p: True, retire, back.open_from)
    w.start()
    try:
        _wait_for(lambda: accepted)
        srv.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; the port stops listening
        srv.close()
        accepted[0].close()
        back.open = False
        _wait_for(lambda: calls)
        assert calls, "the refusal was not noticed"
        again = _listener(port)
        time.sleep(2.5)
        assert not w.certified(), "the certificate survived a listener that answers"
        assert Verdict.DEAD not in calls
        again.close()
    finally:
        w.stop()


def test_a_refusal_long_after_the_last_connection_certifies_nothing():
    """Only the first attempt after a verified connection closed counts: a refusal on a later
    retry (after a timeout, say) may come from whatever holds the address by then."""
    srv = _listener()
    port = srv.getsockname()[1]
    srv.close()   # never connected, never verified
    peer = Watched("n2", "i-2", f"127.0.0.1:{port}")
    calls = []
    w = LivenessWatch(lambda: [peer], lambda p: True, lambda p, t, b, o: calls.append(t) or (Verdict.DEAD, t),
                      ALWAYS_BACK)
    w.start()
    try:
        time.sleep(2.5)
        assert calls == []
    finally:
        w.stop()


def test_a_listener_that_closes_at_once_is_not_hammered():
    srv = _listener()
    port = srv.getsockname()[1]
    accepted = []

    def run():
        while True:
            try:
                c = srv.accept()[0]
            except OSError:
                return
            accepted.append(1)
            c.close()
    threading.Thread(target=run, daemon=True).start()
    peer = Watched("n2", "i-2", f"127.0.0.1:{port}")
    w = LivenessWatch(lambda: [peer], lambda p: True, lambda p, t, b, o: (Verdict.OTHER_INSTANCE, 0.0), ALWAYS_BACK)
    w.start()
    try:
        time.sleep(3.0)
        assert len(accepted) <= 8, f"{len(accepted)} connections in 3 s"
    finally:
        w.stop()
        srv.close()


def test_regression_a_firewall_that_rejects_the_peer_port_certifies_nothing():
    """The listener refuses (a reject rule sends resets, as a dead process's kernel would) but
    the peer's own connection to this node stays open: it lives, so no retirement."""
    srv = _listener()
    port = srv.getsockname()[1]
    accepted = []
    _accepting(srv, accepted)
    peer = Watched("n2", "i-2", f"127.0.0.1:{port}")
    verdicts = []

    def retire(p, refused_at, back, back_gone_at=None):
        verdict = judge(replace(REC, peer=peer.addr), p.instance, True, refused_at, time.monotonic(), 0.2, back)
        verdicts.append(verdict[0])
        return verdict

    w = LivenessWatch(lambda: [peer], lambda p: True, retire, FakeBack(True).open_from)
    w.start()
    try:
        _wait_for(lambda: accepted)
        time.sleep(0.2)
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        accepted[0].close()
        _wait_for(lambda: Verdict.STILL_CONNECTED in verdicts, timeout=3.0)
        assert Verdict.STILL_CONNECTED in verdicts, verdicts
        assert Verdict.DEAD not in verdicts
        time.sleep(1.5)
        assert Verdict.DEAD not in verdicts
        assert not w.certified()
    finally:
        w.stop()


def test_the_back_channel_sees_a_peers_connection_and_its_close():
    """BackChannel on the kernel's real socket table: established from that address, or not."""
    srv = _listener()
    port = srv.getsockname()[1]
    back = BackChannel(port)
    assert back.open_from("127.0.0.1") is False
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = srv.accept()
    try:
        assert back.open_from("127.0.0.1") is True
        assert back.open_from("127.0.0.2") is False      # another address
        assert BackChannel(port + 1 if port < 65535 else port - 1).open_from("127.0.0.1") is False
        c.close()   # the peer's kernel closes it: our side is CLOSE_WAIT, no longer established
        time.sleep(0.05)
        assert back.open_from("127.0.0.1") is False
    finally:
        a.close()
        srv.close()
    assert back.open_from("not an address") is None


def test_the_back_channel_sees_ipv4_peers_on_a_dual_stack_listener():
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", 0))
    srv.listen()
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = srv.accept()
    try:
        assert BackChannel(port).open_from("127.0.0.1") is True   # listed as ::ffff:127.0.0.1
    finally:
        c.close()
        a.close()
        srv.close()


def test_the_watchers_connections_come_from_its_own_peer_address():
    """So that the peer finds them by the IP of this node's record (rule 5)."""
    srv = _listener()
    port = srv.getsockname()[1]
    try:
        outcome, s = connect(("127.0.0.1", port), source="127.0.0.3")
        assert outcome is Outcome.CONNECTED
        a, addr = srv.accept()
        assert addr[0] == "127.0.0.3"
        s.close()
        a.close()
        # An address that is not local here (translated on the way): any source.
        outcome, s = connect(("127.0.0.1", port), source="192.0.2.77")
        assert outcome is Outcome.CONNECTED
        s.close()
    finally:
        srv.close()


def test_regression_a_listener_that_still_completes_handshakes_as_its_process_dies_is_certified():
    """A dying process closes its descriptors one by one: the idle connection's close can
    arrive while its listener still completes a handshake (and then answers nothing). The
    watcher stays armed for ARMED_WINDOW_S and certifies the refusal that follows; it used
    to take that connection as the one attempt that counts and wait for the lease."""
    srv = _listener()
    port = srv.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(srv.accept()[0]), daemon=True).start()
    peer = Watched("n2", "i-2", f"127.0.0.1:{port}")
    dead = threading.Event()
    back = FakeBack()
    retired = []

    def retire(p, refused_at, back_state, back_gone_at=None):
        verdict, due = judge(replace(REC, peer=peer.addr), p.instance, True, refused_at, time.monotonic(), 0.2,
                             back_state, back_gone_at)
        if verdict is Verdict.DEAD:
            retired.append(refused_at)
        return verdict, due

    w = LivenessWatch(lambda: [peer], lambda p: not dead.is_set(), retire, back.open_from)
    w.start()
    try:
        _wait_for(lambda: accepted)
        time.sleep(SHORT_LIVED_S + 0.1)   # an idle connection that lived (not one closed at once)
        died = time.monotonic()
        dead.set()
        back.open = False
        accepted[0].close()       # the idle connection's close arrives first ...
        time.sleep(0.15)          # ... while the listener still takes handshakes (nobody accepts)
        srv.close()
        _wait_for(lambda: retired, timeout=3.0)
        assert retired, "the refusal after the half-dead listener was not certified"
        assert retired[0] - died < ARMED_WINDOW_S
    finally:
        w.stop()
