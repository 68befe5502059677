"""Between etcd's wire records and the store's: keys, key ranges, KVs and events.

Keys are outside input: any client with write access to the prefix can put
one that is not UTF-8, or one of a megabyte. Decoding them is bounded here.
"""
from __future__ import annotations

import hashlib
import logging
import threading

from nlbfarm.coordinator.etcd._lib import kv_pb2
from nlbfarm.coordinator.store import KV, WatchEvent

log = logging.getLogger(__name__)


def prefix_range_end(prefix: str) -> bytes:
    """The exclusive end of the key range under ``prefix`` (etcd's convention)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # every key from prefix on
    raw[-1] += 1
    return bytes(raw)


def kv_from_pb(pb_kv, key: str) -> KV:
    """``pb_kv`` as a :class:`KV`; ``key`` is its key, already decoded (see KeyDecoder)."""
    return KV(key=key, value=bytes(pb_kv.value), mod_revision=pb_kv.mod_revision, lease=pb_kv.lease)


# How many distinct non-UTF-8 keys a store remembers having warned about. The
# keys are outside input: without a bound, a client writing fresh ones would
# grow our memory for ever.
MAX_SKIPPED_KEYS_REMEMBERED = 1000
# A key may be up to etcd's request size (1.5 MiB): log only its start.
_KEY_LOG_BYTES = 200


def _key_repr(raw: bytes) -> str:
    if len(raw) <= _KEY_LOG_BYTES:
        return repr(raw)
    return f"{raw[:_KEY_LOG_BYTES]!r}... ({len(raw)} bytes)"


class KeyDecoder:
    """etcd key bytes -> ``str``, or ``None`` for a key that is not UTF-8 (skip it).

    etcd keys are bytes and any client with write access can put one that is
    not UTF-8. Raising would stop every read that lists it and freeze a watch
    for good (it would reconnect at that event again and again), so such a key
    is skipped instead. Each distinct key is warned about once; the keys warned
    about are remembered as small digests, at most ``limit`` of them. Past
    that, one more warning says so and further keys are skipped with a debug
    line only: a warning per read would flood the log just the same.
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._warned: set[bytes] = set()
        self._full = False
        self._lock = threading.Lock()

    def __call__(self, raw: bytes) -> str | None:
        try:
            return raw.decode()  # strict: no surrogates, no overlong forms
        except UnicodeDecodeError:
            self._skipped(bytes(raw))
            return None

    def _skipped(self, raw: bytes) -> None:
        digest = hashlib.blake2b(raw, digest_size=16).digest()  # a 1 MiB key costs 16 bytes
        with self._lock:
            if digest in self._warned:
                return
            if len(self._warned) < self._limit:
                self._warned.add(digest)
                outcome = "warn"
            elif not self._full:
                self._full = True
                outcome = "limit reached"
            else:
                outcome = "quiet"
        if outcome == "warn":
            log.warning("etcd key is not UTF-8, skipped key=%s", _key_repr(raw))
        elif outcome == "limit reached":
            log.warning("too many etcd keys are not UTF-8 limit=%d key=%s: skipping further ones without a "
                        "warning each", self._limit, _key_repr(raw))
        else:
            log.debug("etcd key is not UTF-8, skipped key=%s", _key_repr(raw))


# --------------------------------------------------------------------------
# etcd implementation
# --------------------------------------------------------------------------



def event_from_pb(ev, key: str) -> WatchEvent:
    """``ev`` as a :class:`WatchEvent`; ``key`` is its key, already decoded (see KeyDecoder)."""
    kv = ev.kv
    if ev.type == kv_pb2.Event.DELETE:
        return WatchEvent(kind="delete", key=key, value=b"", mod_revision=kv.mod_revision)
    return WatchEvent(
        kind="put",
        key=key,
        value=bytes(kv.value),
        mod_revision=kv.mod_revision,
        lease=kv.lease,
    )
