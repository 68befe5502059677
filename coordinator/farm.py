"""The farm's records in etcd, spoken as domain verbs.

:class:`FarmStore` is the only place that builds a key under the cluster
prefix or encodes a record for it (Patroni's DCS layer): the agent says
``register(member, lease)`` or ``publish_applied(...)``, never ``put(key,
bytes)``. :class:`ClusterCache` is the agent's copy of the prefix, fed by the
watch, from which immutable ``ClusterSnapshot`` s are built.

The prefix is always matched with its trailing slash, so cluster ``web``
never reads cluster ``web2``'s keys.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from nlbfarm.coordinator.cluster import (
    Applied, ClusterSettings, ClusterSnapshot, DrainRequest, Member, TableRecord, applied_key,
    build_snapshot, cluster_key, drain_key, member_key, table_key)
from nlbfarm.coordinator.handover import TableUpdate
from nlbfarm.coordinator.store import KV, Lease, Store, WatchHandle

log = logging.getLogger("nlbfarm.farm")

# Warnings about malformed records, remembered so each is logged once; bounded,
# because the records come from outside.
MAX_REMEMBERED_WARNINGS = 1000


class FarmStore:
    def __init__(self, store: Store, prefix: str):
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.scope = self.prefix + "/"

    # ---- cluster settings --------------------------------------------------------

    def propose_settings(self, settings: ClusterSettings) -> bool:
        """Create the cluster record if there is none; True if this call created it."""
        return self.store.create(cluster_key(self.prefix), settings.encode())

    def settings(self) -> tuple[ClusterSettings | None, str | None]:
        """The cluster record, or (None, why) if it is missing or unusable."""
        kv = self.store.get(cluster_key(self.prefix))
        if kv is None:
            return None, "missing"
        try:
            return ClusterSettings.decode(kv.value), None
        except ValueError as exc:
            return None, str(exc)

    # ---- leases and the member record ----------------------------------------------

    def grant(self, ttl: int) -> Lease:
        return self.store.grant_lease(ttl)

    def refresh(self, lease_id: int, deadline: float | None = None) -> int:
        return self.store.refresh_lease(lease_id, deadline=deadline)

    def refresh_all(self, lease_ids, deadline: float | None = None) -> dict[int, int]:
        """Renew this node's leases in one round (LeaseExpired if any is gone)."""
        return self.store.refresh_leases([i for i in lease_ids if i], deadline=deadline)

    def revoke(self, lease_id: int, deadline: float | None = None) -> None:
        self.store.revoke_lease(lease_id, deadline=deadline)

    def register(self, member: Member, lease_id: int) -> bool:
        """Create members/<id> bound to the lease; False if a record exists."""
        return self.store.create(member_key(self.prefix, member.id), member.encode(), lease_id=lease_id)

    def member_record(self, node_id: str) -> tuple[KV | None, Member | None]:
        kv = self.store.get(member_key(self.prefix, node_id))
        if kv is None:
            return None, None
        try:
            return kv, Member.decode(node_id, kv.value)
        except ValueError:
            return kv, None

    def swap_member(self, member: Member, lease_id: int, expected_revision: int) -> bool:
        """Rewrite members/<id> only if it is still at ``expected_revision``; False if it changed.

        A hitless restart's two steps: the old process marks its record
        handing over, the new one swaps its own instance in.
        """
        return self.store.compare_and_swap(member_key(self.prefix, member.id), member.encode(),
                                           expected_revision, lease_id=lease_id)

    def retire_dead(self, node_id: str, member_revision: int, applied_revision: int,
                    deadline: float | None = None) -> bool:
        """A peer's certificate of death: delete members/<id> and applied/<id> together, only
        if neither changed since it was read (applied_revision 0: it must not exist).

        Both go at once, as when their leases expire: peers take the node's
        buckets right away (see node/liveness.py for when that is safe).
        """
        return self.store.delete_if_unchanged(
            {member_key(self.prefix, node_id): member_revision, applied_key(self.prefix, node_id): applied_revision},
            deadline=deadline)

    def applied_record(self, node_id: str) -> KV | None:
        return self.store.get(applied_key(self.prefix, node_id))

    def announce(self, member: Member, lease_id: int, deadline: float | None = None) -> int:
        """Rewrite this node's member record (state changes, or re-creating a deleted one)."""
        return self.store.put(member_key(self.prefix, member.id), member.encode(), lease_id=lease_id,
                              deadline=deadline)

    def publish_applied(self, node_id: str, report: Applied, lease_id: int,
                        deadline: float | None = None) -> int:
        return self.store.put(applied_key(self.prefix, node_id), report.encode(), lease_id=lease_id,
                              deadline=deadline)

    # ---- the table and drains --------------------------------------------------------

    def write_table(self, update: TableUpdate, deadline: float | None = None) -> bool:
        return self.store.compare_and_swap(table_key(self.prefix),
                                           TableRecord.encode(update.generation, update.owners),
                                           update.expected_revision, deadline=deadline)

    def request_drain(self, node_id: str, timeout: float | None) -> None:
        self.store.put(drain_key(self.prefix, node_id), DrainRequest(timeout).encode())

    def cancel_drain(self, node_id: str) -> bool:
        return self.store.delete(drain_key(self.prefix, node_id))

    # ---- reading and watching ------------------------------------------------------

    def read_all(self) -> tuple[dict[str, tuple[bytes, int, int]], int]:
        """Every key of the cluster as (value, mod_revision, lease), and the revision read at."""
        items, rev = self.store.get_prefix(self.scope)
        return {k: (kv.value, kv.mod_revision, kv.lease) for k, kv in items.items()}, rev

    def watch(self, on_event: Callable, start_revision: int) -> WatchHandle:
        return self.store.watch_prefix(self.scope, on_event, start_revision=start_revision)


class ClusterCache:
    """The agent's copy of every key under the cluster prefix, fed by the watch.

    Holds (value, mod_revision, lease) per key; snapshots are built lazily and
    cached per version.
    """

    def __init__(self, prefix: str, wake: threading.Event):
        self.prefix = prefix.rstrip("/")
        self._wake = wake
        # (monotonic time, revision) of the first membership change not yet
        # applied, for the change-to-apply histogram; the loop clears it.
        self.member_change_at: tuple[float, int] | None = None
        self._lock = threading.Lock()
        self._items: dict[str, tuple] = {}
        self._revision = 0
        # Events at or below the revision of the last full read are already in
        # it; a lagging watch must not roll the cache back (e.g. after the
        # agent re-read the prefix on re-registration).
        self._floor = 0
        self._version = 0
        self._snapshot: ClusterSnapshot | None = None
        self._snapshot_version = -1
        self._warned: set[str] = set()
        # The revision of the last resync after etcd's history went back.
        self.trust_after = 0

    def reset(self, items: dict[str, tuple], revision: int, authoritative: bool = False) -> None:
        """Replace the cache with a full read.

        ``authoritative``: the watch's resync after etcd's revision went
        backwards (a restore, a new etcd) is newer in time than anything held
        here, though its revision is lower. Any other older read is not: it
        was made before a fresher one and must not roll the cache back.
        """
        with self._lock:
            if revision <= self._revision and not authoritative:
                # The watch has already delivered this read's revision or a later
                # one (it raced the read): the cache is at least as new, and
                # replacing it would lose the events after ``revision`` for good.
                self._floor = max(self._floor, revision)
                return
            self._items = dict(items)
            self._revision = self._floor = revision
            if authoritative:
                self.trust_after = revision
            self._version += 1
        self._wake.set()

    @property
    def revision(self) -> int:
        return self._revision

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def forked(self, items: dict[str, tuple], revision: int) -> str | None:
        """A full read whose history is not this cache's: the first key that says so, or None.

        In one linear history, every key of a later read last written at or
        below the revision this cache has reached was in the cache with that
        very mod_revision and value. A restore to a snapshot whose revision is *higher*
        (a second restore, of a backup taken before the first) passes the
        watch's "revision went back" test; this catches it.
        """
        with self._lock:
            if revision < self._revision:
                return None  # an older read (it raced a newer one): reset() keeps the cache
            for key, item in items.items():
                # The same revision number may name another write in the other
                # history: the value must be the same too.
                cur = self._items.get(key)
                if item[1] <= self._revision and (cur is None or cur[:2] != item[:2]):
                    return key
        return None

    def on_event(self, ev) -> None:
        if ev.kind == "resync":
            items = {k: (kv.value, kv.mod_revision, kv.lease) for k, kv in ev.snapshot.items()}
            fork = None if ev.rewound else self.forked(items, ev.mod_revision)
            if fork is not None:
                log.warning("etcd history changed under the watch key=%s revision=%d seen_up_to=%d: the key "
                            "disagrees with what this node saw (a restore?); re-reading everything and trusting no "
                            "applied record until its node writes it again", fork, ev.mod_revision, self._revision)
            self.reset(items, ev.mod_revision, authoritative=ev.rewound or fork is not None)
            return
        if not ev.key.startswith(self.prefix + "/"):
            return
        with self._lock:
            if ev.mod_revision <= self._floor:
                return
            if "/members/" in ev.key and self.member_change_at is None:
                old = self._items.get(ev.key)
                if ev.kind == "delete" or old is None or old[0] != ev.value:
                    self.member_change_at = (time.monotonic(), ev.mod_revision)
            if ev.kind == "put":
                self._items[ev.key] = (ev.value, ev.mod_revision, ev.lease)
                self._revision = max(self._revision, ev.mod_revision)
            elif ev.kind == "delete":
                self._items.pop(ev.key, None)
                self._revision = max(self._revision, ev.mod_revision)
            self._version += 1
        self._wake.set()

    def snapshot(self) -> ClusterSnapshot:
        with self._lock:
            if self._snapshot is None or self._snapshot_version != self._version:
                self._snapshot = build_snapshot(self.prefix, self._items, self._revision, self.trust_after)
                self._snapshot_version = self._version
            snap = self._snapshot
        for w in snap.warnings:
            if w not in self._warned and len(self._warned) < MAX_REMEMBERED_WARNINGS:
                self._warned.add(w)
                log.warning("etcd record problem detail=%s", w)
        return snap
