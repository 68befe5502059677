"""EtcdStore against a real etcd (see tests/conftest.py for the server fixture)."""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import nlbfarm.coordinator.etcd.keys as etcd_keys
from nlbfarm.coordinator.etcd import EtcdStore
from nlbfarm.coordinator.store import KV, LeaseExpired, WatchEvent
from nlbfarm.errors import StoreUnavailable

pytestmark = pytest.mark.integration

STORE_LOG = "nlbfarm.coordinator.etcd"  # the parent of every etcd module's logger


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"/test/{uuid.uuid4().hex[:10]}/"


@pytest.fixture
def store(etcd_server):
    s = EtcdStore([etcd_server.endpoint], timeout=2.0, retry_deadline=10.0)
    yield s
    s.close()


@pytest.fixture
def proxy(etcd_server):
    p = TcpProxy(etcd_server.client_port)
    yield p
    p.close()


class Recorder:
    """A watch callback that records events and lets the test wait for them."""

    def __init__(self):
        self.events: list[WatchEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: WatchEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, pred, what: str, timeout: float = 10.0) -> list[WatchEvent]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.events):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"timed out after {timeout}s waiting for {what}; got {self.events}")
                self._cond.wait(remaining)
            return list(self.events)

    def wait_key(self, key: str, timeout: float = 10.0) -> list[WatchEvent]:
        return self.wait_for(lambda evs: any(e.key == key for e in evs), f"an event for {key}", timeout)

    def resyncs(self) -> list[WatchEvent]:
        return [e for e in self.events if e.kind == "resync"]


def changes(events) -> list[tuple[str, str, bytes, int]]:
    return [(e.kind, e.key, e.value, e.mod_revision) for e in events if e.kind != "resync"]


def wait_until(pred, what: str, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = pred()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_log(caplog, text: str, timeout: float = 10.0):
    wait_until(lambda: any(text in r.getMessage() for r in caplog.records), f"log {text!r}", timeout)


class TcpProxy:
    """Loopback TCP relay to etcd that the test can cut and restore.

    cut(): drops every relayed connection and refuses new ones (accept+close),
    which is what a client sees when etcd becomes unreachable while etcd itself
    keeps serving other clients.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"127.0.0.1:{self.port}"
        self._up = True
        self._stalled = threading.Event()  # set: bytes are held, nothing is relayed
        self._closed = False
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    def _accept_loop(self):
        while not self._closed:
            try:
                down, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._up:
                down.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            down.settimeout(None)
            with self._lock:
                self._conns += [down, up]
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket):
        try:
            while data := src.recv(65536):
                while self._stalled.is_set() and not self._closed:
                    time.sleep(0.01)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        self._up = False
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self):
        self._up = True

    def stall(self, on: bool = True):
        """Hold every byte (a hung etcd, or a network that drops without a reset)."""
        (self._stalled.set if on else self._stalled.clear)()

    def close(self):
        self._closed = True
        self.cut()
        self._thread.join(timeout=2)
        self._listener.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- keys ----------------------------------------------------------------------


def test_create_only_never_touches_existing_key(store, prefix):
    key = prefix + "member"
    first, second = store.grant_lease(30), store.grant_lease(30)
    try:
        assert store.create(key, b"first", lease_id=first.id) is True
        before = store.get(key)
        assert before == KV(key=key, value=b"first", mod_revision=before.mod_revision, lease=first.id)

        assert store.create(key, b"second", lease_id=second.id) is False
        assert store.create(key, b"third") is False
        assert store.get(key) == before  # value, lease and revision untouched
    finally:
        store.revoke_lease(first.id)
        store.revoke_lease(second.id)
    assert store.get(key) is None
    assert store.create(key, b"again") is True


def test_put_get_delete_and_prefix(store, prefix):
    rev_a = store.put(prefix + "a", b"1")
    rev_b = store.put(prefix + "b", b"\x00\xff binary")
    store.put(prefix.rstrip("/") + "-sibling", b"outside the prefix")
    assert rev_b > rev_a

    items, rev = store.get_prefix(prefix)
    assert rev >= rev_b
    assert items == {
        prefix + "a": KV(prefix + "a", b"1", rev_a, 0),
        prefix + "b": KV(prefix + "b", b"\x00\xff binary", rev_b, 0),
    }
    assert store.delete(prefix + "a") is True
    assert store.delete(prefix + "a") is False
    assert store.get(prefix + "a") is None
    assert list(store.get_prefix(prefix)[0]) == [prefix + "b"]
    assert store.get_prefix(prefix + "nothing/")[0] == {}


def test_compare_and_swap(store, prefix):
    key = prefix + "table"
    assert store.compare_and_swap(key, b"v1", expected_mod_revision=12345) is False
    assert store.get(key) is None
    assert store.compare_and_swap(key, b"v1", expected_mod_revision=0) is True
    kv1 = store.get(key)
    assert kv1.value == b"v1"

    assert store.compare_and_swap(key, b"v2", expected_mod_revision=0) is False
    assert store.compare_and_swap(key, b"v2", expected_mod_revision=kv1.mod_revision - 1) is False
    assert store.get(key) == kv1

    assert store.compare_and_swap(key, b"v2", expected_mod_revision=kv1.mod_revision) is True
    kv2 = store.get(key)
    assert kv2.value == b"v2" and kv2.mod_revision > kv1.mod_revision
    # the old revision is now stale
    assert store.compare_and_swap(key, b"v3", expected_mod_revision=kv1.mod_revision) is False
    assert store.get(key) == kv2


def test_delete_if_unchanged_deletes_all_or_nothing(store, prefix):
    m, a, absent = prefix + "members/x", prefix + "applied/x", prefix + "applied/y"
    store.put(m, b"m1")
    store.put(a, b"a1")
    km, ka = store.get(m), store.get(a)
    # One key changed since it was read: nothing goes.
    store.put(a, b"a2")
    assert store.delete_if_unchanged({m: km.mod_revision, a: ka.mod_revision}) is False
    assert store.get(m) == km and store.get(a).value == b"a2"
    # A key that must not exist, but does: nothing goes.
    assert store.delete_if_unchanged({m: km.mod_revision, a: 0}) is False
    assert store.get(m) == km
    # Both as read (a missing key given as 0): both go, in one revision.
    ka2 = store.get(a)
    assert store.delete_if_unchanged({m: km.mod_revision, a: ka2.mod_revision, absent: 0}) is True
    assert store.get(m) is None and store.get(a) is None and store.get(absent) is None
    # Again: the keys are gone, the condition fails.
    assert store.delete_if_unchanged({m: km.mod_revision}) is False


def test_racing_cas_has_exactly_one_winner_per_round(etcd_server, store, prefix):
    key = prefix + "race"
    store.put(key, b"init")
    rounds = 60
    results: list[list] = [[None, None] for _ in range(rounds)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=10)

    def worker(tid: int):
        s = EtcdStore([etcd_server.endpoint], retry_deadline=5.0)  # own connection
        try:
            for r in range(rounds):
                barrier.wait()
                seen = s.get(key)
                barrier.wait()  # both have read before either writes
                won = s.compare_and_swap(key, f"{r}:{tid}".encode(), seen.mod_revision)
                results[r][tid] = (won, seen.mod_revision)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)
            barrier.abort()
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "CAS workers hung"
    assert not errors, errors

    last_revision = 0
    winner = None
    for r, ((won0, rev0), (won1, rev1)) in enumerate(results):
        assert rev0 == rev1, f"round {r}: workers read different revisions"
        assert rev0 > last_revision
        last_revision = rev0
        assert won0 != won1, f"round {r}: winners={won0, won1}"
        winner = 0 if won0 else 1
    final = store.get(key)
    assert final.value == f"{rounds - 1}:{winner}".encode()
    assert final.mod_revision > last_revision


# -- leases ----------------------------------------------------------------------


def test_revoke_deletes_bound_keys_and_is_idempotent(store, prefix):
    lease = store.grant_lease(30)
    assert lease.ttl >= 30
    store.put(prefix + "a", b"1", lease_id=lease.id)
    assert store.create(prefix + "b", b"2", lease_id=lease.id) is True
    store.put(prefix + "unbound", b"3")
    assert store.refresh_lease(lease.id) >= 29

    store.revoke_lease(lease.id)
    assert set(store.get_prefix(prefix)[0]) == {prefix + "unbound"}
    store.revoke_lease(lease.id)  # again: no error
    with pytest.raises(LeaseExpired):
        store.refresh_lease(lease.id)


def test_natural_expiry_deletes_keys_and_refresh_raises(store, prefix):
    lease = store.grant_lease(1)
    assert lease.ttl == 1  # etcd runs with --election-timeout 500, so 1 s is granted
    key = prefix + "ephemeral"
    assert store.create(key, b"x", lease_id=lease.id)
    assert store.get(key).lease == lease.id

    started = time.monotonic()
    wait_until(lambda: store.get(key) is None, "lease-bound key to expire", timeout=6)
    assert time.monotonic() - started >= 0.5

    with pytest.raises(LeaseExpired):
        store.refresh_lease(lease.id)
    with pytest.raises(LeaseExpired):
        store.put(key, b"y", lease_id=lease.id)
    with pytest.raises(LeaseExpired):
        store.create(key, b"y", lease_id=lease.id)
    assert store.get(key) is None


def test_refresh_keeps_a_short_lease_alive(store, prefix):
    lease = store.grant_lease(1)
    key = prefix + "kept"
    store.put(key, b"x", lease_id=lease.id)
    end = time.monotonic() + 2.5  # well past the 1 s TTL
    while time.monotonic() < end:
        assert store.refresh_lease(lease.id) == 1
        time.sleep(0.25)
    assert store.get(key) is not None
    store.revoke_lease(lease.id)


def lease_keepalive_streams(etcd_server) -> float:
    """How many LeaseKeepAlive streams etcd has started, from its own metrics."""
    with urllib.request.urlopen(f"http://{etcd_server.endpoint}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("grpc_server_started_total") and 'grpc_method="LeaseKeepAlive"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_keepalives_share_one_long_lived_stream(etcd_server, store, prefix):
    # python-etcd3 opens a stream per refresh; an idle agent spent most of its CPU on that.
    a, b = store.grant_lease(30), store.grant_lease(30)
    store.refresh_leases([a.id, b.id])
    before = lease_keepalive_streams(etcd_server)
    for _ in range(20):
        ttls = store.refresh_leases([a.id, b.id], deadline=2.0)
        assert ttls[a.id] >= 29 and ttls[b.id] >= 29
    assert store.refresh_lease(a.id) >= 29
    assert lease_keepalive_streams(etcd_server) == before


def test_keepalive_of_a_revoked_lease_names_it_and_the_other_lease_still_refreshes(store):
    a, b = store.grant_lease(30), store.grant_lease(30)
    store.revoke_lease(a.id)
    with pytest.raises(LeaseExpired, match=f"{a.id:x}"):
        store.refresh_leases([a.id, b.id], deadline=2.0)
    assert store.refresh_leases([b.id], deadline=2.0)[b.id] >= 29


def test_regression_keepalive_answer_that_never_comes_is_a_failure_within_the_deadline(etcd_server, proxy):
    # A stream that stops answering must fail the round in time (the fence
    # counts from the send time of the last answered keepalive), and the next
    # round must not read the late answers of this one.
    s = EtcdStore([proxy.endpoint], timeout=1.0, retry_deadline=5.0)
    try:
        lease = s.grant_lease(30)
        s.refresh_leases([lease.id], deadline=1.0)
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            s.refresh_leases([lease.id], deadline=0.5)
        assert time.monotonic() - started < 1.5
        proxy.stall(False)
        wait_until(lambda: _refreshes(s, lease.id), "keepalives to work again", timeout=10)
        assert s.refresh_leases([lease.id], deadline=2.0) == {lease.id: 30}
    finally:
        proxy.stall(False)
        s.close()


def _refreshes(store, lease_id) -> bool:
    try:
        store.refresh_leases([lease_id], deadline=1.0)
        return True
    except StoreUnavailable:
        return False


def test_keepalive_stream_rides_out_an_etcd_restart(etcd_server, store):
    lease = store.grant_lease(30)
    store.refresh_leases([lease.id])
    etcd_server.stop()
    etcd_server.start()
    wait_until(lambda: _refreshes(store, lease.id), "keepalives after the restart", timeout=20)


# -- watches ---------------------------------------------------------------------


def test_watch_starts_with_snapshot_then_delivers_changes_in_order(store, prefix):
    existing_rev = store.put(prefix + "existing", b"0")
    rec = Recorder()
    handle = store.watch_prefix(prefix, rec)
    try:
        (first,) = rec.wait_for(lambda e: e, "initial resync")
        assert first.kind == "resync" and first.key == prefix
        assert first.snapshot == {prefix + "existing": KV(prefix + "existing", b"0", existing_rev, 0)}
        assert first.mod_revision >= existing_rev

        expected = []
        expected.append(("put", prefix + "a", b"1", store.put(prefix + "a", b"1")))
        store.put(prefix.rstrip("/") + "-outside", b"not delivered")
        expected.append(("put", prefix + "b", b"2", store.put(prefix + "b", b"2")))
        expected.append(("put", prefix + "a", b"3", store.put(prefix + "a", b"3")))
        assert store.delete(prefix + "a")
        kv_b = store.get(prefix + "b")
        assert store.compare_and_swap(prefix + "b", b"4", kv_b.mod_revision)
        events = rec.wait_for(lambda e: len(e) == 6, "6 events")
        got = changes(events)
        assert got[:3] == expected
        assert got[3][:3] == ("delete", prefix + "a", b"")
        assert got[4][:3] == ("put", prefix + "b", b"4")
        revs = [c[3] for c in got]
        assert revs == sorted(revs) and len(set(revs)) == len(revs)
        time.sleep(0.2)
        assert len(rec.events) == 6, "nothing outside the prefix, nothing twice"
    finally:
        handle.cancel()

    store.put(prefix + "after-cancel", b"x")
    time.sleep(0.3)
    assert all(e.key != prefix + "after-cancel" for e in rec.events)


def test_watch_from_revision_replays_history(store, prefix):
    rev1 = store.put(prefix + "k", b"1")
    rev2 = store.put(prefix + "k", b"2")
    store.delete(prefix + "k")
    rec = Recorder()
    handle = store.watch_prefix(prefix, rec, start_revision=rev1)
    try:
        events = rec.wait_for(lambda e: len(e) == 3, "3 replayed events")
        assert [(e.kind, e.value) for e in events] == [("put", b"1"), ("put", b"2"), ("delete", b"")]
        assert [e.mod_revision for e in events][:2] == [rev1, rev2]
        assert not rec.resyncs()
    finally:
        handle.cancel()


def test_failing_callback_does_not_stop_the_watch(store, prefix):
    seen = []

    def callback(event):
        seen.append(event)
        if event.key.endswith("boom"):
            raise RuntimeError("consumer bug")

    handle = store.watch_prefix(prefix, callback)
    try:
        wait_until(lambda: seen, "initial resync")
        store.put(prefix + "boom", b"1")
        store.put(prefix + "fine", b"2")
        wait_until(lambda: any(e.key == prefix + "fine" for e in seen), "event after a failing callback")
    finally:
        handle.cancel()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_watch_survives_etcd_restart(etcd_server, store, prefix, caplog, how):
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    rec = Recorder()
    handle = store.watch_prefix(prefix, rec)
    try:
        rec.wait_for(lambda e: e, "initial resync")
        store.put(prefix + "before", b"1")
        rec.wait_key(prefix + "before")

        getattr(etcd_server, how)()
        wait_log(caplog, "watch lost")
        time.sleep(0.5)  # let the watch fail a few reconnects
        etcd_server.start()

        rev = store.put(prefix + "after", b"2")
        events = rec.wait_key(prefix + "after", timeout=10)
        assert changes(events)[-1] == ("put", prefix + "after", b"2", rev)
        assert len(rec.resyncs()) == 1, "resumed from its revision, no resync needed"
        assert any("watch resumed" in r.getMessage() for r in caplog.records)
    finally:
        handle.cancel()


def test_unary_call_rides_out_a_restart(etcd_server, prefix):
    s = EtcdStore([etcd_server.endpoint], timeout=1.0, retry_deadline=15.0)
    try:
        etcd_server.stop()
        restarter = threading.Timer(1.0, etcd_server.start)
        restarter.start()
        started = time.monotonic()
        rev = s.put(prefix + "k", b"v")  # retried until etcd is back
        assert time.monotonic() - started >= 0.9
        restarter.join(timeout=30)
        assert s.get(prefix + "k").mod_revision == rev
    finally:
        s.close()


def test_watch_misses_nothing_while_disconnected(etcd_server, store, proxy, prefix, caplog):
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    remote = EtcdStore([proxy.endpoint], timeout=1.0, retry_deadline=5.0)
    rec = Recorder()
    handle = remote.watch_prefix(prefix, rec)
    try:
        rec.wait_for(lambda e: e, "initial resync")
        expected = [("put", prefix + "a", b"1", store.put(prefix + "a", b"1"))]
        rec.wait_key(prefix + "a")

        proxy.cut()
        wait_log(caplog, "watch lost")
        # etcd keeps changing while the watcher cannot reach it
        expected.append(("put", prefix + "b", b"2", store.put(prefix + "b", b"2")))
        expected.append(("put", prefix + "a", b"3", store.put(prefix + "a", b"3")))
        assert store.delete(prefix + "b")
        expected.append(("delete", prefix + "b", b"", store.get_prefix(prefix)[1]))
        expected.append(("put", prefix + "c", b"4", store.put(prefix + "c", b"4")))
        time.sleep(0.5)
        assert len(rec.events) == 2, "no delivery while cut off"
        proxy.restore()

        events = rec.wait_for(lambda e: len(e) >= 6, "the 4 changes made while disconnected")
        assert changes(events) == expected
        assert len(rec.resyncs()) == 1
    finally:
        handle.cancel()
        remote.close()


def test_compaction_while_disconnected_leads_to_resync(etcd_server, store, proxy, prefix, caplog):
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    remote = EtcdStore([proxy.endpoint], timeout=1.0, retry_deadline=5.0)
    rec = Recorder()
    handle = remote.watch_prefix(prefix, rec)
    admin = etcd_server.client()
    try:
        rec.wait_for(lambda e: e, "initial resync")
        store.put(prefix + "a", b"1")
        rec.wait_key(prefix + "a")

        proxy.cut()
        wait_log(caplog, "watch lost")
        store.put(prefix + "b", b"2")
        store.delete(prefix + "a")
        store.put(prefix + "c", b"3")
        last = store.put(prefix + "b", b"2'")
        admin.compact(last, physical=True)  # the watcher's resume revision is gone
        proxy.restore()

        events = rec.wait_for(lambda e: len(rec.resyncs()) == 2, "a resync after compaction")
        resync = events[-1]
        assert resync.kind == "resync" and resync.mod_revision >= last
        assert {k: v.value for k, v in resync.snapshot.items()} == {prefix + "b": b"2'", prefix + "c": b"3"}
        assert [e.kind for e in events] == ["resync", "put", "resync"], "compacted changes are not replayed"
        wait_log(caplog, "watch compacted")

        rev = store.put(prefix + "d", b"4")
        events = rec.wait_key(prefix + "d")
        assert changes(events)[-1] == ("put", prefix + "d", b"4", rev)
    finally:
        admin.close()
        handle.cancel()
        remote.close()


def test_watch_from_compacted_revision_resyncs(etcd_server, store, prefix):
    old = store.put(prefix + "x", b"1")
    store.put(prefix + "x", b"2")
    last = store.put(prefix + "y", b"3")
    admin = etcd_server.client()
    try:
        admin.compact(last)
    finally:
        admin.close()
    rec = Recorder()
    handle = store.watch_prefix(prefix, rec, start_revision=old)
    try:
        (resync,) = rec.wait_for(lambda e: e, "resync for a compacted start revision")
        assert resync.kind == "resync"
        assert {k: v.value for k, v in resync.snapshot.items()} == {prefix + "x": b"2", prefix + "y": b"3"}
        rev = store.put(prefix + "z", b"4")
        events = rec.wait_key(prefix + "z")
        assert changes(events) == [("put", prefix + "z", b"4", rev)]
    finally:
        handle.cancel()


# -- endpoints -------------------------------------------------------------------


def test_unreachable_endpoints_raise_store_unavailable_in_bounded_time():
    endpoints = ["127.0.0.1:1", f"127.0.0.1:{closed_port()}"]
    s = EtcdStore(endpoints, timeout=1.0, retry_deadline=1.5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            s.get("/anything")
        elapsed = time.monotonic() - started
        assert elapsed < 1.5 + 1.0 + 0.5
        message = str(info.value)
        for ep in endpoints:
            assert ep in message
        assert "op=get" in message and "Connection refused" in message
    finally:
        s.close()


def test_second_endpoint_is_used_when_first_is_dead(etcd_server, prefix):
    s = EtcdStore(["127.0.0.1:1", etcd_server.endpoint], timeout=1.0, retry_deadline=5.0)
    try:
        started = time.monotonic()
        rev = s.put(prefix + "k", b"v")
        assert time.monotonic() - started < 2.0
        assert s.endpoint == etcd_server.endpoint
        assert s.get(prefix + "k") == KV(prefix + "k", b"v", rev, 0)
        rec = Recorder()
        handle = s.watch_prefix(prefix, rec)
        try:
            (first,) = rec.wait_for(lambda e: e, "initial resync")
            assert set(first.snapshot) == {prefix + "k"}
        finally:
            handle.cancel()
    finally:
        s.close()

    # a watch is the first user of the store: it too moves on to the live endpoint
    s = EtcdStore(["127.0.0.1:1", etcd_server.endpoint], timeout=1.0, retry_deadline=5.0)
    try:
        rec = Recorder()
        handle = s.watch_prefix(prefix, rec)
        rec.wait_for(lambda e: e, "initial resync via the second endpoint", timeout=5)
        handle.cancel()
    finally:
        s.close()


# -- hostile keys and lost history -------------------------------------------------


def raw_put(etcd_server, key: bytes, value: bytes) -> int:
    """Put with python-etcd3 itself, which takes any bytes as a key (EtcdStore takes str only)."""
    client = etcd_server.client()
    try:
        return client.put(key, value).header.revision
    finally:
        client.close()


def raw_delete(etcd_server, key: bytes) -> None:
    client = etcd_server.client()
    try:
        assert client.delete(key)
    finally:
        client.close()


def warnings_naming(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_regression_non_utf8_key_does_not_freeze_the_watch(etcd_server, store, prefix, caplog):
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    bad = prefix.encode() + b"\xff\xfe-not-utf8"
    rec = Recorder()
    handle = store.watch_prefix(prefix, rec)
    replay = None
    try:
        rec.wait_for(lambda e: e, "initial resync")
        bad_rev = raw_put(etcd_server, bad, b"v1")
        # The skipped event is the newest one: the watch must move past it all the same.
        wait_until(lambda: handle.last_revision >= bad_rev, "the watch to pass the skipped event", timeout=5)
        good = ("put", prefix + "good", b"1", store.put(prefix + "good", b"1"))
        raw_put(etcd_server, bad, b"v2")
        raw_delete(etcd_server, bad)
        after = ("put", prefix + "after", b"2", store.put(prefix + "after", b"2"))
        events = rec.wait_key(prefix + "after", timeout=5)
        assert changes(events) == [good, after], "the bad key's put, put and delete are skipped"
        assert handle.last_revision == after[3]

        # A watch (re)started at the bad key's revision gets past it too, instead of
        # failing on it and reconnecting to the same event for ever.
        rec2 = Recorder()
        replay = store.watch_prefix(prefix, rec2, start_revision=bad_rev)
        events = rec2.wait_key(prefix + "after", timeout=5)
        assert changes(events) == [good, after]
        assert not any("watch lost" in r.getMessage() for r in caplog.records)

        # One warning for the key, whatever the number of its events and watches.
        (warning,) = warnings_naming(caplog, repr(bad))
        assert "not UTF-8" in warning
    finally:
        handle.cancel()
        if replay is not None:
            replay.cancel()


def test_regression_non_utf8_key_is_left_out_of_reads_and_resyncs(etcd_server, store, prefix, caplog):
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    bad = prefix.encode() + b"node/\xc3\x28"  # an invalid 2-byte sequence
    raw_put(etcd_server, bad, b"junk")
    good_rev = store.put(prefix + "node/a", b"1")
    expected = {prefix + "node/a": KV(prefix + "node/a", b"1", good_rev, 0)}

    items, rev = store.get_prefix(prefix)
    assert items == expected and rev >= good_rev
    assert store.get(prefix + "node/a") == expected[prefix + "node/a"]

    # An agent restart: a new store whose first read and watch resync meet the key.
    restarted = EtcdStore([etcd_server.endpoint], timeout=2.0, retry_deadline=5.0)
    rec = Recorder()
    handle = restarted.watch_prefix(prefix, rec)
    try:
        assert restarted.get_prefix(prefix)[0] == expected
        (resync,) = rec.wait_for(lambda e: e, "initial resync", timeout=5)
        assert resync.kind == "resync" and resync.snapshot == expected
        rev = store.put(prefix + "node/b", b"2")
        events = rec.wait_key(prefix + "node/b", timeout=5)
        assert changes(events) == [("put", prefix + "node/b", b"2", rev)]
    finally:
        handle.cancel()
        restarted.close()
    # One warning per store that met the key (its get_prefix and watch share it).
    assert len(warnings_naming(caplog, repr(bad))) == 2


def test_regression_non_utf8_key_warnings_are_bounded(etcd_server, prefix, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    monkeypatch.setattr(etcd_keys, "MAX_SKIPPED_KEYS_REMEMBERED", 3)
    huge = prefix.encode() + b"\x80" + b"x" * 20_000  # sorts first: among the keys named
    bad = [huge] + [prefix.encode() + b"\xff%d" % i for i in range(5)]
    for key in bad:
        raw_put(etcd_server, key, b"junk")
    s = EtcdStore([etcd_server.endpoint], timeout=2.0, retry_deadline=5.0)
    try:
        for _ in range(3):
            assert s.get_prefix(prefix)[0] == {}
        warned = [r.getMessage() for r in caplog.records if r.name.startswith(STORE_LOG) and r.levelno == logging.WARNING]
        # Three keys named once each, then one line that says the rest are skipped quietly.
        assert len(warned) == 4, warned
        assert sum("not UTF-8, skipped key=" in w for w in warned) == 3
        assert "too many etcd keys are not UTF-8 limit=3 " in warned[3]
        assert len(s._decode_key._warned) == 3, "memory is bounded too"
        # A long key is named by its start and its length, not logged whole.
        assert all(len(w) < 1000 for w in warned)
        assert f"({len(huge)} bytes)" in warned[0]
    finally:
        s.close()


@pytest.fixture
def own_etcd(etcd_server):
    """An etcd of this test's own, which it may wipe; process and directory are always removed.

    It is the conftest's EtcdServer class (conftest modules cannot be imported
    by name), started in a temporary directory of its own.
    """
    tmp = Path(tempfile.mkdtemp(prefix="nlbfarm-etcd-"))
    server = type(etcd_server)(tmp / "data", name="nlbfarm-wiped")
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def replace_with_empty_etcd(server) -> None:
    """Stop ``server`` and start a new, empty etcd at the same ports (a lost or older data dir)."""
    server.stop()
    server.data_dir = server.data_dir.parent / f"data-{uuid.uuid4().hex[:6]}"
    server.start()


def test_regression_etcd_revision_going_backwards_resyncs_the_watch(own_etcd, prefix, caplog):
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    proxy = TcpProxy(own_etcd.client_port)
    writer = EtcdStore([own_etcd.endpoint], timeout=1.0, retry_deadline=15.0)
    watcher = EtcdStore([proxy.endpoint], timeout=1.0, retry_deadline=5.0)
    rec = Recorder()
    handle = None
    try:
        for i in range(30):  # a revision well above what the new etcd will have
            writer.put(prefix + f"old-{i}", b"old")
        handle = watcher.watch_prefix(prefix, rec)
        rec.wait_for(lambda e: e, "initial resync", timeout=5)
        high = writer.put(prefix + "last-old", b"old")
        rec.wait_key(prefix + "last-old", timeout=5)
        assert handle.last_revision == high

        # The watcher is cut off while etcd is replaced, so that it is back only
        # once the new etcd holds a key: its resync must show exactly that key.
        proxy.cut()
        wait_log(caplog, "watch lost")
        replace_with_empty_etcd(own_etcd)
        new_rev = writer.put(prefix + "new", b"fresh")
        assert new_rev < high, "the new etcd's revision is behind the watch's"
        proxy.restore()

        events = rec.wait_for(lambda e: sum(x.kind == "resync" for x in e) == 2,
                              "a resync from the new etcd", timeout=5)
        resync = events[-1]
        assert resync.kind == "resync" and resync.mod_revision >= new_rev
        assert resync.snapshot == {prefix + "new": KV(prefix + "new", b"fresh", new_rev, 0)}
        (warning,) = warnings_naming(caplog, "etcd revision went backwards")
        assert f"last_revision={high}" in warning and "action=resync" in warning

        # Then it carries on from the read's revision + 1.
        rev = writer.put(prefix + "after", b"2")
        events = rec.wait_key(prefix + "after", timeout=5)
        assert changes(events)[-1] == ("put", prefix + "after", b"2", rev)
        assert sum(e.kind == "resync" for e in events) == 2
        assert handle.last_revision == rev
    finally:
        if handle is not None:
            handle.cancel()
        watcher.close()
        writer.close()
        proxy.close()


def test_regression_watch_on_a_replaced_etcd_converges_to_its_content(own_etcd, prefix, caplog):
    """The same without a proxy: the watch sees etcd go away and come back empty."""
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    s = EtcdStore([own_etcd.endpoint], timeout=1.0, retry_deadline=15.0)
    cache: dict[str, bytes] = {}
    lock = threading.Lock()

    def apply(event: WatchEvent) -> None:
        with lock:
            if event.kind == "resync":
                cache.clear()
                cache.update({k: kv.value for k, kv in event.snapshot.items()})
            elif event.kind == "put":
                cache[event.key] = event.value
            else:
                cache.pop(event.key, None)

    handle = s.watch_prefix(prefix, apply)
    try:
        for i in range(30):
            s.put(prefix + f"old-{i}", b"old")
        wait_until(lambda: len(cache) == 30, "the old content in the cache", timeout=5)

        replace_with_empty_etcd(own_etcd)
        s.put(prefix + "new", b"fresh")
        wait_until(lambda: cache == {prefix + "new": b"fresh"}, "the cache to hold the new etcd's content",
                   timeout=5)
        assert warnings_naming(caplog, "etcd revision went backwards")
    finally:
        handle.cancel()
        s.close()


def test_regression_start_revision_beyond_etcd_revision_resyncs(store, prefix, caplog):
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    rev = store.put(prefix + "k", b"v")
    rec = Recorder()
    # A revision this etcd has not reached: it came from an etcd with more history.
    handle = store.watch_prefix(prefix, rec, start_revision=rev + 1000)
    try:
        (resync,) = rec.wait_for(lambda e: e, "a resync instead of silence", timeout=5)
        assert resync.kind == "resync" and resync.snapshot == {prefix + "k": KV(prefix + "k", b"v", rev, 0)}
        assert warnings_naming(caplog, "etcd revision went backwards")
        rev2 = store.put(prefix + "k", b"v2")
        events = rec.wait_for(lambda e: len(e) == 2, "the next change", timeout=5)
        assert changes(events) == [("put", prefix + "k", b"v2", rev2)]
    finally:
        handle.cancel()
