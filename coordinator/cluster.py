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

Everything here is decoded at the boundary with bounds, because anyone who
can write under the prefix (an operator, a script, a buggy peer) can put any
bytes there: bucket ranges lie inside B, generations and counts are capped,
values have a size cap, node ids in keys follow the node id syntax. A record
that must be bound to a lease (``members/``, ``applied/``) but is not, is
ignored: it would outlive any node. A lease-bound record that does not
decode still marks its node as *live* (the node may be serving; see
``ClusterSnapshot.live``), but gives it nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Mapping

from nlbfarm.coordinator.table import decode_owners, encode_owners

log = logging.getLogger(__name__)

# Only "active" members get buckets. "starting": the farm module's checks have
# not passed yet; "failed": a check failed (the node withdrew by itself);
# "stopped": a failed check stopped the application (on_failure: stop).
MEMBER_STATES = ("starting", "active", "failed", "draining", "leaving", "stopped")

# Bounds on what is read from etcd. Generations stay exact in JSON and in
# every language's doubles, and far below the API's uint64 fields.
MAX_GENERATION = 2 ** 53 - 1
MAX_COUNT = 2 ** 32 - 1
# The largest table (B = 65536, 64 nodes, no run longer than one bucket) and
# the most fragmented draining list stay well below these; etcd's own request
# limit is 1.5 MiB.
MAX_LARGE_VALUE = 1 << 20     # table, applied
MAX_SMALL_VALUE = 16 << 10    # cluster, members, drain
MAX_TEXT = 512                # one string field of a member record
MAX_ADDRESSES = 16
MAX_FENCE_MS = 300_000        # a member record's fence_ms (timing.lease_ttl is at most 300 s)
MAX_MEMO = 256                # owner sets a table record remembers
NODE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")
# A lease-bound record must say which lease: 0 means "no lease".
NO_LEASE = 0


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


def _ranges(value, what: str, buckets: int) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint, non-adjacent [first, last] ranges inside 0..buckets-1.

    The canonical form ``bucket_ranges`` writes; anything else is refused, so
    a hostile list can never expand to more than B buckets.
    """
    if not isinstance(value, list) or len(value) > buckets:
        raise ValueError(f"{what} must be a list of at most {buckets} [first, last] bucket ranges")
    out = []
    prev = -2
    for r in value:
        if (not isinstance(r, list) or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or not prev + 1 < r[0] <= r[1] < buckets):
            raise ValueError(f"{what} must be sorted, disjoint [first, last] bucket ranges inside "
                             f"0..{buckets - 1}, got {r!r}")
        out.append((r[0], r[1]))
        prev = r[1]
    return tuple(out)


def _int(value, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, got {value!r}"[:200])
    return value


def _text(value, name: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"{name} must be a string of at most {MAX_TEXT} characters")
    return value


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
    # A planned restart is under way: the process named by ``instance`` has
    # stopped and a successor is about to adopt this record (node/handoff.py).
    # Written only when true, so records of agents without it look as before.
    handing_over: bool = False
    # The longest fence element this agent process may have left in its
    # kernel, in milliseconds, outside a planned restart (which says
    # ``handing_over``). Peers that see the process die wait this long before
    # certifying it dead (node/liveness.py). 0: no figure, no certificate
    # (records of agents without it look as before).
    fence_ms: int = 0

    def encode(self) -> bytes:
        d = {"id": self.id, "weight": self.weight, "state": self.state,
             "addresses": list(self.addresses), "version": self.version,
             "instance": self.instance, "peer": self.peer, "reason": self.reason,
             "rules": self.rules}
        if self.handing_over:
            d["handing_over"] = True
        if self.fence_ms:
            d["fence_ms"] = self.fence_ms
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, node_id: str, raw: bytes) -> "Member":
        d = _json_object(raw, MAX_SMALL_VALUE)
        if d.get("id") != node_id:
            raise ValueError(f"id {str(d.get('id'))[:80]!r} does not match its key {node_id!r}")
        weight = _int(d.get("weight"), "weight", 0, 1000)
        state = d.get("state", "active")
        if state not in MEMBER_STATES:
            raise ValueError(f"state must be one of {', '.join(MEMBER_STATES)}, got {str(state)[:80]!r}")
        addresses = d.get("addresses", [])
        if (not isinstance(addresses, list) or len(addresses) > MAX_ADDRESSES
                or not all(isinstance(a, str) and len(a) <= MAX_TEXT for a in addresses)):
            raise ValueError(f"addresses must be a list of at most {MAX_ADDRESSES} strings")
        fields = {n: _text(d.get(n, ""), n) for n in ("version", "instance", "peer", "reason", "rules")}
        handing_over = d.get("handing_over", False)
        if not isinstance(handing_over, bool):
            raise ValueError(f"handing_over must be true or false, got {str(handing_over)[:80]!r}")
        fence_ms = _int(d.get("fence_ms", 0), "fence_ms", 0, MAX_FENCE_MS)
        return cls(node_id, weight, state, tuple(addresses), **fields, handing_over=handing_over,
                   fence_ms=fence_ms)


@dataclass(frozen=True)
class ClusterSettings:
    seed: int
    buckets: int

    def encode(self) -> bytes:
        return json.dumps({"seed": self.seed, "buckets": self.buckets}, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "ClusterSettings":
        d = _json_object(raw, MAX_SMALL_VALUE)
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
        d = _json_object(raw, MAX_LARGE_VALUE)
        gen, buckets = _int(d.get("generation"), "generation", 1, MAX_GENERATION), d.get("buckets")
        if expected_buckets is not None and buckets != expected_buckets:
            raise ValueError(f"has {str(buckets)[:40]} buckets, the cluster has {expected_buckets}")
        owners = decode_owners(d.get("owners"), buckets=buckets)
        return cls(gen, buckets, tuple(owners), mod_revision)

    def owned_by(self, node_id: str) -> frozenset[int]:
        owned = self._owned.get(node_id)
        if owned is None:
            owned = frozenset(i for i, o in enumerate(self.owners) if o == node_id)
            if len(self._owned) < MAX_MEMO:  # node ids come from outside: bounded
                self._owned[node_id] = owned
        return owned

    @cached_property
    def _owned(self) -> dict[str, frozenset[int]]:
        # The record never changes; every cycle asks for the same owners.
        return {}

    @cached_property
    def digest(self) -> str:
        """The contents' fingerprint, published with ``applied/``.

        Generations are unique only while every table is written by CAS from
        the one before; after an etcd restore or a hand-written table two
        different tables can carry one generation. Rule R therefore compares
        (generation, digest), never the generation alone.
        """
        return table_digest(self.owners)


def table_digest(owners) -> str:
    h = hashlib.blake2b(digest_size=8)
    for o in owners:
        h.update(b"\x00" if o is None else o.encode() + b"\x01")
    return h.hexdigest()


@dataclass(frozen=True)
class Applied:
    """What a node reports about its kernel: the generation it applied, and
    the released buckets in which it still serves established connections."""

    generation: int
    accepting: int = 0
    draining: tuple[tuple[int, int], ...] = ()
    draining_connections: int = 0
    # table_digest() of the table applied: (generation, table) names it.
    table: str = ""
    # The etcd revision at which the publisher last saw etcd's history go back
    # (a restore): it trusts no record written at or below it, and peers whose
    # own record is that old write theirs again (0: never).
    trust_after: int = 0
    # Where the record was read (0 when built locally); not encoded.
    mod_revision: int = field(default=0, compare=False)

    def encode(self) -> bytes:
        return json.dumps({"generation": self.generation, "accepting": self.accepting,
                           "draining": [list(r) for r in self.draining],
                           "draining_connections": self.draining_connections,
                           "table": self.table, "trust_after": self.trust_after}).encode()

    @classmethod
    def decode(cls, raw: bytes, buckets: int = 65536, mod_revision: int = 0) -> "Applied":
        """``buckets``: the cluster's B; ranges outside it are refused."""
        d = _json_object(raw, MAX_LARGE_VALUE)
        gen = _int(d.get("generation"), "generation", 0, MAX_GENERATION)
        acc = _int(d.get("accepting", 0), "accepting", 0, buckets)
        conns = _int(d.get("draining_connections", 0), "draining_connections", 0, MAX_COUNT)
        trust_after = _int(d.get("trust_after", 0), "trust_after", 0, MAX_GENERATION)
        table = d.get("table", "")
        if not isinstance(table, str) or not re.fullmatch(r"[0-9a-f]{0,64}", table):
            raise ValueError("table must be a hex digest")
        return cls(gen, acc, _ranges(d.get("draining", []), "draining", buckets), conns, table, trust_after,
                   mod_revision)

    def applies(self, table: "TableRecord", trust_after: int = 0) -> bool:
        """This record reports exactly ``table`` as applied (rule R's test), and was written
        after ``trust_after`` (the reader's last rewind of etcd's history)."""
        return (self.generation == table.generation and self.table == table.digest
                and (self.mod_revision > trust_after or not trust_after))

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
        d = _json_object(raw, MAX_SMALL_VALUE)
        t = d.get("timeout")
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 86400):
            raise ValueError(f"timeout must be seconds from 0 to 86400 or null, got {t!r}")
        return cls(None if t is None else float(t))


def _json_object(raw: bytes, limit: int) -> dict:
    if len(raw) > limit:
        raise ValueError(f"value of {len(raw)} bytes is larger than the {limit} allowed")
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON ({str(exc)[:120]})") from None
    except RecursionError:  # "[[[[..." nested deeper than the parser goes
        raise ValueError("not valid JSON (nested too deeply)") from None
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
    # Nodes with a lease-bound members/ or applied/ key that did not decode:
    # they may be serving, so they count as live, but they get nothing.
    unreadable: frozenset[str] = frozenset()
    # The revision at which this reader last saw etcd's history go back (a
    # restore): applied/ records at or below it may describe kernels that have
    # changed since, so rule R does not count them (0: never).
    trust_after: int = 0

    @cached_property
    def memo(self) -> dict:
        """Results of pure functions of this snapshot, computed once (it never changes).

        The cache hands out the same snapshot until etcd changes, and the loop
        decides on it several times a second: the table plan need not be
        rebalanced each time. Not a field: equality and ``replace`` ignore it.
        """
        return {}

    def republish_requested(self) -> int:
        """The highest rewind revision a live peer reports: a record at or below it must be written again."""
        return max([a.trust_after for a in self.applied.values() if a.trust_after <= self.revision]
                   + [self.trust_after])

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
        """Nodes holding a live lease: they may still accept traffic.

        Any lease-bound key counts, readable or not: a node whose member key
        was deleted by hand, or whose record a newer version wrote, still
        serves until its own fence closes.
        """
        return frozenset(self.members) | frozenset(self.applied) | self.unreadable

    def orphans(self) -> frozenset[str]:
        """Live nodes without a readable member record (only applied/, or unreadable)."""
        return self.live() - frozenset(self.members)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.table:
            for o in self.table.owners:
                if o is not None:
                    out[o] = out.get(o, 0) + 1
        return out


LEASE_BOUND = ("members/", "applied/")


def build_snapshot(prefix: str, items: Mapping[str, tuple], revision: int,
                   trust_after: int = 0) -> ClusterSnapshot:
    """Parse every key under ``prefix``.

    ``items`` maps key -> (value, mod_revision) or (value, mod_revision,
    lease). With the lease given (the agent's cache), ``members/`` and
    ``applied/`` keys without one are ignored.
    """
    warnings: list[str] = []
    raw: dict[str, list] = {"cluster": [], "table": []}
    members: dict[str, Member] = {}
    applied: dict[str, Applied] = {}
    drains: dict[str, DrainRequest] = {}
    unreadable: set[str] = set()

    def bad(key: str, exc: Exception) -> None:
        warnings.append(f"ignoring malformed value key={key} reason={exc}")

    scope = prefix.rstrip("/") + "/"
    later = []
    for key, entry in sorted(items.items()):
        if not key.startswith(scope):
            continue
        value, mod_rev = entry[0], entry[1]
        lease = entry[2] if len(entry) > 2 else None
        rel = key[len(scope):]
        if rel in ("cluster", "table"):
            raw[rel].append((key, value, mod_rev))
            continue
        kind, _, nid = rel.partition("/")
        kind += "/"
        if kind not in ("members/", "applied/", "drain/"):
            continue
        if not NODE_ID_RE.fullmatch(nid):
            warnings.append(f"ignoring key={key[:200]} reason=not a node id (1-63 of A-Za-z0-9_.-)")
            continue
        if kind in LEASE_BOUND and lease == NO_LEASE:
            warnings.append(f"ignoring key={key} reason=not bound to a lease (a {kind[:-1]} record "
                            "must be written with its node's lease)")
            continue
        later.append((kind, nid, key, value, mod_rev))

    settings = None
    for key, value, _rev in raw["cluster"]:
        try:
            settings = ClusterSettings.decode(value)
        except ValueError as exc:
            bad(key, exc)
    buckets = settings.buckets if settings else 65536
    for kind, nid, key, value, mod_rev in later:
        try:
            if kind == "members/":
                members[nid] = Member.decode(nid, value)
            elif kind == "applied/":
                applied[nid] = Applied.decode(value, buckets, mod_rev)
            else:
                drains[nid] = DrainRequest.decode(value)
        except ValueError as exc:
            bad(key, exc)
            if kind in LEASE_BOUND:
                unreadable.add(nid)
    table = None
    table_revision = 0
    for key, value, mod_rev in raw["table"]:
        table_revision = mod_rev
        try:
            table = TableRecord.decode(value, mod_rev, settings.buckets if settings else None)
        except ValueError as exc:
            bad(key, exc)
    return ClusterSnapshot(revision, settings, MappingProxyType(members), table,
                           MappingProxyType(applied), tuple(warnings), MappingProxyType(drains),
                           table_revision, frozenset(unreadable), trust_after)
