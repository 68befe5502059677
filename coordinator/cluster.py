"""What the nodes agree on through etcd: key layout, records and the snapshot.

Key layout under ``<prefix>`` (``<etcd.prefix>/<cluster.name>``):

``cluster``            {"seed": int, "buckets": int}; created once, never changed
``members/<id>``       {"id", "weight", "state", "addresses", "version"}; bound to the node's lease
``applied/<id>``       {"generation", "accepting", "draining": [[lo, hi]...], "draining_connections"};
                       bound to the node's lease
``table``              {"generation": int, "buckets": int, "owners": {...}}; written by CAS
``drain/<id>``         {"timeout": seconds | null}; an operator's drain request, no lease

``ClusterSnapshot`` is an immutable view built from a consistent cache of
those keys. Malformed values are skipped with a warning naming the key, so a
bad write by a tool or a newer agent version never crashes a node.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from nlbfarm.coordinator.table import decode_owners, encode_owners

log = logging.getLogger(__name__)

# Only "active" members get buckets. "starting": the farm module's checks have
# not passed yet; "failed": a check failed (the node withdrew by itself);
# "stopped": a failed check stopped the application (on_failure: stop).
MEMBER_STATES = ("starting", "active", "failed", "draining", "leaving", "stopped")


def cluster_key(prefix: str) -> str:
    return f"{prefix}/cluster"


def member_key(prefix: str, node_id: str) -> str:
    return f"{prefix}/members/{node_id}"


def applied_key(prefix: str, node_id: str) -> str:
    return f"{prefix}/applied/{node_id}"


def table_key(prefix: str) -> str:
    return f"{prefix}/table"


def drain_key(prefix: str, node_id: str) -> str:
    return f"{prefix}/drain/{node_id}"


def _ranges(value, what: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of [first, last] bucket ranges")
    out = []
    for r in value:
        if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(x, int) and x >= 0 for x in r)
                or r[0] > r[1]):
            raise ValueError(f"{what} must be a list of [first, last] bucket ranges, got {r!r}")
        out.append((r[0], r[1]))
    return tuple(out)


def expand(ranges) -> frozenset[int]:
    return frozenset(b for lo, hi in ranges for b in range(lo, hi + 1))


@dataclass(frozen=True)
class Member:
    id: str
    weight: int
    state: str = "active"
    addresses: tuple[str, ...] = ()
    version: str = ""
    # Random per agent process: lets an agent recognise its own registration
    # (a create whose reply was lost) without mistaking a real duplicate for it.
    instance: str = ""
    # host:port of the node's read-only peer API ("" if it has none).
    peer: str = ""
    # Why the node is in its state, for operators ("check http failing: HTTP 503").
    reason: str = ""
    # Digest of the node's traffic rules (VIPs, port rules, unmatched policy):
    # nodes that disagree would hash the same packet differently.
    rules: str = ""

    def encode(self) -> bytes:
        return json.dumps({"id": self.id, "weight": self.weight, "state": self.state,
                           "addresses": list(self.addresses), "version": self.version,
                           "instance": self.instance, "peer": self.peer, "reason": self.reason,
                           "rules": self.rules}, sort_keys=True).encode()

    @classmethod
    def decode(cls, node_id: str, raw: bytes) -> "Member":
        d = _json_object(raw)
        if d.get("id") != node_id:
            raise ValueError(f"id {d.get('id')!r} does not match its key {node_id!r}")
        weight = d.get("weight")
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 1000:
            raise ValueError(f"weight must be an integer from 0 to 1000, got {weight!r}")
        state = d.get("state", "active")
        if state not in MEMBER_STATES:
            raise ValueError(f"state must be one of {', '.join(MEMBER_STATES)}, got {state!r}")
        addresses = d.get("addresses", [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError("addresses must be a list of strings")
        version, instance, peer = d.get("version", ""), d.get("instance", ""), d.get("peer", "")
        reason, rules = d.get("reason", ""), d.get("rules", "")
        if not all(isinstance(v, str) for v in (version, instance, peer, reason, rules)):
            raise ValueError("version, instance, peer, reason and rules must be strings")
        return cls(node_id, weight, state, tuple(addresses), version, instance, peer, reason, rules)


@dataclass(frozen=True)
class ClusterSettings:
    seed: int
    buckets: int

    def encode(self) -> bytes:
        return json.dumps({"seed": self.seed, "buckets": self.buckets}, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "ClusterSettings":
        d = _json_object(raw)
        seed, buckets = d.get("seed"), d.get("buckets")
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
            raise ValueError(f"seed must be a 32-bit unsigned integer, got {seed!r}")
        if not isinstance(buckets, int) or buckets < 64 or buckets > 65536 or buckets & (buckets - 1):
            raise ValueError(f"buckets must be a power of two from 64 to 65536, got {buckets!r}")
        return cls(seed, buckets)


@dataclass(frozen=True)
class TableRecord:
    generation: int
    buckets: int
    owners: tuple[str | None, ...]
    mod_revision: int = 0

    @staticmethod
    def encode(generation: int, owners: list[str | None]) -> bytes:
        return json.dumps({"generation": generation, "buckets": len(owners),
                           "owners": encode_owners(owners)}, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, mod_revision: int, expected_buckets: int | None) -> "TableRecord":
        d = _json_object(raw)
        gen, buckets = d.get("generation"), d.get("buckets")
        if not isinstance(gen, int) or gen < 1:
            raise ValueError(f"generation must be a positive integer, got {gen!r}")
        if expected_buckets is not None and buckets != expected_buckets:
            raise ValueError(f"has {buckets!r} buckets, the cluster has {expected_buckets}")
        owners = decode_owners(d.get("owners"), buckets=buckets)
        return cls(gen, buckets, tuple(owners), mod_revision)

    def owned_by(self, node_id: str) -> frozenset[int]:
        return frozenset(i for i, o in enumerate(self.owners) if o == node_id)


@dataclass(frozen=True)
class Applied:
    """What a node reports about its kernel: the generation it applied, and
    the released buckets in which it still serves established connections."""

    generation: int
    accepting: int = 0
    draining: tuple[tuple[int, int], ...] = ()
    draining_connections: int = 0

    def encode(self) -> bytes:
        return json.dumps({"generation": self.generation, "accepting": self.accepting,
                           "draining": [list(r) for r in self.draining],
                           "draining_connections": self.draining_connections}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Applied":
        d = _json_object(raw)
        gen, acc = d.get("generation"), d.get("accepting", 0)
        conns = d.get("draining_connections", 0)
        if not isinstance(gen, int) or gen < 0:
            raise ValueError(f"generation must be a non-negative integer, got {gen!r}")
        for name, v in (("accepting", acc), ("draining_connections", conns)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        return cls(gen, acc, _ranges(d.get("draining", []), "draining"), conns)

    @property
    def draining_buckets(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.draining)


@dataclass(frozen=True)
class DrainRequest:
    timeout: float | None = None   # seconds; None: the node's configured drain_timeout

    def encode(self) -> bytes:
        return json.dumps({"timeout": self.timeout}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "DrainRequest":
        d = _json_object(raw)
        t = d.get("timeout")
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 86400):
            raise ValueError(f"timeout must be seconds from 0 to 86400 or null, got {t!r}")
        return cls(None if t is None else float(t))


def _json_object(raw: bytes) -> dict:
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    return d


@dataclass(frozen=True)
class ClusterSnapshot:
    """One consistent view of the cluster at an etcd revision. Never mutated."""

    revision: int
    settings: ClusterSettings | None
    members: Mapping[str, Member]
    table: TableRecord | None
    applied: Mapping[str, Applied]
    warnings: tuple[str, ...] = field(default=())
    drains: Mapping[str, DrainRequest] = field(default_factory=dict)
    # mod_revision of the table key even when its value is malformed, so a
    # writer can replace a bad table by compare-and-swap (0: no key).
    table_revision: int = 0

    def candidates(self) -> dict[str, int]:
        """The members that should hold buckets, with their weights."""
        return {m.id: m.weight for m in self.members.values() if m.state == "active"}

    def draining_elsewhere(self, me: str) -> frozenset[int]:
        """Buckets in which a live peer still serves old connections."""
        out: set[int] = set()
        for node, a in self.applied.items():
            if node != me:
                out |= expand(a.draining)
        return frozenset(out)

    def live(self) -> frozenset[str]:
        """Nodes holding a live lease: they may still accept traffic."""
        return frozenset(self.members) | frozenset(self.applied)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.table:
            for o in self.table.owners:
                if o is not None:
                    out[o] = out.get(o, 0) + 1
        return out


def build_snapshot(prefix: str, items: Mapping[str, tuple[bytes, int]], revision: int) -> ClusterSnapshot:
    """Parse every key under ``prefix``; ``items`` maps key -> (value, mod_revision)."""
    warnings: list[str] = []
    settings = None
    members: dict[str, Member] = {}
    applied: dict[str, Applied] = {}
    drains: dict[str, DrainRequest] = {}
    table_raw = None

    def bad(key: str, exc: Exception) -> None:
        warnings.append(f"ignoring malformed value key={key} reason={exc}")

    for key, (value, mod_rev) in sorted(items.items()):
        rel = key[len(prefix) + 1:] if key.startswith(prefix + "/") else None
        if rel is None:
            continue
        try:
            if rel == "cluster":
                settings = ClusterSettings.decode(value)
            elif rel == "table":
                table_raw = (key, value, mod_rev)
            elif rel.startswith("members/"):
                nid = rel.removeprefix("members/")
                members[nid] = Member.decode(nid, value)
            elif rel.startswith("applied/"):
                applied[rel.removeprefix("applied/")] = Applied.decode(value)
            elif rel.startswith("drain/"):
                drains[rel.removeprefix("drain/")] = DrainRequest.decode(value)
        except ValueError as exc:
            bad(key, exc)
    table = None
    table_revision = 0
    if table_raw is not None:
        key, value, mod_rev = table_raw
        table_revision = mod_rev
        try:
            table = TableRecord.decode(value, mod_rev, settings.buckets if settings else None)
        except ValueError as exc:
            bad(key, exc)
    return ClusterSnapshot(revision, settings, MappingProxyType(members), table,
                           MappingProxyType(applied), tuple(warnings), MappingProxyType(drains),
                           table_revision)
