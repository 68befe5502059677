"""The coordination store: a small key/value + lease + watch interface.

Every piece of shared state in nlbfarm (node leases, the bucket table) goes
through :class:`Store`. The interface is deliberately small, in the spirit of
Patroni's DCS abstraction: the rest of the code depends on the contract below,
not on etcd or on python-etcd3.

Contract (every implementation must honour it)
==============================================

Data model
    Keys are ``str`` (UTF-8 in etcd), values are ``bytes``; encoding values
    (JSON, ...) is the caller's job. Every change gets a store-wide,
    strictly increasing *revision*; :class:`KV.mod_revision` is the revision of
    the last change to that key. Reads are linearizable (never stale).

    Keys that are not UTF-8 are skipped with a warning (one per distinct key;
    any other etcd client can write one): ``get``, ``get_prefix`` and resync
    snapshots omit them, watches do not deliver their changes but still
    advance past them. Everything else under the prefix is unaffected.

Leases
    :meth:`Store.grant_lease` returns a :class:`Lease` whose ``ttl`` is the TTL
    the server actually granted, which may be *longer* than requested (etcd 3.4
    enforces a minimum of ceil(1.5 x election timeout), 2 s with defaults).
    Keys written with ``lease_id`` are deleted by the server when the lease
    expires or is revoked. Writing with a lease that no longer exists raises
    :class:`LeaseExpired`; so does :meth:`Store.refresh_lease`. Revoking is
    idempotent.

Writes
    ``create`` writes only if the key does not exist (one atomic transaction);
    it never modifies an existing key. ``compare_and_swap`` writes only if the
    key's ``mod_revision`` still equals the expected one (0 = must not exist).
    Both return ``False`` -- not an exception -- when the condition does not
    hold. ``put`` overwrites unconditionally and returns the new revision.

Errors
    Connection-level failures (endpoint down, timeout, leader election) are
    retried with capped exponential backoff, rotating through the endpoints,
    until ``retry_deadline`` has passed; then the call raises
    :class:`~nlbfarm.errors.StoreUnavailable`, whose message names every
    endpoint and the last error. A call therefore returns or raises within
    about ``retry_deadline + timeout`` seconds. Any other failure raises
    :class:`~nlbfarm.errors.StoreError` (or :class:`LeaseExpired`) at once.
    Nothing outside the :mod:`nlbfarm.errors` tree escapes.

    Retries make ``grant_lease``, ``put`` and ``delete`` at-least-once (a
    retried grant may leave an orphan lease that simply expires; a retried
    delete whose first attempt was applied reports ``False``). ``create`` and
    ``compare_and_swap`` stay exactly-once; when a retry finds the key already
    holding exactly the value and lease this call wrote (our first attempt was
    applied but its reply was lost), they report ``True``.

Watches
    :meth:`Store.watch_prefix` delivers changes under a prefix to a callback,
    from a dedicated thread, one call at a time:

    * Events arrive in revision order. After the first delivery, every change
      with a higher revision is delivered at least once, across any number of
      connection losses, etcd restarts and endpoint switches: the watch
      resumes from the last delivered revision + 1. It never gives up; it
      stops only when its handle is cancelled or the store is closed.
    * If the history needed to resume has been compacted (or
      ``start_revision`` is older than the compaction point), the watch
      re-lists the prefix and delivers one ``"resync"`` event whose
      ``snapshot`` is the complete current content and whose ``mod_revision``
      is the revision of that read; the consumer must replace its cache with
      it. Events then continue from that revision + 1.
    * The same happens, with a warning, when etcd's revision is lower than
      the last delivered one (etcd restored from an older snapshot, or a new
      empty etcd at the same endpoints; also a ``start_revision`` beyond
      etcd's current revision): resuming there would wait for revisions this
      etcd may never reach.
    * With ``start_revision=None`` (or 0) the first delivery is a
      ``"resync"`` with the current content (a list-then-watch without a
      gap); with a ``start_revision`` the first deliveries are the changes
      from that revision on (pass ``get_prefix()[1] + 1`` to continue after
      a read).
    * A callback that raises is logged and skipped; the event is not
      redelivered. A slow callback delays later events, it does not lose them.

Thread safety
    A store may be used from any number of threads at once.
The implementation on etcd is :mod:`nlbfarm.coordinator.etcd`; this module
holds only the contract and its data types, so the decision core, the
simulation and the cache depend on no etcd or gRPC module.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

from nlbfarm.errors import StoreError

__all__ = [
    "KV",
    "Lease",
    "LeaseExpired",
    "StoreAuthError",
    "WatchEvent",
    "WatchHandle",
    "Store",
]


class LeaseExpired(StoreError):
    """The lease no longer exists (expired or revoked); keys bound to it are gone."""


class StoreAuthError(StoreError):
    """etcd refused our credentials (user name or password). Not retried: retrying cannot fix it."""


@dataclass(frozen=True)
class KV:
    """One key as read from the store. ``lease`` is 0 when not lease-bound."""

    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Lease:
    """A granted lease. ``ttl`` is what the server granted (may exceed the request)."""

    id: int
    ttl: int


WatchKind = Literal["put", "delete", "resync"]


@dataclass(frozen=True)
class WatchEvent:
    """One change delivered by :meth:`Store.watch_prefix`.

    ``put``:    ``key``/``value``/``lease`` are the new content.
    ``delete``: ``value`` is ``b""``; ``mod_revision`` is the deletion revision.
    ``resync``: ``key`` is the watched prefix; ``snapshot`` holds the complete
                current content under it and ``mod_revision`` the revision it
                was read at. Replace the cache with it.
    """

    kind: WatchKind
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0
    snapshot: Mapping[str, KV] | None = field(default=None, compare=False)
    # On a resync: etcd's revision went backwards (a restore, a new etcd), so
    # this read is newer than anything held, though its revision is lower.
    rewound: bool = False


class WatchHandle(abc.ABC):
    """Returned by :meth:`Store.watch_prefix`."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop the watch. Idempotent. No callback starts after this returns,
        except when called from inside the callback itself."""


class Store(abc.ABC):
    """Coordination store contract; see the module docstring for the guarantees."""

    @abc.abstractmethod
    def grant_lease(self, ttl: int) -> Lease:
        """Grant a lease of at least ``ttl`` seconds; returns the granted lease."""

    @abc.abstractmethod
    def refresh_lease(self, lease_id: int, deadline: float | None = None) -> int:
        """Renew the lease to its full TTL; returns that TTL in seconds.

        ``deadline`` overrides the store's retry deadline for this call (a
        keepalive wants to fail fast and try again on its next tick).
        Raises :class:`LeaseExpired` if the lease no longer exists."""

    def refresh_leases(self, lease_ids, deadline: float | None = None) -> dict[int, int]:
        """Renew several leases together; their TTLs by lease id. Raises
        :class:`LeaseExpired` if any is gone. Stores with a keepalive stream
        send them in one round."""
        return {i: self.refresh_lease(i, deadline) for i in lease_ids}

    @abc.abstractmethod
    def revoke_lease(self, lease_id: int, deadline: float | None = None) -> None:
        """Revoke the lease, deleting its keys. Idempotent (no error if gone)."""

    @abc.abstractmethod
    def create(self, key: str, value: bytes, lease_id: int | None = None,
               deadline: float | None = None) -> bool:
        """Write ``key`` only if it does not exist. ``False`` if it exists
        (its value and lease are left untouched)."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes, lease_id: int | None = None, deadline: float | None = None) -> int:
        """Write ``key`` unconditionally; returns the new revision.

        ``deadline`` (on every write) overrides the retry deadline for this
        call: the agent's loop must not sit in retries longer than its lease."""

    @abc.abstractmethod
    def get(self, key: str) -> KV | None:
        """The key's current content, or ``None`` if it does not exist."""

    @abc.abstractmethod
    def get_prefix(self, prefix: str) -> tuple[dict[str, KV], int]:
        """All keys under ``prefix`` and the store revision they were read at."""

    @abc.abstractmethod
    def compare_and_swap(
        self, key: str, value: bytes, expected_mod_revision: int, lease_id: int | None = None,
        deadline: float | None = None,
    ) -> bool:
        """Write ``key`` only if its mod_revision equals ``expected_mod_revision``
        (0: only if it does not exist). ``False`` if it did not match."""

    @abc.abstractmethod
    def delete(self, key: str, deadline: float | None = None) -> bool:
        """Delete ``key``; ``True`` if it existed."""

    @abc.abstractmethod
    def delete_if_unchanged(self, expected: Mapping[str, int], deadline: float | None = None) -> bool:
        """Delete every key of ``expected`` in one transaction, only if each key's
        mod_revision still equals its expected one (0: the key must not exist).
        ``False`` (nothing deleted) if any did not match, also when a retry
        finds that the first attempt was applied."""

    @abc.abstractmethod
    def watch_prefix(
        self,
        prefix: str,
        on_event: Callable[[WatchEvent], None],
        start_revision: int | None = None,
    ) -> WatchHandle:
        """Deliver every change under ``prefix`` to ``on_event`` (see module doc)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Cancel all watches and release connections. Idempotent."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
