"""A prefix watch on etcd: its own thread and its own gRPC Watch stream.

See the watch contract in :mod:`nlbfarm.coordinator.store`. The watch uses
its store's connection (the current client, its channel and auth token) and
moves the store to the next endpoint when the connection fails.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import grpc

from nlbfarm.coordinator.etcd._lib import etcdrpc
from nlbfarm.coordinator.etcd.keys import event_from_pb, prefix_range_end
from nlbfarm.coordinator.etcd.retry import BACKOFF_INITIAL_S, BACKOFF_MAX_S, is_connection_error
from nlbfarm.coordinator.store import WatchEvent, WatchHandle
from nlbfarm.errors import StoreError

if TYPE_CHECKING:
    from nlbfarm.coordinator.etcd.client import EtcdStore

log = logging.getLogger(__name__)


class _Compacted(Exception):
    def __init__(self, compact_revision: int):
        super().__init__(f"revision compacted at {compact_revision}")
        self.compact_revision = compact_revision


class _RevisionWentBack(Exception):
    def __init__(self, etcd_revision: int):
        super().__init__(f"etcd is at revision {etcd_revision}")
        self.etcd_revision = etcd_revision


class PrefixWatch(WatchHandle):
    """One prefix watch: its own thread and its own gRPC Watch stream.

    python-etcd3's ``Watcher`` is not used: after a stream error it drops all
    callbacks, and while etcd is down its thread re-opens streams in a busy
    loop. Here the stream is driven directly through the client's channel.
    """

    def __init__(self, store: "EtcdStore", prefix: str, on_event, start_revision: int | None):
        self._store = store
        self.prefix = prefix
        self._range_end = prefix_range_end(prefix)
        self._on_event = on_event
        # Revision the next (re)created stream starts at; None = list first.
        self._next_rev: int | None = start_revision if start_revision else None
        self._stop = threading.Event()
        self._rewound = False  # the next resync follows a revision that went backwards
        self._lock = threading.Lock()
        self._call = None
        self._established = False  # the current stream got its "created" reply
        self._lost_since: float | None = None  # start of the current outage
        self._reconnect_failing = False  # a reconnect failed (warned once until one succeeds)
        self._thread = threading.Thread(
            target=self._run, name=f"etcd-watch {prefix}", daemon=True
        )

    @property
    def last_revision(self) -> int:
        """The last revision known to be delivered (0 before the first delivery)."""
        return (self._next_rev or 1) - 1

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.warning("watch thread did not stop prefix=%s", self.prefix)
        self._store._forget(self)

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        delay = BACKOFF_INITIAL_S
        while not self._stop.is_set():
            try:
                client, endpoint = self._store._current()
            except StoreError:
                break  # store closed
            self._established = False
            metadata = None
            try:
                # The stream sends the client's auth token (if any) as metadata,
                # over the client's channel (TLS when configured).
                self._store._authenticate(client, endpoint)
                metadata = client.metadata
                if self._next_rev is None:
                    self._resync(client)
                self._stream(client, endpoint)
                break  # returns only once cancelled
            except _Compacted as exc:
                log.warning(
                    "watch compacted prefix=%s last_revision=%d compact_revision=%d action=resync",
                    self.prefix, self.last_revision, exc.compact_revision,
                )
                self._next_rev = None
                continue
            except _RevisionWentBack as exc:
                log.warning(
                    "etcd revision went backwards (restored from an older snapshot, or a new etcd) "
                    "prefix=%s endpoint=%s last_revision=%d etcd_revision=%d action=resync",
                    self.prefix, endpoint, self.last_revision, exc.etcd_revision,
                )
                self._next_rev = None
                self._rewound = True
                # No `continue`: pause as after an error, so that an etcd that
                # keeps answering below our revision cannot make us re-list in a
                # tight loop.
            except Exception as exc:
                if self._stop.is_set():
                    break
                if self._established:
                    delay = BACKOFF_INITIAL_S
                token_rejected = self._store._token_rejected(client, metadata, exc)
                if token_rejected and self._established:
                    # A stream that ran and then lost its token: authenticate and resume at once.
                    log.info("watch re-authenticating prefix=%s endpoint=%s last_revision=%d",
                             self.prefix, endpoint, self.last_revision)
                elif self._lost_since is None:
                    self._lost_since = time.monotonic()
                    log.warning(
                        "watch lost prefix=%s endpoint=%s last_revision=%d reason=%s",
                        self.prefix, endpoint, self.last_revision, self._store._why(exc),
                    )
                else:
                    log.debug(
                        "watch retry failed prefix=%s endpoint=%s last_revision=%d reason=%s",
                        self.prefix, endpoint, self.last_revision, self._store._why(exc),
                    )
                if is_connection_error(exc):
                    try:
                        self._store._rotate(client)
                        self._reconnect_failing = False
                    except Exception as rot:  # noqa: BLE001 - e.g. a TLS file unreadable during a renewal
                        if not self._reconnect_failing:  # once per outage, not once per retry
                            log.warning("watch cannot reconnect prefix=%s reason=%s; retrying", self.prefix, rot)
                        self._reconnect_failing = True
            # Always pause, so a stream that keeps failing right after
            # creation cannot spin.
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, BACKOFF_MAX_S)
        log.debug("watch stopped prefix=%s last_revision=%d", self.prefix, self.last_revision)

    def _resync(self, client) -> None:
        resp = client.get_range_response(self.prefix, self._range_end)
        snapshot = self._store._kvs(resp.kvs)
        rev = resp.header.revision
        log.info("watch resync prefix=%s revision=%d keys=%d", self.prefix, rev, len(snapshot))
        self._deliver(
            WatchEvent(kind="resync", key=self.prefix, value=b"", mod_revision=rev, snapshot=snapshot,
                       rewound=self._rewound)
        )
        self._rewound = False
        self._next_rev = rev + 1

    def _stream(self, client, endpoint: str) -> None:
        """Run one Watch stream until it fails (raises) or is cancelled (returns)."""
        request = etcdrpc.WatchRequest(
            create_request=etcdrpc.WatchCreateRequest(
                key=self.prefix.encode(),
                range_end=self._range_end,
                start_revision=self._next_rev,
                progress_notify=True,
            )
        )
        done = threading.Event()

        def requests():
            yield request
            done.wait()  # keep the request side open until this stream ends

        call = etcdrpc.WatchStub(client.channel).Watch(requests(), metadata=client.metadata)
        with self._lock:
            self._call = call
        if self._stop.is_set():
            call.cancel()
        try:
            for rs in call:
                if rs.compact_revision:
                    raise _Compacted(rs.compact_revision)
                if rs.canceled:
                    raise StoreError(f"watch canceled by etcd: {rs.cancel_reason or 'no reason given'}")
                self._check_revision(rs.header.revision)
                if rs.created:
                    self._established = True
                    if self._lost_since is not None:
                        log.info(
                            "watch resumed prefix=%s endpoint=%s from_revision=%d down_for=%.1fs",
                            self.prefix, endpoint, self._next_rev,
                            time.monotonic() - self._lost_since,
                        )
                        self._lost_since = None
                    else:
                        log.debug("watch started prefix=%s endpoint=%s from_revision=%s",
                                  self.prefix, endpoint, self._next_rev)
                if rs.events:
                    for ev in rs.events:
                        if self._stop.is_set():
                            return
                        key = self._store._decode_key(ev.kv.key)
                        if key is not None:  # else skipped; _next_rev still moves past it
                            self._deliver(event_from_pb(ev, key))
                    self._next_rev = rs.events[-1].kv.mod_revision + 1
                elif not rs.created and self._next_rev is not None:
                    # Progress notification: nothing under the prefix changed
                    # up to header.revision.
                    self._next_rev = max(self._next_rev, rs.header.revision + 1)
            raise StoreError("watch stream ended by etcd")
        except grpc.RpcError:
            if self._stop.is_set():
                return
            raise
        finally:
            done.set()
            call.cancel()
            with self._lock:
                self._call = None

    def _check_revision(self, etcd_revision: int) -> None:
        """Raise _RevisionWentBack if etcd is below the revision we have delivered.

        A live etcd's revision never decreases, so this means it lost history
        (restored from a snapshot, or replaced by a new one): resuming at
        ``_next_rev`` would wait, silently, until etcd reaches it. Every
        response carries the revision, and a new stream always gets one at
        once: etcd answers ``created`` even when ``start_revision`` lies in the
        future. (A member lagging a little behind may also trip this after an
        endpoint switch; a resync is then merely redundant.)
        """
        if etcd_revision and etcd_revision < self.last_revision:  # 0: no header
            raise _RevisionWentBack(etcd_revision)

    def _deliver(self, event: WatchEvent) -> None:
        if self._stop.is_set():
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception(
                "watch callback failed prefix=%s kind=%s key=%s revision=%d",
                self.prefix, event.kind, event.key, event.mod_revision,
            )
