"""Nemeses for the simulation: what can go wrong, drawn from a seed, replayable as JSON.

A schedule is a list of faults ``{"kind", "at", "for", ...}`` (seconds of
simulated time). ``random_schedule(seed)`` draws one; ``run(seed, schedule)``
plays it and reports.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from nlbfarm.coordinator.cluster import Applied, Member, TableRecord
from nlbfarm.node.decide import Timing
from nlbfarm.sim.core import PREFIX, Sim, Violation

# Fault classes, as the README's safety table names them.
KINDS = {
    "etcd_cut": "node cut off from etcd (both ways or one way)",
    "peer_cut": "node-to-node partition (both ways or one way)",
    "lan_down": "a node's LAN link down (etcd reachable another way)",
    "etcd_outage": "etcd down for everyone",
    "etcd_slow": "etcd slow (latency up to 1.5 s)",
    "slow_nft": "slow nft transactions (up to 3 s)",
    "pause": "agent paused longer than the lease TTL (SIGSTOP)",
    "kill": "agent killed, restarted with the same id",
    "handoff": "planned restart (SIGUSR2): the successor adopts after a delay",
    "crash": "whole node dies, comes back",
    "revoke": "a lease revoked by an operator",
    "delete_member": "member key deleted by an operator",
    "restore": "etcd restored to an older revision",
    "poison": "hostile records under the prefix",
    "wildcard": "peer addresses that lead back to the asker",
    "skew": "clock-rate skew (up to 0.5%)",
    "reject_peer": "a firewall rejects a live node's peer port (resets, as a dead agent's would)",
    "phase": "agents' keepalive and probe ticks out of step (started apart)",
}

SETTLE = 8.0       # faults start once the farm has converged
HEAL_WINDOW = 25.0  # after the last fault heals, the farm must serve every bucket within this
UNSERVED_BOUND = 20.0
AFTER_CONVERGED = 8.0  # the invariant is still checked this long after every bucket is served again


# The timings a seed may run with: the defaults (fence 0.4 s), 1 s fences with the lab's keepalive (0.25 s),
# and sub-second fences (millisecond elements): the tightest the config accepts
# with 2 s leases (stock etcd's shortest) and keepalives of 0.1 s.
TIMINGS = (Timing(3, 0.4, 0.5, 1.0), Timing(3, 1, 0.25, 1.0), Timing(5, 2, 0.5, 1.0),
           Timing(3, 0.4, 0.2, 1.0), Timing(2, 0.3, 0.1, 0.5))


def variant(seed: int) -> tuple[int, Timing]:
    """How many nodes and which timing a seed runs with (part of what replays)."""
    return 3 + seed % 3, TIMINGS[(seed // 3) % len(TIMINGS)]


def _scenario(rng: random.Random, nodes: int) -> list[dict]:
    """Faults that only hurt together: the combinations each safety rule exists for."""
    n = f"n{rng.randint(1, nodes)}"
    t = round(rng.uniform(SETTLE, SETTLE + 6), 3)

    def f(kind, at, dur, **kw):
        return {"kind": kind, "at": round(at, 3), "for": round(dur, 3), "node": kw.pop("node", n), **kw}

    pick = rng.randrange(8)
    if pick == 0:    # misconfigured peer addresses, one node cut off: rule E must not hear itself
        return [f("wildcard", 0, 0), f("etcd_cut", t, rng.uniform(4, 8), dir="both")]
    if pick == 1:    # cut off while nft is slow: the fence deadline must hold at the commit
        return [f("etcd_cut", t, rng.uniform(3, 7), dir=rng.choice(["both", "to"])),
                f("slow_nft", t + rng.uniform(0, 2), rng.uniform(2, 5), delay=rng.uniform(0.5, 3.0))]
    if pick == 2:    # every node cut off from a live etcd, one heals first: the acquire grace
        dur = rng.uniform(4, 8)
        return [f("etcd_cut", t, dur if f"n{i}" != n else dur - rng.uniform(0.5, 3), dir="both", node=f"n{i}")
                for i in range(1, nodes + 1)]
    if pick == 3:    # member key deleted while the node applies slowly: the orphan grace
        return [f("slow_nft", t - 0.5, rng.uniform(2, 5), delay=rng.uniform(1.0, 3.0)),
                f("delete_member", t, 0.1)]
    if pick == 4:    # lease revoked while the node is slow or paused: the vanish hold
        return [f(rng.choice(["slow_nft", "pause"]), t - rng.uniform(0, 0.5), rng.uniform(1, 4),
                  delay=rng.uniform(0.5, 2.0)), f("revoke", t, 0.1)]
    if pick == 5:    # etcd restored across a table change: restored records describe old kernels
        return [f("restore", t, rng.uniform(6, 10)),
                f(rng.choice(["kill", "crash", "lan_down"]), t + 0.5, rng.uniform(4, 5))]
    if pick == 6:    # etcd down for everyone, one node stays cut off after: rule E, then step back
        dur = rng.uniform(3, 8)
        return [f("etcd_outage", t, dur), f("etcd_cut", t + rng.uniform(0, dur), rng.uniform(2, 6), dir="both")]
    other = rng.choice([f"n{i}" for i in range(1, nodes + 1) if f"n{i}" != n])
    return [f("etcd_cut", t, rng.uniform(3, 7), dir="both"),  # cut off from etcd and from a peer
            f("peer_cut", t + rng.uniform(-1, 2), rng.uniform(2, 6), dir=rng.choice(["both", "to", "from"]),
              other=other)]


# What random_schedule draws from. Planned restarts and rejected peer ports
# have their own draws (handoff_schedule, certificate_schedule): adding a kind
# here would change every seed's schedule.
RANDOM_KINDS = sorted(k for k in KINDS if k not in ("handoff", "reject_peer", "phase"))


def random_schedule(seed: int, nodes: int = 3, kinds: list[str] | None = None) -> list[dict]:
    rng = random.Random(seed * 7919 + 17)
    kinds = kinds or RANDOM_KINDS
    out = _scenario(rng, nodes) if kinds == RANDOM_KINDS and rng.random() < 0.5 else []
    for _ in range(rng.randint(0 if out else 1, 2)):
        kind = rng.choice(kinds)
        at = round(rng.uniform(SETTLE, SETTLE + 12), 3)
        f = {"kind": kind, "at": at, "for": round(rng.uniform(0.3, 8.0), 3),
             "node": f"n{rng.randint(1, nodes)}"}
        if kind in ("etcd_cut", "peer_cut"):
            f["dir"] = rng.choice(["both", "to", "from"])
        if kind == "peer_cut":
            f["other"] = rng.choice([f"n{i}" for i in range(1, nodes + 1) if f"n{i}" != f["node"]])
        if kind == "pause":
            f["for"] = round(rng.uniform(3.2, 7.0), 3)
        if kind == "handoff":
            f["for"] = round(rng.uniform(0.2, 5.0), 3)  # the successor's delay: within the window or not
        if kind in ("etcd_slow", "slow_nft"):
            f["delay"] = round(rng.uniform(0.2, 3.0 if kind == "slow_nft" else 1.5), 3)
        if kind == "poison":
            f["which"] = rng.sample(POISONS, rng.randint(1, len(POISONS)))
        if kind == "revoke" and rng.random() < 0.3:
            f["which"] = "applied"
        if kind == "lan_down" and rng.random() < 0.5:
            f["with_etcd"] = True  # the link that carries etcd goes down too
        out.append(f)
    return sorted(out, key=lambda f: f["at"])


def handoff_schedule(seed: int, nodes: int = 3) -> list[dict]:
    """One or two planned restarts (the successor within its window or too late), with up
    to two random faults around them: the restart must hold under each."""
    rng = random.Random(seed * 104729 + 3)
    out = []
    for _ in range(rng.randint(1, 2)):
        out.append({"kind": "handoff", "at": round(rng.uniform(SETTLE, SETTLE + 8), 3),
                    "for": round(rng.choice([rng.uniform(0.2, 2.0), rng.uniform(0.2, 5.0)]), 3),
                    "node": f"n{rng.randint(1, nodes)}"})
    for f in random_schedule(seed, nodes)[:rng.randint(0, 2)]:
        f = dict(f, at=round(out[0]["at"] + rng.uniform(-2.0, 3.0), 3))
        out.append(f)
    return sorted(out, key=lambda f: f["at"])


def certificate_schedule(seed: int, nodes: int = 3) -> list[dict]:
    """A firewall rejects a live node's peer port (resets, as a dead agent's kernel sends),
    sometimes while that node or another is killed, with up to two random faults around it:
    a certificate must come from a death, never from the reset alone."""
    rng = random.Random(seed * 15485863 + 11)
    n = f"n{rng.randint(1, nodes)}"
    at = round(rng.uniform(SETTLE, SETTLE + 6), 3)
    out = [{"kind": "reject_peer", "at": at, "for": round(rng.uniform(1.0, 8.0), 3), "node": n}]
    if rng.random() < 0.5:
        victim = rng.choice([n, f"n{rng.randint(1, nodes)}"])
        out.append({"kind": "kill", "at": round(at + rng.uniform(-1.0, 4.0), 3),
                    "for": round(rng.uniform(0.3, 5.0), 3), "node": victim})
    for f in random_schedule(seed, nodes)[:rng.randint(0, 2)]:
        out.append(dict(f, at=round(at + rng.uniform(-2.0, 3.0), 3)))
    return sorted(out, key=lambda f: f["at"])


def outage_schedule(seed: int, nodes: int = 3) -> list[dict]:
    """etcd down for everyone, with the agents' ticks out of step as after starts at
    different times: every bucket must stay served all through the outage (static
    stability), not only after it. No other fault, so nothing excuses a dark bucket."""
    rng = random.Random(seed * 32452843 + 7)
    out = [{"kind": "phase", "at": round(rng.uniform(1.0, 3.0), 3), "for": 0.0, "node": f"n{i}",
            "keepalive": round(rng.uniform(0.0, 1.0), 3), "prober": round(rng.uniform(0.0, 1.0), 3)}
           for i in range(1, nodes + 1)]
    out.append({"kind": "etcd_outage", "at": round(rng.uniform(SETTLE, SETTLE + 4), 3),
                "for": round(rng.uniform(2.0, 8.0), 3), "node": "n1", "stable": True})
    return sorted(out, key=lambda f: f["at"])


POISONS = ["huge_draining_unleased", "huge_draining_leased", "unleased_member", "garbled_member_leased",
           "ghost_applied_leased", "sibling_prefix", "bad_table_generation", "foreign_table",
           "not_a_node_id"]


def _poison(sim: Sim, which: str) -> None:
    e = sim.etcd
    long_lease = e.apply(("grant", 600))
    owners = [f"n{(b % len(sim.nodes)) + 1}" for b in range(sim.buckets)]
    records = {
        "huge_draining_unleased": (f"{PREFIX}/applied/x1", json.dumps(
            {"generation": 1, "draining": [[0, 10 ** 12]]}).encode(), 0),
        "huge_draining_leased": (f"{PREFIX}/applied/x2", json.dumps(
            {"generation": 1, "draining": [[0, 10 ** 12]]}).encode(), long_lease),
        "unleased_member": (f"{PREFIX}/members/x3", Member("x3", 1).encode(), 0),
        "garbled_member_leased": (f"{PREFIX}/members/x4", b"{garbled", long_lease),
        "ghost_applied_leased": (f"{PREFIX}/applied/x5", Applied(2 ** 53 - 1, 0).encode(), long_lease),
        "sibling_prefix": (f"{PREFIX}2/members/x6", Member("x6", 1).encode(), long_lease),
        "bad_table_generation": (f"{PREFIX}/applied/x7", b'{"generation": 1e400}', long_lease),
        "foreign_table": (f"{PREFIX}/table", TableRecord.encode(
            _table_gen(sim), owners), 0),
        "not_a_node_id": (f"{PREFIX}/members/a/b", Member("a/b", 1).encode(), long_lease),
    }
    key, value, lease = records[which]
    e.apply(("put", key, value, lease))


def _table_gen(sim: Sim) -> int:
    cur = sim.etcd.s.kv.get(f"{PREFIX}/table")
    if cur is None:
        return 1
    try:
        return TableRecord.decode(cur[0], 0, None).generation  # same generation, other contents
    except ValueError:
        return 1


def _start(sim: Sim, f: dict) -> None:
    kind, n = f["kind"], sim.nodes.get(f.get("node", ""))
    net = sim.net
    if kind == "etcd_cut":
        if f["dir"] in ("both", "to"):
            net.cut_to_etcd[n.id] = net.cut_to_etcd.get(n.id, 0) + 1
        if f["dir"] in ("both", "from"):
            net.cut_from_etcd[n.id] = net.cut_from_etcd.get(n.id, 0) + 1
    elif kind == "peer_cut":
        pairs = [(n.id, f["other"]), (f["other"], n.id)]
        for a, b in pairs[:1] if f["dir"] == "to" else pairs[1:] if f["dir"] == "from" else pairs:
            net.cut_peer[(a, b)] = net.cut_peer.get((a, b), 0) + 1
    elif kind == "lan_down":
        n.lan_up = False
        if f.get("with_etcd"):
            net.cut_to_etcd[n.id] = net.cut_to_etcd.get(n.id, 0) + 1
            net.cut_from_etcd[n.id] = net.cut_from_etcd.get(n.id, 0) + 1
    elif kind == "etcd_outage":
        sim.etcd.up = False
    elif kind == "etcd_slow":
        sim.extra_latency = f["delay"]
    elif kind == "slow_nft":
        n.nft_delay = f["delay"]
    elif kind == "pause":
        n.paused = True
    elif kind == "kill":
        n.kill()
    elif kind == "handoff":
        if n.alive:
            n.handoff_delay = f["for"]
            n.wake()
    elif kind == "crash":
        n.crash()
    elif kind == "revoke":
        # The lease an operator finds on the member key, or the applied record's.
        if n.view.registered:
            sim.etcd.apply(("revoke", n.view.applied_lease if f.get("which") == "applied" else n.view.lease_id))
    elif kind == "delete_member":
        sim.etcd.apply(("delete", f"{PREFIX}/members/{n.id}"))
    elif kind == "restore":
        f["_saved"] = sim.etcd.s.copy()
    elif kind == "poison":
        for w in f["which"]:
            _poison(sim, w)
    elif kind == "reject_peer":
        n.rejects_peer = True
    elif kind == "phase":
        # Fractions of the keepalive interval, so that a replay means the same at every timing.
        k = sim.timing.keepalive_interval
        n.phase_shift = {"keepalive": f.get("keepalive", 0.0) * k, "prober": f.get("prober", 0.0) * k}


def _end(sim: Sim, f: dict) -> None:
    kind, n = f["kind"], sim.nodes.get(f.get("node", ""))
    net = sim.net
    if kind == "etcd_cut":
        if f["dir"] in ("both", "to"):
            net.cut_to_etcd[n.id] -= 1
        if f["dir"] in ("both", "from"):
            net.cut_from_etcd[n.id] -= 1
    elif kind == "peer_cut":
        pairs = [(n.id, f["other"]), (f["other"], n.id)]
        for a, b in pairs[:1] if f["dir"] == "to" else pairs[1:] if f["dir"] == "from" else pairs:
            net.cut_peer[(a, b)] -= 1
    elif kind == "lan_down":
        n.lan_up = True
        if f.get("with_etcd"):
            net.cut_to_etcd[n.id] -= 1
            net.cut_from_etcd[n.id] -= 1
    elif kind == "etcd_outage":
        sim.etcd.restart()
    elif kind == "etcd_slow":
        sim.extra_latency = 0.0
    elif kind == "slow_nft":
        n.nft_delay = 0.002
    elif kind == "pause":
        n.paused = False
        parked, n.parked = n.parked, []
        # The watch thread first hands over what its stream had buffered, as a
        # resumed process's would; then every thread goes on where it stopped.
        for item in parked:
            if item[0] == "deliver":
                sim.after(0, lambda ev=item[1], inc=item[2]: n._deliver(ev, inc))
        for item in parked:
            if item[0] == "step":
                sim.after(0, lambda p=item[1], v=item[2]: sim.step(p, v))
    elif kind in ("kill", "crash"):
        n.restart()
    elif kind == "reject_peer":
        n.rejects_peer = False
    elif kind == "restore":
        sim.etcd.s = f.pop("_saved")
        sim.etcd.restart()  # a restored etcd starts: a new leader extends every lease
        for node in sim.nodes.values():
            node.watch_connected = False  # streams break; each watch resyncs and sees the rewind


def validate_schedule(schedule: list, nodes: int) -> list[dict]:
    """A replayed schedule comes from a person: refuse what the nemeses cannot play, by name."""
    names = {f"n{i}" for i in range(1, nodes + 1)}
    for i, f in enumerate(schedule):
        if not isinstance(f, dict) or f.get("kind") not in KINDS:
            raise ValueError(f"fault {i}: kind must be one of {', '.join(KINDS)}")
        for key in ("at", "for"):
            if not isinstance(f.get(key), (int, float)) or not 0 <= f[key] <= 600:
                raise ValueError(f"fault {i}: {key!r} must be seconds from 0 to 600")
        if f.get("node", "n1") not in names or f.get("other", "n1") not in names:
            raise ValueError(f"fault {i}: node names must be among {', '.join(sorted(names))}")
    return schedule


@dataclass
class Result:
    seed: int
    schedule: list
    ok: bool
    violations: list = field(default_factory=list)
    error: str = ""
    unserved_after_heal: float = 0.0
    healed_at: float = 0.0

    def replay_hint(self) -> str:
        return (f"python -m nlbfarm.sim --seed {self.seed} --replay "
                f"'{json.dumps(self.schedule, sort_keys=True)}'")


def run(seed: int, schedule: list[dict] | None = None, nodes: int = 3,
        timing: Timing | None = None) -> Result:
    """Play one schedule; the result says whether every invariant held."""
    schedule = random_schedule(seed, nodes) if schedule is None else validate_schedule(schedule, nodes)
    skew = 0.005 if any(f["kind"] == "skew" for f in schedule) else 0.0
    sim = Sim(seed, schedule, nodes=nodes, timing=timing, skew=skew)
    if any(f["kind"] == "wildcard" for f in schedule):
        for node in sim.nodes.values():
            node.answer_as_self = True
    plays = [dict(f) for f in schedule if f["kind"] not in ("wildcard", "skew")]
    for f in plays:
        sim.at(f["at"], lambda f=f: _start(sim, f))
        sim.at(f["at"] + f["for"], lambda f=f: _end(sim, f))
    healed = max([f["at"] + f["for"] for f in plays] + [SETTLE])
    res = Result(seed, schedule, True, healed_at=healed)
    first_served = [None]

    def sample():
        if first_served[0] is None and sim.served():
            first_served[0] = sim.now
            # Keep checking the invariant a while after the farm converged, then stop.
            sim.stop_at = min(sim.stop_at, sim.now + AFTER_CONVERGED)
        elif first_served[0] is None:
            sim.after(0.05, sample)
    sim.at(healed, sample)
    dark_at: list[tuple[float, int]] = []
    for f in plays:
        if f.get("stable"):
            # Static stability: sampled through the outage, after the keepers noticed
            # nothing yet had to change (a bucket dark here is a failed connection).
            def check(end=f["at"] + f["for"]):
                h = sim.holders()
                dark = [b for b in range(sim.buckets) if len(h.get(b, ())) != 1]
                if dark and not dark_at:
                    dark_at.append((sim.now, len(dark)))
                if sim.now + 0.01 < end:
                    sim.after(0.01, check)
            sim.at(f["at"], check)
    try:
        sim.run(healed + HEAL_WINDOW)
    except Violation as exc:
        res.ok, res.violations = False, [str(exc)]
        return res
    except Exception as exc:  # noqa: BLE001 - a crash in a decision core is a failure too
        res.ok, res.error = False, f"{type(exc).__name__}: {exc}"
        return res
    if dark_at:
        res.ok = False
        res.error = (f"{dark_at[0][1]} buckets dark at t={dark_at[0][0]:.2f} while etcd was down for everyone "
                     "(static stability)")
        return res
    if first_served[0] is None:
        res.ok = False
        h = sim.holders()
        dark = [b for b in range(sim.buckets) if len(h.get(b, ())) != 1]
        res.error = (f"{len(dark)} buckets not served {HEAL_WINDOW:.0f} s after the faults healed; "
                     f"last reasons: " + "; ".join(f"{n.id}: {n.sentences[-1] if n.sentences else '-'}"
                                                    for n in sim.nodes.values()))
        res.unserved_after_heal = HEAL_WINDOW
    else:
        res.unserved_after_heal = first_served[0] - healed
        if res.unserved_after_heal > UNSERVED_BOUND:
            res.ok = False
            res.error = f"buckets unserved for {res.unserved_after_heal:.1f} s after the faults healed"
    return res
