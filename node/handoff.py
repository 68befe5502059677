"""Hitless restarts: what one farmd process hands to the next on the same node.

A restart that moves no bucket needs the new process to continue exactly
where the old one stopped: the same leases (so peers see no member leave),
the same kernel ruleset (so no packet meets a gap), the same drains. The old
process keeps a **state file** (``node.state_dir``, tmpfs by default) that
says which leases it holds and what its kernel accepts; the new one adopts
them if etcd still shows them as the old process's, and starts from nothing
otherwise.

**Planned restart** (SIGUSR2, ``systemctl reload farmd``): the old process
marks its member record ``handing_over`` (a compare-and-swap on its own
record), stops its threads, renews its leases one last time, and writes a
fence element that lasts until its lease-based deadline (``last keepalive +
lease_ttl - margin``), not just ``fence_timeout``: the window in which a
successor may take over. Then it exits, leaving the VIP, the rules and the
application as they are. Peers do not treat the missing listener as death
(``node/liveness.py``): the record says a successor is coming.

**Adoption** (any start): the successor finds the state file, checks that
``members/<id>`` is still bound to the same lease and names the same
instance, renews both leases, and swaps its own instance into the record
with a compare-and-swap on the record's revision. Whoever changed the record
meanwhile (a peer that certified the old process dead, an operator, a second
successor) makes the swap fail, and the successor registers anew instead.
Only after the swap does it write a fence element; until then the old
element (which cannot outlive the old lease) is all that serves.

Everything here except the file's I/O is pure, so the simulation runs it.
"""
from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from nlbfarm.coordinator.cluster import Member, expand
from nlbfarm.node.decide import LeaseView, LocalState, Timing, fence_deadline, keepalive_fresh

log = logging.getLogger("nlbfarm.handoff")

# The file comes from a previous process, but anyone with write access to the
# directory could put one there: bound what is read.
MAX_STATE_BYTES = 256 * 1024
MAX_RANGES = 65536
MAX_CHECKS = 256
STATE_VERSION = 1
DEFAULT_STATE_DIR = "/run/nlbfarm"


class AdoptRefusal(enum.Enum):
    """Why a successor starts from nothing instead of adopting its predecessor's lease."""

    NO_STATE = "no state file"
    UNREADABLE = "state file unreadable"
    OTHER_NODE = "state file of another node or cluster"
    OTHER_BOOT = "state file from before a reboot"
    NO_RECORD = "member record gone (the old leases ended or a peer took over)"
    OTHER_LEASE = "member record bound to another lease"
    OTHER_INSTANCE = "member record names another agent process"
    LEASE_GONE = "the old lease expired before the successor renewed it"
    SWAP_LOST = "the member record changed before the successor swapped itself in"
    # These two retire the predecessor's registration (close its element,
    # revoke its leases) before registering anew: its kernel state cannot be
    # trusted to be current, but the node is surely not serving with it.
    FENCE_LAPSED = "the previous agent's fence element had expired (its view of the farm is stale)"
    REWOUND = "etcd's history is older than the previous agent's (a restore)"


class HandoffRefusal(enum.Enum):
    """Why a planned restart is refused (the agent keeps running)."""

    NOT_REGISTERED = "not registered"
    LEAVING = "already leaving"
    KEEPALIVE_LATE = "etcd keepalives are late: a successor could not renew the lease in time"
    NO_RULESET = "no ruleset applied yet"
    FENCE_CLOSED = "the fence is closed"


@dataclass(frozen=True)
class HandoffState:
    """What the state file holds. Times are CLOCK_MONOTONIC seconds (shared by every process of one boot)."""

    node_id: str
    prefix: str
    boot_id: str
    instance: str
    pid: int
    pid_start: int  # the process's start time (clock ticks since boot): a pid is reused
    lease_id: int
    applied_lease: int
    table: str
    interface: str
    # The kernel ruleset's bucket ranges, as the last apply wrote them.
    accepting: tuple[tuple[int, int], ...] = ()
    draining: tuple[tuple[int, int], ...] = ()
    guarded: tuple[tuple[int, int], ...] = ()
    # The loop's drains: bucket -> (deadline, released at).
    drains: Mapping[int, tuple[float, float]] = field(default_factory=lambda: MappingProxyType({}))
    acquire_after: float = 0.0
    # Health-check verdicts: name -> (state, cause), so the successor does not
    # start from "unknown" (and announce "starting").
    checks: Mapping[str, tuple[str, str]] = field(default_factory=lambda: MappingProxyType({}))
    # A planned restart: the predecessor's fence element lasts until then (0: it did not hand over).
    handing_over_until: float = 0.0
    # The etcd revision the predecessor had read up to: a lower one now means a restore.
    revision: int = 0

    def encode(self) -> bytes:
        return json.dumps({
            "version": STATE_VERSION, "node_id": self.node_id, "prefix": self.prefix,
            "boot_id": self.boot_id, "instance": self.instance, "pid": self.pid, "pid_start": self.pid_start,
            "revision": self.revision,
            "lease_id": self.lease_id, "applied_lease": self.applied_lease, "table": self.table,
            "interface": self.interface, "accepting": [list(r) for r in self.accepting],
            "draining": [list(r) for r in self.draining], "guarded": [list(r) for r in self.guarded],
            "drains": [[b, d, r] for b, (d, r) in sorted(self.drains.items())],
            "acquire_after": self.acquire_after, "handing_over_until": self.handing_over_until,
            "checks": {n: list(v) for n, v in sorted(self.checks.items())},
        }, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "HandoffState":
        """Raises ValueError naming the first problem."""
        if len(raw) > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
            raise ValueError(f"not a version {STATE_VERSION} state object")
        text = {k: _text(d, k) for k in ("node_id", "prefix", "boot_id", "instance", "table", "interface")}
        ints = {k: _int(d, k, 0, 2 ** 63 - 1) for k in ("pid", "pid_start", "lease_id", "applied_lease",
                                                        "revision")}
        times = {k: _time(d, k) for k in ("acquire_after", "handing_over_until")}
        ranges = {k: _ranges(d, k) for k in ("accepting", "draining", "guarded")}
        drains_raw = d.get("drains")
        if not isinstance(drains_raw, list) or len(drains_raw) > MAX_RANGES:
            raise ValueError(f"drains must be a list of at most {MAX_RANGES} entries")
        drains = {}
        for item in drains_raw:
            if (not isinstance(item, list) or len(item) != 3 or not _is_int(item[0]) or not 0 <= item[0] < 65536
                    or not all(_is_num(x) for x in item[1:])):
                raise ValueError("drains entries must be [bucket, deadline, released_at]")
            drains[item[0]] = (float(item[1]), float(item[2]))
        checks_raw = d.get("checks", {})
        if not isinstance(checks_raw, dict) or len(checks_raw) > MAX_CHECKS:
            raise ValueError(f"checks must be an object of at most {MAX_CHECKS} entries")
        checks = {}
        for name, v in checks_raw.items():
            if (len(name) > 256 or not isinstance(v, list) or len(v) != 2
                    or not all(isinstance(x, str) and len(x) <= 512 for x in v)):
                raise ValueError("checks entries must be name: [state, cause]")
            checks[name] = (v[0], v[1])
        return cls(**text, **ints, **ranges, drains=MappingProxyType(drains), **times,
                   checks=MappingProxyType(checks))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and v == v and abs(v) < 1e12


def _text(d: dict, k: str) -> str:
    v = d.get(k)
    if not isinstance(v, str) or len(v) > 256:
        raise ValueError(f"{k} must be a string of at most 256 characters")
    return v


def _int(d: dict, k: str, lo: int, hi: int) -> int:
    v = d.get(k)
    if not _is_int(v) or not lo <= v <= hi:
        raise ValueError(f"{k} must be an integer from {lo} to {hi}")
    return v


def _time(d: dict, k: str) -> float:
    v = d.get(k)
    if not _is_num(v):
        raise ValueError(f"{k} must be a number of seconds")
    return float(v)


def _ranges(d: dict, k: str) -> tuple[tuple[int, int], ...]:
    v = d.get(k)
    if not isinstance(v, list) or len(v) > MAX_RANGES:
        raise ValueError(f"{k} must be a list of at most {MAX_RANGES} ranges")
    out = []
    for r in v:
        if (not isinstance(r, list) or len(r) != 2 or not all(_is_int(x) for x in r)
                or not 0 <= r[0] <= r[1] < 65536):
            raise ValueError(f"{k} entries must be [first, last] buckets from 0 to 65535")
        out.append((r[0], r[1]))
    return tuple(out)


# ---- the pure rules -------------------------------------------------------------------

def handoff_refusal(view: LeaseView, timing: Timing, now: float, *, leaving: bool, ruleset: bool,
                    link_up: bool, member_present: bool) -> HandoffRefusal | None:
    """May this process hand over to a successor now? None: yes."""
    if not view.registered or view.lost:
        return HandoffRefusal.NOT_REGISTERED
    if leaving:
        return HandoffRefusal.LEAVING
    if not ruleset:
        return HandoffRefusal.NO_RULESET
    if not keepalive_fresh(view, timing, now):
        return HandoffRefusal.KEEPALIVE_LATE
    if fence_deadline(view, timing, link_up, member_present)[0] is None:
        return HandoffRefusal.FENCE_CLOSED
    return None


def handoff_until(view: LeaseView, timing: Timing, link_up: bool, member_present: bool) -> float | None:
    """Until when the handing-over process's fence element may last.

    The lease-based deadline, never rule E's: a successor needs etcd to adopt
    anyway, and the deadline is what keeps the element from outliving the
    lease that etcd would expire if no successor comes.
    """
    if view.consensus_at is not None and view.consensus_at > (view.last_ok_sent or 0):
        return None
    until, _why = fence_deadline(view, timing, link_up, member_present)
    return until


def adoption_refusal(state: HandoffState | None, me: str, prefix: str, boot_id: str,
                     record_lease: int | None, record: Member | None) -> AdoptRefusal | None:
    """May a new process adopt what ``state`` describes, given ``members/<me>`` as read? None: yes."""
    if state is None:
        return AdoptRefusal.NO_STATE
    if state.node_id != me or state.prefix != prefix:
        return AdoptRefusal.OTHER_NODE
    if state.boot_id != boot_id:
        return AdoptRefusal.OTHER_BOOT
    if record_lease is None:
        return AdoptRefusal.NO_RECORD
    if record is None or record.instance != state.instance:
        return AdoptRefusal.OTHER_INSTANCE
    if record_lease != state.lease_id:
        return AdoptRefusal.OTHER_LEASE
    return None


def continuity_refusal(state: HandoffState, element_left_s: float, revision: int) -> AdoptRefusal | None:
    """Is the predecessor's kernel state still current? None: yes, adopt it.

    Only while its fence element lives: until then it was entitled to what it
    accepted (the element cannot outlive its lease, and the successor's
    keepalive renews that lease before it ends). After, peers may have taken
    its buckets; and an etcd whose history is older than the predecessor's
    (a restore) may show it owning buckets that others serve now.
    """
    if element_left_s <= 0:
        return AdoptRefusal.FENCE_LAPSED
    if revision < state.revision:
        return AdoptRefusal.REWOUND
    return None


def local_after_adoption(state: HandoffState, node_state: str, reason: str) -> LocalState:
    """The loop's state in the successor: the predecessor's kernel and drains, nothing published yet.

    ``published=None`` makes the first cycle publish ``applied/<me>`` again
    (same contents): the successor does not trust a record it did not write.
    """
    return LocalState(accepting=expand(state.accepting), draining=MappingProxyType(dict(state.drains)),
                      node_state=node_state, state_reason=reason)


# ---- the file ------------------------------------------------------------------------------

def state_path(state_dir: str, cluster: str, node_id: str) -> str:
    return os.path.join(state_dir, f"farmd-{cluster}-{node_id}.json")


def process_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (None: no such process, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] == "Z":
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def predecessor_alive(state: HandoffState) -> bool:
    """Is the process that wrote ``state`` still running (not just its pid reused)?"""
    return state.pid != os.getpid() and process_start(state.pid) == state.pid_start


def boot_id() -> str:
    """This boot's id: monotonic times in a state file mean nothing after a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def write_state(path: str, state: HandoffState) -> None:
    """Atomically (a rename), readable by root only. Raises OSError."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(state.encode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_state(path: str) -> tuple[HandoffState | None, str]:
    """The state file, or (None, why)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, AdoptRefusal.NO_STATE.value
    except OSError as exc:
        return None, f"{AdoptRefusal.UNREADABLE.value}: {exc.strerror}"
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_STATE_BYTES + 1)
    try:
        return HandoffState.decode(raw), ""
    except ValueError as exc:
        return None, f"{AdoptRefusal.UNREADABLE.value}: {exc}"


def remove_state(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove the state file path=%s reason=%s", path, exc.strerror)
