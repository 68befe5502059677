"""Handover: when a node may start accepting a bucket, and when the table must change.

Both decisions are pure functions of a ``ClusterSnapshot`` (and, for the
accept plan, of what this node's kernel accepts right now), so every node
reaches the same answer from the same view and tests can pin them exactly.

Why no bucket ever accepts new connections on two nodes at once
----------------------------------------------------------------
Notation: T_g is the table of generation g; A_X is the set of buckets node X's
kernel accepts; a_X is the generation X has published in ``applied/<X>``.

Invariant I: whenever X has published a_X = g, A_X is a subset of T_g's
buckets for X, and X adds a bucket b to A_X only through rule R below.

1. Releasing comes first. When X sees a new table g it applies
   A_X := A_X ∩ T_g⁻¹(X) in one nftables transaction, and only after the kernel
   confirmed it, publishes a_X = g. Buckets it keeps are carried over; buckets
   it lost are gone from the kernel before anyone can read a_X = g (I holds).
2. Rule R: X adds a bucket b it did not accept before only if T_g[b] = X for its
   current table g and every other live node Y (a lease-bound member or
   applied key exists, readable or not, that is, Y holds a live lease) has
   published a_Y = g exactly: the same generation *and* the digest of T_g's
   contents, since only CAS makes generations unique and an etcd restore or a
   hand-written table can reuse one.
   Then Y does not accept b: by I, A_Y ⊆ T_g⁻¹(Y), and T_g[b] = X ≠ Y.
   Y cannot start accepting b later without going through R itself at some
   generation g' > g with T_g'[b] = Y, which needs a_X = g'. X only publishes
   g' after releasing b (step 1). So at no instant do both accept b.
   A peer that published a generation *newer* than g also blocks R: X's view is
   stale and X waits for the newer table instead of trusting the old one.
3. A node with no live lease accepts nothing: its kernel fence (a set element
   with a timeout) is only ever written for the whole seconds that fit before
   ``last_successful_keepalive_sent + lease_ttl - margin`` (counted when the
   transaction is sent, and deleted if it returns too late; see
   ``node/decide.py`` and ``DataPlane.apply``). etcd counts the lease from
   when it *received* that keepalive, so the fence closes strictly before
   etcd can expire the lease, and ignoring nodes without a lease in R is
   safe. A node has two leases, one for ``members/`` and one for
   ``applied/``, refreshed together: when an operator revokes one, the other
   record keeps the node live, and R waits for it to publish its release.

Because every node writes the same ``rebalance()`` result by compare-and-swap,
at most one table exists per generation, and T_g is well defined.

Connections survive a handover (they are not new connections)
--------------------------------------------------------------
"Accepting" above means accepting *new* connections. When X releases a TCP
bucket it moves it to its draining list: the kernel still passes packets of
X's established connections (conntrack knows them) and drops new SYNs in it.
X publishes the draining list in the same ``applied/<X>`` write as a_X = g, so
by the time the new owner Y may take the bucket (rule R needs a_X = g), Y
also sees that X drains it and *guards* it: unknown mid-stream packets there
are dropped silently (they are X's), while SYNs start Y's own connections.
When X's last connection in the bucket closes (conntrack shows none alive),
or its drain timeout passes, X drops the bucket from the list; Y stops
guarding it, and a stray packet then reaches Y's TCP stack, which resets it.
A node without a live lease publishes nothing, so the buckets of a dead node
are never guarded: its clients get a reset on their next packet.

Rule E: etcd down for everyone versus "I am cut off"
-----------------------------------------------------
Step 3 makes a node stop serving when its keepalives fail, which would turn
an etcd outage into a farm outage. Instead, a node whose keepalives fail asks
every other member it knows, over the peer API, whether *they* reach etcd:

* if every peer answers "no" (at least one peer, none unanswered), the node
  keeps extending its fence for one more short window and serves exactly the
  buckets it has (it takes none), until etcd answers again. Only a probe
  whose last answer came before the fence's deadline (the lease's, or the
  last window's) counts: rule E extends a fence and never reopens one, since a node whose
  deadline passed may have lost its lease and its buckets to a peer;
* if any peer reaches etcd, or does not answer, the node is cut off and step 3
  applies: its fence closes before its lease can expire.

Only an answer from the peer that was asked counts: it carries the node id
and the agent instance of that peer's member record, and whether the agent
is registered (an agent that is not does not vote). An address that leads
back to the asker (a wildcard ``peer_listen``) therefore never confirms.

Timing (every window is derived in ``node/decide.py``): a peer answers "yes"
while one of its keepalives succeeded within ``2 * keepalive_interval`` (the
age at which its own keepalive is late); a node asks every keepalive tick while its own keepalive is
late, and a unanimous "no" extends its fence deadline to the probe's start +
``fence_timeout + keepalive_interval + 2 * probe + fence refresh + margin``. When etcd comes back after being stopped, a new
leader extends every lease, so no lease expires before the nodes' keepalives
resume and no bucket moves. If etcd stayed up but unreachable for longer than
the TTL, leases may have expired: a node whose keepalive succeeds when its
last success is older than the fresh window (so it may have said "no"),
whether keepalives failed meanwhile or were only slow, therefore takes no
bucket whose previous owner vanished, in any table it remembers, until the
rule E window plus a margin has passed: by then a still-cut-off node heard
"a peer reaches etcd" and its fence ran out. This acquire grace also follows
every registration, since a restarted agent may have been asked and not
answered, and a brand-new one knows no earlier table. Not covered: a group of nodes cut off from etcd together,
while a node they have never seen joins through etcd and takes their expired
buckets; they only ask the peers they know, so they keep serving for as long
as they stay cut off. Join nodes only while the farm is healthy.
"""
from __future__ import annotations

from dataclasses import dataclass

from nlbfarm.coordinator.cluster import MAX_GENERATION, ClusterSnapshot
from nlbfarm.coordinator.table import counts, moved, rebalance


@dataclass(frozen=True)
class TableUpdate:
    generation: int
    owners: list
    moved: int
    expected_revision: int
    reason: str


def plan_table(snap: ClusterSnapshot) -> TableUpdate | None:
    """The table the cluster should have, or None if the current one is right.

    Needs the cluster settings (B). Every node computes the same update from
    the same snapshot; the CAS on ``expected_revision`` lets exactly one win.
    Computed once per snapshot (a rebalance is the costliest step of a cycle).
    """
    if "plan_table" not in snap.memo:
        snap.memo["plan_table"] = _plan_table(snap)
    return snap.memo["plan_table"]


def _plan_table(snap: ClusterSnapshot) -> TableUpdate | None:
    if snap.settings is None:
        return None
    b = snap.settings.buckets
    previous = list(snap.table.owners) if snap.table else None
    candidates = snap.candidates()
    if previous is None and not candidates:
        return None
    new = rebalance(previous, candidates, b)
    if previous is not None and new == previous:
        return None
    old_counts = counts(previous) if previous else {}
    joined = sorted(set(candidates) - set(old_counts))
    left = sorted(set(old_counts) - set(candidates))
    parts = [] if previous else ["first table"]
    if joined and previous:
        parts.append("joined=" + ",".join(joined))
    if left:
        parts.append("left=" + ",".join(left))
    if not parts:
        parts.append("weights or shares changed")
    # Normally the next generation. Without a readable table (deleted or
    # overwritten by hand), continue above what nodes report, so the new table
    # is not mistaken for one they hold; (generation, digest) tells them apart
    # anyway, and the cap keeps a hostile record from pushing it out of range.
    last_gen = (snap.table.generation if snap.table
                else max([0] + [a.generation for a in snap.applied.values()]))
    return TableUpdate(generation=min(last_gen + 1, MAX_GENERATION), owners=new,
                       moved=moved(previous, new) if previous else sum(1 for o in new if o),
                       expected_revision=snap.table_revision, reason=" ".join(parts))


@dataclass(frozen=True)
class AcceptPlan:
    generation: int                   # table generation the plan is for (0: no table yet)
    target: frozenset[int]            # what the table gives this node
    accepting: frozenset[int]         # what the kernel may accept now
    waiting_for: tuple[str, ...] = ()  # peers whose apply gates the new buckets

    @property
    def complete(self) -> bool:
        return self.accepting == self.target

    @property
    def pending(self) -> int:
        return len(self.target - self.accepting)


def plan_accept(me: str, snap: ClusterSnapshot, accepting: frozenset[int]) -> AcceptPlan:
    """Which buckets this node may accept now (steps 1 and 2 of the argument above).

    "Published g" means published exactly this table: generation and digest
    (``Applied.applies``), so a peer that applied another table of the same
    generation (an etcd restore, a hand-written table) does not count; and,
    after this node saw etcd's history go back (a restore), written after
    that point: a restored record describes a kernel that may have changed.
    """
    if snap.table is None:
        return AcceptPlan(0, frozenset(), frozenset())
    g = snap.table.generation
    target = snap.table.owned_by(me)
    keep = accepting & target
    if keep == target:
        return AcceptPlan(g, target, keep)
    waiting = tuple(sorted(
        peer for peer in snap.live() - {me}
        if (a := snap.applied.get(peer)) is None or not a.applies(snap.table, snap.trust_after)))
    return AcceptPlan(g, target, target if not waiting else keep, waiting)
