"""farmd's decisions as pure functions: observations in, a plan out.

Nothing here reads a clock, etcd, the kernel or a thread's flag. The loop
(``node/agent.py``) gathers :class:`Observations`, calls :func:`decide`, and
executes the :class:`Plan`; the lease keeper (``node/lease.py``) asks
:func:`fence_deadline` and :func:`answers_reachable`. The simulation
(``tests/sim``) runs these same functions for many nodes against a fake store
and clock, so every rule below is tried against faults and interleavings.

Timing (``Timing``, derived from the configuration; defaults in brackets:
lease_ttl T 3 s, fence_timeout Ft 0.4 s, keepalive_interval K 0.5 s,
etcd.timeout E 1 s, margin M 0.2 s, probe P = min(0.5, K), fence refresh
R = min(0.25, K/2, Ft/3)):

* The fence deadline is computed from *send* times of successful keepalives:
  ``last_ok_sent + T - M``. etcd counts the lease from when it *received* that
  keepalive, later, so the fence always closes before etcd can expire the
  lease. The kernel never gets an element that outlives the deadline
  (``dataplane.fence_ms``).
* Rule E (etcd down for everyone): a keepalive is *late* after 2K; the keeper
  then asks every peer. A unanimous "I cannot reach etcd either" from every
  peer, each identified by node id and instance and registered, started at
  time c, extends the deadline to ``c + W_E`` with
  ``W_E = Ft + K + 2P + R + M``: long enough to be renewed by the next probe
  round (every K, each at most P) before the kernel element must be shorter
  than Ft.
* The switch from the keepalive deadline to rule E must happen before the
  kernel element shrinks below Ft: ``2K + P + R + Ft + M <= T``
  (``Timing.problems`` names it; config validation refuses timings that break it).
* A node answers peers "I reach etcd" while ``now - last_ok_sent < 2K``
  (the fresh window, the age at which its own keepalive is late), and only
  once registered. A unanimous "no" must be possible before the asker's
  deadline: a peer's last success may come up to K after the asker's, it
  says "no" 2K later, the next probe comes within K + P, and the fence must be
  rewritten within R: ``4K + P + R + M <= T`` (``Timing.problems``).
* A probe counts only if its last answer came before the fence's deadline
  (the lease's, or the last rule E window's): rule E extends a fence and
  never reopens one.
* A node whose keepalive succeeds when its last success had grown older than
  the fresh window (so it may have answered "no" to someone), or that just registered,
  takes no bucket whose previous owner vanished for ``W_E + M``
  (the acquire grace): a peer that counted on its "no" has surely stopped by then.
* A node holds two leases refreshed together: one for ``members/``, one for
  ``applied/``. When both vanish, they expired (the node stopped refreshing:
  its fence closed before) or an operator revoked both (see the README: that
  is the one action that, like a lease expiry, hands buckets over at once).
  When an operator revokes one, the other record keeps the node live, so
  peers wait for it to publish that it released its buckets (rule R): no
  timing is involved.
* A node with a ``applied/`` record but no member record (its member key was
  deleted by hand) counts as live for ``T + K + M`` (the orphan grace): a
  running node re-creates its member key within a cycle, and one that cannot
  reach etcd has closed its fence by then.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from nlbfarm.coordinator.cluster import Applied, ClusterSnapshot, TableRecord
from nlbfarm.coordinator.handover import AcceptPlan, TableUpdate, plan_accept, plan_table
from nlbfarm.coordinator.table import bucket_ranges

# Between the fence deadline and the earliest lease expiry: scheduling jitter
# between reading the clock and the kernel taking the element.
FENCE_MARGIN_S = 0.2
# How many recent tables a node remembers (to know a bucket's previous owner).
SEEN_TABLES = 3
MAX_SEEN_TABLES = 64


@dataclass(frozen=True)
class Timing:
    lease_ttl: float
    fence_timeout: float
    keepalive_interval: float
    etcd_timeout: float
    margin: float = FENCE_MARGIN_S

    @classmethod
    def from_config(cls, cfg) -> "Timing":
        return cls(cfg.timing.lease_ttl, cfg.timing.fence_timeout, cfg.timing.keepalive_interval,
                   cfg.etcd.timeout)

    @property
    def probe_timeout(self) -> float:
        return min(0.5, self.keepalive_interval)

    @property
    def fence_refresh(self) -> float:
        """How often the keeper re-writes the fence element: three times per element life, so
        that a thread late by two thirds of fence_timeout still finds the fence open."""
        return min(0.25, self.keepalive_interval / 2, self.fence_timeout / 3)

    @property
    def late_after(self) -> float:
        """A keepalive this old is late: take nothing new, ask the peers."""
        return 2 * self.keepalive_interval

    @property
    def fresh_window(self) -> float:
        """Peers are told "I reach etcd" while the last success is younger than this: the
        same age at which this node's own keepalive counts as late. A longer window
        (it was 2K + etcd.timeout) let the peers' "no" come after the asker's
        deadline when the nodes' keepalive ticks were out of step, and the farm went
        dark in an etcd outage for everyone with the default timings. A "no" from a
        node whose etcd merely answers slowly is safe: its next success starts the
        acquire grace (``after_keepalive_ok``)."""
        return self.late_after

    @property
    def rule_e_window(self) -> float:
        return (self.fence_timeout + self.keepalive_interval + 2 * self.probe_timeout
                + self.fence_refresh + self.margin)

    @property
    def acquire_grace(self) -> float:
        return self.rule_e_window + self.margin

    @property
    def orphan_grace(self) -> float:
        return self.lease_ttl + self.keepalive_interval + self.margin

    @property
    def table_memory(self) -> float:
        """How long a table is remembered: through any grace that needs its owners."""
        return self.acquire_grace + self.lease_ttl

    @property
    def own_record_grace(self) -> float:
        """How long a node serves without its own member record: its fence must be
        closed before peers stop counting it (the orphan grace)."""
        return self.orphan_grace - self.fence_timeout - 2 * self.margin - self.fence_refresh

    def problems(self) -> list[str]:
        """Every timing inequality the safety argument needs that these values break."""
        out = []
        k, p, r, ft, m, t = (self.keepalive_interval, self.probe_timeout, self.fence_refresh,
                             self.fence_timeout, self.margin, self.lease_ttl)
        if 2 * k + p + r + ft + m > t:
            out.append(
                f"2 x keepalive_interval + probe ({p:g} s) + fence refresh ({r:g} s) + fence_timeout + "
                f"{m:g} s margin must be at most lease_ttl: {2 * k + p + r + ft + m:g} > {t:g}; with these "
                "values rule E cannot take over before the fence closes in an etcd outage")
        if 4 * k + p + r + m > t:
            out.append(
                f"4 x keepalive_interval + probe ({p:g} s) + fence refresh ({r:g} s) + {m:g} s margin must be "
                f"at most lease_ttl: {4 * k + p + r + m:g} > {t:g}; with these values the peers' \"etcd is down "
                "for me too\" can come after a node's fence deadline, and the farm goes dark in an etcd outage")
        return out


# ---- what the lease keeper knows ---------------------------------------------

@dataclass(frozen=True)
class LeaseView:
    """The lease keeper's state, read by everyone else. Times are monotonic seconds."""

    registered: bool = False
    lease_id: int = 0                    # the member record's lease
    # The applied/ record's own lease, refreshed with the first. Two leases make
    # an operator's revoke of one (the one ``etcdctl get members/<id>`` shows)
    # leave the other record behind: the node stays live to its peers, who wait
    # for it to publish that it released its buckets, exactly as in a handover.
    applied_lease: int = 0
    lost: bool = False                   # etcd said a lease is gone (expired or revoked)
    last_ok_sent: float | None = None    # send time of the last successful keepalive
    consensus_at: float | None = None    # start of the last probe in which every peer said "etcd down"
    acquire_after: float = 0.0           # no vanished owner's bucket before this (acquire grace)
    loop_stuck: bool = False             # the keeper stopped refreshing: the loop hangs
    stale_since: float | None = None     # send time of the first failed keepalive of an outage


# The keeper's state transitions, pure so that the simulation runs the same ones.

def after_adopt(lease_id: int, applied_lease: int, sent: float, now: float, timing: "Timing") -> LeaseView:
    """A lease was granted (request sent at ``sent``) and the member key written with it.

    A fresh registration takes no vanished owner's bucket for the acquire
    grace: while this agent was away, a peer cut off from etcd may have been
    serving under rule E, counting on an old "no" (or on no answer).
    """
    return LeaseView(registered=True, lease_id=lease_id, applied_lease=applied_lease, last_ok_sent=sent,
                     acquire_after=now + timing.acquire_grace)


def after_keepalive_ok(view: LeaseView, sent: float, now: float, timing: "Timing") -> LeaseView:
    """A keepalive sent at ``sent`` succeeded; ``now`` is when this view replaces the old.

    If the last success became older than the fresh window before ``now``,
    this node may have told a peer "no" (``answers_reachable`` goes by that
    age alone), and the peer may be serving under rule E, counting on it:
    take no vanished owner's bucket until that peer has surely stopped.
    No keepalive need have failed for this: with etcd slow, each keepalive
    succeeds, only late (seed 4940 of the simulation).
    """
    acquire_after = view.acquire_after
    if view.last_ok_sent is not None and now - view.last_ok_sent >= timing.fresh_window:
        acquire_after = max(acquire_after, now + timing.acquire_grace)
    return replace(view, last_ok_sent=max(sent, view.last_ok_sent or sent), stale_since=None,
                   acquire_after=acquire_after)


def after_keepalive_failed(view: LeaseView, sent: float) -> LeaseView:
    return view if view.stale_since is not None else replace(view, stale_since=sent)


def after_probe(view: LeaseView, started: float, last_ok_at_start: float | None,
                down_for_all: bool, timing: "Timing", now: float) -> LeaseView:
    """A rule E probe that began at ``started`` ended at ``now``. Only a unanimous
    "down" counts, only if no keepalive succeeded meanwhile (then it is moot),
    and only if the lease (or an earlier rule E window) still held the fence
    open when the last answer came: rule E extends a fence, it never reopens
    one. A node whose deadline passed may have lost its lease, and its buckets
    may be served by a peer that then, in a later etcd outage for everyone,
    answers "no" as well (seed 2173 of the simulation). The answers count by
    ``now``, not by ``started``: a prober stalled between the two (a stopped
    process, a queue of asks) hears answers given after its deadline.
    """
    if not down_for_all or view.last_ok_sent != last_ok_at_start:
        return view
    if now >= held_until(view, timing):
        return view
    return replace(view, consensus_at=started)


def held_until(view: LeaseView, timing: "Timing") -> float:
    """How long the lease, or rule E, lets this node serve (before link and record checks)."""
    until = view.last_ok_sent + timing.lease_ttl - timing.margin
    if view.consensus_at is not None and view.consensus_at > view.last_ok_sent:
        until = max(until, view.consensus_at + timing.rule_e_window)
    return until


class FenceReason(enum.Enum):
    OPEN = "open"
    RULE_E = "etcd down for every peer"
    NOT_REGISTERED = "not registered"
    LEASE_LOST = "lease lost"
    LINK_DOWN = "link down"
    EXPIRED = "no keepalive in time"
    LOOP_STUCK = "reconcile loop stuck"


def fence_deadline(view: LeaseView, timing: Timing, link_up: bool,
                   member_present: bool = True) -> tuple[float | None, FenceReason]:
    """Until when the kernel may accept VIP traffic, from what the keeper knows.

    Never later than ``last_ok_sent + T - M`` outside rule E, and never later
    than ``consensus_at + W_E`` under it.
    """
    if not view.registered or view.last_ok_sent is None:
        return None, FenceReason.NOT_REGISTERED
    if view.lost or not member_present:
        return None, FenceReason.LEASE_LOST
    if not link_up:
        return None, FenceReason.LINK_DOWN
    if view.loop_stuck:
        return None, FenceReason.LOOP_STUCK
    until = held_until(view, timing)
    why = FenceReason.RULE_E if until > view.last_ok_sent + timing.lease_ttl - timing.margin else FenceReason.OPEN
    return until, why


def own_record_present(me: str, snap: ClusterSnapshot, missing_since: float | None, now: float,
                       timing: Timing) -> bool:
    """May this node keep its fence open, as far as its own records go?

    Without any lease-bound record, no (its leases are gone). With only
    applied/ (the member key was deleted, or is unreadable), for the own-record
    grace from when it first saw the member record gone: peers stop counting
    it after the orphan grace, so its fence must have closed by then even if
    its loop is too slow to write the record again.
    """
    if me in snap.members:
        return True
    if me not in snap.live():
        return False
    return missing_since is None or now - missing_since < timing.own_record_grace


def answers_reachable(view: LeaseView, timing: Timing, now: float) -> bool | None:
    """What this node tells a peer that asks whether it reaches etcd. None: it does not vote."""
    if not view.registered or view.lost or view.last_ok_sent is None:
        return None
    return now - view.last_ok_sent < timing.fresh_window


def keepalive_fresh(view: LeaseView, timing: Timing, now: float) -> bool:
    return (view.registered and not view.lost and view.last_ok_sent is not None
            and now - view.last_ok_sent < timing.late_after)


# ---- the loop's state and observations -----------------------------------------

@dataclass(frozen=True)
class LocalState:
    """What this node has done, as opposed to what the cluster wants. Owned by the loop."""

    accepting: frozenset = frozenset()
    # Released TCP buckets still serving established connections: bucket -> (deadline, released at).
    draining: Mapping[int, tuple[float, float]] = field(default_factory=lambda: MappingProxyType({}))
    published: Applied | None = None        # last record written to applied/<me>
    published_revision: int = 0             # the etcd revision of that write
    node_state: str = "starting"
    state_reason: str = "agent starting"
    seen_tables: Mapping[int, tuple] = field(default_factory=lambda: MappingProxyType({}))
    table_seen_at: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    orphan_since: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    # The last etcd rewind (restore) seen, and the acquire grace it started: a
    # node that vanished in the restore may still serve until its keepalive
    # or its watch tells it.
    rewind_seen: int = 0
    rewind_grace_until: float = 0.0

    @property
    def published_generation(self) -> int:
        return self.published.generation if self.published else -1


@dataclass(frozen=True)
class Observations:
    now: float
    lease: LeaseView
    link_up: bool
    desired_state: str                    # what the farm module says this node should announce
    desired_reason: str
    conn_counts: Mapping[int, int] = field(default_factory=dict)
    conn_scan_at: float = 0.0             # when conn_counts were read (0: never)
    leave_started: float | None = None
    drain_timeout: float = 300.0
    stop_drain_timeout: float = 30.0
    interface: str = "eth0"               # node.interface, for the sentence
    own_missing_since: float | None = None  # when the fence thread first saw our member record gone


class Reason(enum.Enum):
    """Why the cycle did what it did. The sentence, log field and metric label come from it."""

    LEASE_LOST = "lease_lost"
    LEASE_LOST_LEAVING = "lease_lost_leaving"
    MEMBER_MISSING = "member_missing"
    STATE_CHANGE = "state_change"
    TABLE_WRITE = "table_write"
    LINK_DOWN = "link_down"
    FENCE_CLOSED = "fence_closed"
    STATIC = "etcd_down_for_all"
    KEEPALIVE_LATE = "keepalive_late"
    NO_TABLE = "no_table"
    APPLIED = "applied"
    WAITING_FOR_PEERS = "waiting_for_peers"
    ACQUIRE_GRACE = "acquire_grace"


@dataclass(frozen=True)
class KernelPlan:
    accepting: frozenset
    draining: tuple[tuple[int, int], ...]
    guarded: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Plan:
    reason: Reason
    facts: Mapping[str, object] = field(default_factory=dict)
    # etcd writes, at most one kind per cycle
    member_write: tuple[str, str] | None = None   # (state, reason) to announce
    recreate_member: bool = False
    table_write: TableUpdate | None = None
    publish: Applied | None = None                # after the kernel took ``kernel``
    # the kernel
    kernel: KernelPlan | None = None
    fence_until: float | None = None
    ready: bool | None = None
    # the loop's next state, assuming every action above succeeds
    next: LocalState | None = None

    def sentence(self) -> str:
        return render(self)


# ---- the decision --------------------------------------------------------------

def drain_deadline(snap: ClusterSnapshot, me: str, obs: Observations) -> float:
    """When buckets released now stop serving their old connections."""
    if obs.leave_started is not None:
        return obs.leave_started + obs.stop_drain_timeout
    req = snap.drains.get(me)
    if req is not None and req.timeout is not None:
        return obs.now + req.timeout
    return obs.now + obs.drain_timeout


def update_draining(snap: ClusterSnapshot, me: str, local: LocalState, obs: Observations,
                    released: frozenset, accepting: frozenset) -> tuple[dict, list[int]]:
    """Released buckets, until their last connection closed or their deadline passed.

    Returns the new draining map and the buckets whose deadline cut live connections.
    """
    now = obs.now
    deadline = drain_deadline(snap, me, obs)
    draining = {b: v for b, v in local.draining.items() if b not in accepting}
    for b in released:
        draining.setdefault(b, (deadline, now))
    if obs.leave_started is not None:  # a stop caps every drain
        draining = {b: (min(d, deadline), since) for b, (d, since) in draining.items()}
    counts, scanned = obs.conn_counts, obs.conn_scan_at
    done = [b for b, (d, since) in draining.items()
            if now >= d or (scanned > since and counts.get(b, 0) == 0)]
    cut = [b for b in done if counts.get(b, 0) and now >= draining[b][0]]
    for b in done:
        del draining[b]
    return draining, cut


def track_liveness(snap: ClusterSnapshot, local: LocalState, timing: Timing,
                   now: float) -> tuple[frozenset, dict]:
    """Which nodes count as live for rule R.

    Orphans (live only through applied/ or an unreadable record) stop counting
    after the orphan grace: a running node re-creates its member record within
    a cycle, and one that cannot has closed its fence by then.
    """
    orphan_since = {n: local.orphan_since.get(n, now) for n in snap.orphans()}
    expired = frozenset(n for n, t in orphan_since.items() if now - t >= timing.orphan_grace)
    return snap.live() - expired, orphan_since


def hold_in_acquire_grace(me: str, plan: AcceptPlan, local: LocalState, live: frozenset, lease: LeaseView,
                  now: float) -> tuple[AcceptPlan, bool]:
    """Right after registering or an etcd outage (the acquire grace): no new bucket of a
    node that is gone, or of unknown history. It may still serve under rule E."""
    new = plan.accepting - local.accepting
    if not new or now >= max(lease.acquire_after, local.rewind_grace_until):
        return plan, False
    tables = list(local.seen_tables.values())

    def held(b: int) -> bool:
        if not tables:
            return True
        return any(t[b] is not None and t[b] != me and t[b] not in live for t in tables)

    hold = frozenset(b for b in new if held(b))
    if not hold:
        return plan, False
    return AcceptPlan(plan.generation, plan.target, plan.accepting - hold, plan.waiting_for), True


def remember_table(local: LocalState, table: TableRecord | None, now: float, keep_for: float) -> LocalState:
    """Add ``table`` to the tables this node remembers (to know who may still serve a bucket).

    Kept: the last SEEN_TABLES, and every table that was current within ``keep_for``
    (tables can change faster than a grace lasts: one per node that
    vanished), at most MAX_SEEN_TABLES, since tables come from outside.
    """
    if table is None:
        return local
    if local.seen_tables.get(table.generation) == table.owners:
        # Still the current table: its owners are as fresh as now.
        return replace(local, table_seen_at=MappingProxyType({**local.table_seen_at, table.generation: now}))
    tables = dict(local.seen_tables)
    seen_at = dict(local.table_seen_at)
    tables[table.generation], seen_at[table.generation] = table.owners, now
    order = sorted(tables)
    keep = set(order[-SEEN_TABLES:]) | {g for g in order if now - seen_at.get(g, now) < keep_for}
    keep = set(sorted(keep)[-MAX_SEEN_TABLES:])
    return replace(local, seen_tables=MappingProxyType({g: tables[g] for g in sorted(keep)}),
                   table_seen_at=MappingProxyType({g: seen_at.get(g, now) for g in sorted(keep)}))


def decide(me: str, timing: Timing, snap: ClusterSnapshot, local: LocalState, obs: Observations) -> Plan:
    """One reconcile step, decided. Every etcd write and kernel change of farmd comes from here."""
    now, lease = obs.now, obs.lease
    if lease.lost:
        # Peers may already own our buckets: release everything before re-registering.
        kernel = KernelPlan(frozenset(), (), ())
        nxt = replace(local, accepting=frozenset(), draining=MappingProxyType({}), published=None)
        reason = Reason.LEASE_LOST_LEAVING if obs.leave_started is not None else Reason.LEASE_LOST
        return Plan(reason, kernel=kernel, fence_until=None, next=nxt, ready=False)

    local = remember_table(local, snap.table, now, timing.table_memory)
    live, orphan_since = track_liveness(snap, local, timing, now)
    local = replace(local, orphan_since=MappingProxyType(orphan_since))
    if snap.trust_after > local.rewind_seen:
        local = replace(local, rewind_seen=snap.trust_after, rewind_grace_until=now + timing.acquire_grace)
    fresh = keepalive_fresh(lease, timing, now)
    mine = snap.members.get(me)
    # Our own records gone (an operator revoked the lease): closed at once, not at the next keepalive.
    fence_until, fence_why = fence_deadline(
        lease, timing, obs.link_up, own_record_present(me, snap, obs.own_missing_since, now, timing))
    desired, why = obs.desired_state, obs.desired_reason

    # 1. The member record: re-create it if someone deleted it, else announce state changes.
    if fresh:
        if mine is None:  # deleted, or unreadable: peers stop counting us after the orphan grace
            return Plan(Reason.MEMBER_MISSING, {"state": desired}, recreate_member=True,
                        member_write=(desired, why), next=replace(local, node_state=desired, state_reason=why))
        if mine is not None and (mine.state, mine.reason) != (desired, why):
            return Plan(Reason.STATE_CHANGE, {"state": desired, "why": why, "old": local.node_state},
                        member_write=(desired, why),
                        next=replace(local, node_state=desired, state_reason=why))
    local = replace(local, node_state=desired, state_reason=why)

    # 2. The table, by CAS: every node computes the same update from the same snapshot.
    if fresh:
        update = plan_table(snap)
        if update is not None:
            return Plan(Reason.TABLE_WRITE, {"update": update}, table_write=update, next=local)

    # 3. What the kernel may accept.
    rule_snap = snap if live == snap.live() else _restricted(snap, live)
    plan = plan_accept(me, rule_snap, local.accepting)
    fence_open = fence_until is not None and fence_until > now
    if fence_until is not None and not fence_open:
        fence_why = FenceReason.EXPIRED
    holding = False
    if not fence_open or not fresh:
        # Take nothing new without a fresh lease (rule E serves only what it had).
        plan = AcceptPlan(plan.generation, plan.target, plan.accepting & local.accepting, plan.waiting_for)
    else:
        plan, holding = hold_in_acquire_grace(me, plan, local, live, lease, now)
    if not fence_open:
        plan = AcceptPlan(plan.generation, plan.target, frozenset(), plan.waiting_for)
    released = local.accepting - plan.accepting
    draining, cut = update_draining(snap, me, local, obs, released, plan.accepting)
    if not fence_open:
        draining = {}
    # Guards only for live peers' drains: an expired orphan's record guards nothing.
    guarded = plan.accepting & rule_snap.draining_elsewhere(me)
    kernel = KernelPlan(plan.accepting, tuple(bucket_ranges(draining)), tuple(bucket_ranges(guarded)))
    nxt = replace(local, accepting=plan.accepting, draining=MappingProxyType(draining))
    facts = {"generation": plan.generation, "accepting": len(plan.accepting), "target": len(plan.target),
             "waiting": plan.waiting_for, "draining": len(draining), "cut": len(cut),
             "age": (now - lease.last_ok_sent) if lease.last_ok_sent is not None else -1.0,
             "buckets": snap.settings.buckets if snap.settings else 0,
             "fence": fence_why, "interface": obs.interface}
    # Publish what the kernel now does (invariant I of the handover argument),
    # whenever etcd can take it: also while the link is down or the fence is
    # closed, or peers would wait for this node's release forever.
    g = plan.generation
    conns = sum(obs.conn_counts.get(b, 0) for b in draining)
    facts["conns"] = conns
    publish = None
    if fresh and g:
        report = Applied(g, len(plan.accepting), tuple(bucket_ranges(draining)), conns,
                         snap.table.digest if snap.table else "", snap.trust_after)
        theirs = snap.applied.get(me)
        # Rewritten when etcd holds something else (someone overwrote or restored
        # it), and when a peer (or this node) saw etcd's history go back at or
        # after our last write: that peer no longer trusts it.
        stale_in_etcd = snap.revision > local.published_revision and theirs != report
        requested = snap.republish_requested()
        distrusted = requested > 0 and local.published_revision <= requested
        if local.published != report or stale_in_etcd or distrusted:
            publish = report
    if not obs.link_up:
        return Plan(Reason.LINK_DOWN, facts, kernel=kernel, fence_until=None, publish=publish, next=nxt,
                    ready=False)
    if not fence_open:
        return Plan(Reason.FENCE_CLOSED, facts, kernel=kernel, fence_until=None, publish=publish, next=nxt,
                    ready=False)
    if not fresh:
        # No etcd writes without a fresh keepalive: they would only block the
        # loop in retries while the keeper sorts things out.
        reason = Reason.STATIC if fence_why is FenceReason.RULE_E else Reason.KEEPALIVE_LATE
        return Plan(reason, facts, kernel=kernel, fence_until=fence_until, next=nxt)
    ready = desired == "active" and plan.complete and g > 0
    if g == 0:
        reason = Reason.NO_TABLE
    elif plan.complete:
        reason = Reason.APPLIED
    elif plan.waiting_for:
        reason = Reason.WAITING_FOR_PEERS
    else:
        reason = Reason.ACQUIRE_GRACE if holding else Reason.WAITING_FOR_PEERS
    return Plan(reason, facts, kernel=kernel, fence_until=fence_until, publish=publish, ready=ready,
                next=nxt)


def _restricted(snap: ClusterSnapshot, live: frozenset) -> ClusterSnapshot:
    """``snap`` without the records of nodes that no longer count as live (expired orphans)."""
    return replace(snap, applied=MappingProxyType({n: a for n, a in snap.applied.items() if n in live}),
                   unreadable=frozenset(n for n in snap.unreadable if n in live))


# ---- the sentence ------------------------------------------------------------------

_STATE_EFFECT = {
    "leaving": "peers will take over this node's buckets",
    "draining": "no new connections; established ones are kept until they close",
    "failed": "withdrawing: peers take over this node's buckets",
    "stopped": "withdrawing: peers take over this node's buckets",
    "starting": "taking no buckets until every check passes",
    "active": "taking buckets",
}


def render(plan: Plan) -> str:
    """The cycle's sentence, from the reason and its facts (never parsed back)."""
    f, r = plan.facts, plan.reason
    if r is Reason.LEASE_LOST:
        return "lease lost: released every bucket and registered again"
    if r is Reason.LEASE_LOST_LEAVING:
        return "lease lost while leaving: nothing left to hand over"
    if r is Reason.MEMBER_MISSING:
        return f"member key missing from etcd: registered it again as {f['state']}"
    if r is Reason.STATE_CHANGE:
        return f"state {f['state']} ({f['why']}): {_STATE_EFFECT[f['state']]}"
    if r is Reason.TABLE_WRITE:
        u = f["update"]
        return f"wrote table generation {u.generation}: moved {u.moved} buckets ({u.reason})"
    if r is Reason.LINK_DOWN:
        return f"link {f['interface']} is down: fence closed, withdrawing from the farm"
    if r is Reason.FENCE_CLOSED:
        return (f"fence closed ({f['fence'].value}): no successful keepalive for {f['age']:.1f} s; "
                "dropping all VIP traffic")
    if r is Reason.STATIC:
        return (f"etcd unreachable for every peer: serving generation {f['generation']} "
                f"unchanged ({f['accepting']} buckets)")
    if r is Reason.KEEPALIVE_LATE:
        return (f"etcd keepalive late ({f['age']:.1f} s): holding generation {f['generation']} "
                f"with {f['accepting']} buckets, taking none")
    if r is Reason.NO_TABLE:
        return "waiting for the first table"
    draining = (f"; draining {f['draining']} buckets with {f['conns']} connections" if f["draining"] else "")
    if r is Reason.APPLIED:
        return f"generation {f['generation']} applied: accepting {f['accepting']} of {f['buckets']} buckets{draining}"
    waiting = (f"waiting for {','.join(f['waiting'])} to apply generation {f['generation']}" if f["waiting"]
               else "in the acquire grace: holding buckets that a node gone or of unknown history may still serve")
    return (f"generation {f['generation']}: accepting {f['accepting']} of {f['target']} owned buckets, "
            f"{waiting}{draining}")
