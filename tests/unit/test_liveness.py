"""Certificates of death (node/liveness.py): the pure verdict, and the watcher on real sockets."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace

import pytest

from nlbfarm.coordinator.cluster import Member
from nlbfarm.node.liveness import (
    CERT_MARGIN_S, CLOCK_DRIFT, LivenessWatch, Outcome, Verdict, Watched, connect, ip_endpoint, judge)

REC = Member("n2", 1, instance="i-2", peer="10.0.0.2:7401", fence_ms=400)


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
    assert judge(record, instance, verified, refused_at, now, own_fence_timeout=0.3)[0] is verdict


def test_the_wait_is_the_longer_of_the_record_and_this_nodes_fence():
    # A record that claims a shorter fence than this node's own does not hurry it.
    assert judge(replace(REC, fence_ms=100), "i-2", True, 10.0, 10.0, 0.4) == (
        Verdict.WAIT, 10.0 + 0.4 + CERT_MARGIN_S + CLOCK_DRIFT * 0.4)
    # The margin grows with the fence: clocks drift apart over a long one.
    assert judge(replace(REC, fence_ms=299_000), "i-2", True, 0.0, 0.0, 0.4)[1] > 299.5
    # An adopted planned-restart element: the record's longer figure wins.
    assert judge(replace(REC, fence_ms=2500), "i-2", True, 10.0, 12.0, 0.4)[0] is Verdict.WAIT


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

    def retire(p, refused_at):
        verdict, due = judge(record, p.instance, True, refused_at, time.monotonic(), 0.2)
        if verdict is Verdict.DEAD:
            retired.append((refused_at, time.monotonic()))
        return verdict, due

    w = LivenessWatch(lambda: [peer], lambda p: True, retire)
    w.start()
    try:
        _wait_for(lambda: accepted)
        assert accepted, "the watcher never connected"
        time.sleep(0.2)
        assert not retired
        died = time.monotonic()
        srv.close()
        accepted[0].close()   # what the dead process's kernel does
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
    w = LivenessWatch(lambda: [peer], lambda p: False, lambda p, t: calls.append(t) or (Verdict.DEAD, t))
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

    def retire(p, refused_at):
        verdict = judge(replace(REC, peer=peer.addr, fence_ms=1500), p.instance, True, refused_at,
                        time.monotonic(), 0.2)
        calls.append(verdict[0])
        return verdict

    w = LivenessWatch(lambda: [peer], lambda p: True, retire)
    w.start()
    try:
        _wait_for(lambda: accepted)
        srv.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; the port stops listening
        srv.close()
        accepted[0].close()
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
    w = LivenessWatch(lambda: [peer], lambda p: True, lambda p, t: calls.append(t) or (Verdict.DEAD, t))
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
    w = LivenessWatch(lambda: [peer], lambda p: True, lambda p, t: (Verdict.OTHER_INSTANCE, 0.0))
    w.start()
    try:
        time.sleep(3.0)
        assert len(accepted) <= 8, f"{len(accepted)} connections in 3 s"
    finally:
        w.stop()
        srv.close()
