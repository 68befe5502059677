"""The node's kernel data plane: nftables rules built as JSON, applied atomically.

Shape of what a node programs (two tables, both owned by nlbfarm only):

* ``arp <table>``: every ARP packet the node sends with a VIP as sender IP
  gets the cluster MAC as sender hardware address, so clients map the VIP to
  the cluster MAC and their frames reach every node.
* ``inet <table>``: a prerouting chain at priority -300 (before conntrack at
  -200) sends VIP packets to ``vip_in``, which marks them for local delivery,
  drops everything while the fence is closed, lets through the buckets this
  node serves (``jhash(client addr . client port) mod B`` with the
  cluster-wide seed) and its *draining* buckets (released TCP buckets whose
  established connections it keeps, minus new SYNs), and drops the rest.
  Foreign buckets never reach conntrack.
  While a bucket drains here or is guarded, a second prerouting chain after
  conntrack (priority -150) decides per connection: established and related
  packets pass; in draining buckets nothing else does; in *guarded* buckets
  (owned here, but a live peer still drains old connections in them) unknown
  mid-stream TCP packets are dropped silently because they belong to that
  peer. Anything else in an owned bucket reaches the TCP stack, which answers
  an unknown connection with a reset: that is how clients of a dead node learn
  at once that their connection is gone. In the steady state that chain is
  not hooked, but its ct rule stays in the table: a ct expression is what
  keeps conntrack tracking the connections that a later drain must know.

Each accept or drop rule of ``vip_in``, ``drain_in`` and ``vip_ct`` (not the
ICMP error and established-connection accepts) counts its packets in a named
counter object of the inet table, one per VIP and rule (``COUNTER_RULES``):
the rule picks the VIP's counter with ``counter name ip daddr map { VIP :
name }`` (a plain ``counter name`` when there is one VIP), so per-VIP
accounting costs one map lookup and no extra rules. A packet counted as
accepted or draining before conntrack may be counted again by a drop after it.
``DataPlane.counters`` reads them back and keeps them monotonic across
``apply``, which replaces the table and so resets them in the kernel.

The fence is a set element with a kernel timeout. The agent refreshes it while
its etcd session is healthy; if the agent dies the element expires and the
node drops all VIP traffic on its own, before its lease can expire. Every
write of the element gets a *deadline* (monotonic seconds, from
``node.decide.fence_deadline``) and is given only the milliseconds that fit
before it, counted when the transaction is sent; if the transaction returns
so late that the element could outlive the deadline, it is deleted at once.
So no delay between the decision and the commit (a conntrack scan, a long
ruleset, the lock, a paused process) can stretch the fence past it. The
element is written in nft's text syntax (``build_fence_write``): the JSON API
takes whole seconds only, and silently makes a fractional timeout "never".

``build_*`` functions are pure and golden-tested. ``DataPlane.apply`` sends one
transaction (old ruleset or new, never a mix) and records the new spec only
after the kernel accepted it. The inet table is rebuilt in place rather than
replaced, so that its fence set, and a still valid element in it, live on
through new tables; a fence that must open gets its element right after.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from nlbfarm.coordinator.hashing import network6_hash_payload, network_hash_payload
from nlbfarm.coordinator.rules import UNMATCHED_BUCKET, TrafficRule
from nlbfarm.errors import DataPlaneError

log = logging.getLogger(__name__)

DEFAULT_TABLE = "nlbfarm"
# config.AFFINITIES (a unit test keeps them equal): every pick_/ct_ chain name.
ALL_AFFINITIES = ("none", "client", "network")
PRIO_RAW = -300  # before conntrack (-200): foreign packets cost no conntrack entry
PRIO_POST_CT = -150  # after conntrack: ct state is known

# The per-VIP counters, named after what happened to the packets they count.
COUNTER_RULES = (
    "accepted",                  # owned bucket, let through (vip_in)
    "draining",                  # draining bucket, not a new SYN, let through (drain_in)
    "dropped_fenced",            # fence closed (vip_in)
    "dropped_foreign",           # bucket of another node (pick_* chains)
    "dropped_unmatched",         # VIP traffic no port rule matches (vip_in)
    "dropped_draining_syn",      # new connection in a draining bucket (drain_in)
    "dropped_draining_unknown",  # no established connection of ours in a draining bucket (vip_ct)
    "dropped_guarded",           # unknown mid-stream TCP in a guarded bucket: the peer's (vip_ct)
)


@dataclass(frozen=True)
class DataPlaneSpec:
    """Everything the kernel rules depend on; equal specs render equal rules."""

    interface: str
    vips: tuple[str, ...]
    cluster_mac: str
    buckets: int
    seed: int
    # Inclusive bucket ranges this node accepts new and existing flows for.
    accepting: tuple[tuple[int, int], ...] = ()
    # Released TCP buckets: established connections only, no new ones.
    draining: tuple[tuple[int, int], ...] = ()
    # Owned buckets where a live peer may still serve old connections.
    guarded: tuple[tuple[int, int], ...] = ()
    fence_open: bool = False
    fence_timeout: float = 2.0  # seconds; the kernel element takes milliseconds
    table: str = DEFAULT_TABLE
    mac_mode: str = "multicast"
    # Port rules per VIP (empty: every TCP and UDP port, affinity none) and
    # what happens to VIP traffic no rule matches: "drop" or "one-node".
    rules: tuple[TrafficRule, ...] = ()
    unmatched: str = "drop"
    # The interface's own MAC: the IPv6 neighbour-discovery rewrite needs it
    # (build_nd_rules). Unused without IPv6 VIPs.
    node_mac: str = ""

    def with_buckets(self, accepting, draining=(), guarded=()) -> "DataPlaneSpec":
        as_tuple = lambda rs: tuple(tuple(r) for r in rs)  # noqa: E731
        return replace(self, accepting=as_tuple(accepting), draining=as_tuple(draining),
                       guarded=as_tuple(guarded))


def cluster_mac_for(vip: str, mode: str = "multicast") -> str:
    """The cluster MAC for a VIP, as Windows NLB derives it: 03:bf (02:bf) + the IPv4 bytes.

    An IPv6 VIP gives the last four bytes of its address.

    Multicast: bit 0 of the first octet makes it multicast (every NIC that
    joined it accepts, switches flood it), bit 1 marks it locally
    administered. Unicast-flood: 02 is locally administered unicast; since no
    node ever sends from it, no switch learns it and every switch floods it.
    """
    packed = ipaddress.ip_address(vip).packed[-4:]
    return ("03:bf:" if mode == "multicast" else "02:bf:") + ":".join(f"{b:02x}" for b in packed)


@dataclass(frozen=True)
class RuleCounter:
    """Packets and bytes one counted rule saw for one VIP."""

    vip: str
    rule: str  # one of COUNTER_RULES
    packets: int
    bytes: int


def counter_name(vip: str, rule: str) -> str:
    """The name of the nft counter object for ``rule`` and ``vip`` (a plain identifier)."""
    return f"{rule}_" + vip.replace(".", "_").replace(":", "_")


def _payload(proto: str, fld: str) -> dict:
    return {"payload": {"protocol": proto, "field": fld}}


def _set_or_value(values: list):
    return values[0] if len(values) == 1 else {"set": list(values)}


# Per address family: the payload protocol of its header, its ICMP, and the
# marker in its chain names (IPv4 keeps the plain names: vip_in, pick_none...;
# IPv6 gets vip6_in, pick6_none...).
@dataclass(frozen=True)
class Family:
    ip: str       # "ip" or "ip6": payload protocol of the network header
    icmp: str     # "icmp" or "icmpv6"
    version: int
    marker: str   # "" or "6"

    def chain(self, base: str) -> str:
        head, _, tail = base.partition("_")
        return f"{head}{self.marker}_{tail}" if tail else f"{head}{self.marker}"


IPV4 = Family("ip", "icmp", 4, "")
IPV6 = Family("ip6", "icmpv6", 6, "6")

# ICMP errors carry no client port; every node takes them and its stack hands
# them to the matching socket, if it has one. Path MTU discovery depends on it.
_ICMP_ERRORS = {4: ["destination-unreachable", "time-exceeded"],
                6: ["destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem"]}


def vips_of(spec: "DataPlaneSpec", fam: Family) -> list[str]:
    return [v for v in spec.vips if ipaddress.ip_address(v).version == fam.version]


def families(spec: "DataPlaneSpec") -> list[Family]:
    return [f for f in (IPV4, IPV6) if vips_of(spec, f)]


def bucket_hash_expr(buckets: int, seed: int, fam: Family = IPV4) -> dict:
    """jhash over (client address . client port) mod B, the same on every node."""
    return {
        "jhash": {
            "mod": buckets,
            "seed": seed,
            "expr": {"concat": [_payload(fam.ip, "saddr"), _payload("th", "sport")]},
        }
    }


def address_hash_expr(buckets: int, seed: int, fam: Family = IPV4) -> dict:
    """jhash over the client address alone mod B: for ICMP echo, which has no port."""
    return {"jhash": {"mod": buckets, "seed": seed, "expr": _payload(fam.ip, "saddr")}}


def _range_elems(ranges: Iterable[tuple[int, int]]) -> list:
    return [lo if lo == hi else {"range": [lo, hi]} for lo, hi in ranges]


def _replace_table(family: str, name: str) -> list[dict]:
    # "add" makes the following "delete" safe on a first run; all three run in
    # the same transaction, so packets see the old table or the new one.
    t = {"family": family, "name": name}
    return [{"add": {"table": dict(t)}}, {"delete": {"table": dict(t)}}, {"add": {"table": dict(t)}}]


def build_arp_table(spec: DataPlaneSpec) -> list[dict]:
    fam, tbl = "arp", spec.table
    cmds = _replace_table(fam, tbl) + [
        {"add": {"chain": {"family": fam, "table": tbl, "name": "out", "type": "filter",
                           "hook": "output", "prio": 0, "policy": "accept"}}},
    ]
    vips = vips_of(spec, IPV4)
    if vips:
        # Requests as well as replies: a request sent from the VIP would teach
        # the client this node's own MAC and pin all traffic to it.
        cmds.append({"add": {"rule": {"family": fam, "table": tbl, "chain": "out", "expr": [
            {"match": {"op": "==", "left": _payload("arp", "saddr ip"), "right": _set_or_value(vips)}},
            {"mangle": {"key": _payload("arp", "saddr ether"), "value": spec.cluster_mac}},
        ]}}})
    return cmds


def _mac_words(mac: str) -> list[int]:
    b = bytes(int(x, 16) for x in mac.split(":"))
    return [int.from_bytes(b[i:i + 2], "big") for i in range(0, 6, 2)]


def _ones_add(a: int, b: int) -> int:
    s = a + b
    return (s & 0xFFFF) + (s >> 16)


def nd_checksum_delta(node_mac: str, cluster_mac: str) -> int:
    """The 16-bit value that keeps an ICMPv6 checksum valid when ``node_mac`` becomes ``cluster_mac``.

    nft 1.0.6 rewrites a raw ``@th`` field without fixing the ICMPv6
    checksum (``csum_type 0`` in ``--debug=netlink``), and a neighbour
    discards an advert whose checksum is wrong. So the rule also writes this
    value into 16 reserved bits of the message (zero when sent; receivers
    must ignore them, RFC 4861): it is the ones'-complement sum of the old
    MAC's words minus the new MAC's, so the message's sum, and with it the
    kernel's checksum, stays what it was.
    """
    old = 0
    for w in _mac_words(node_mac):
        old = _ones_add(old, w)
    new = 0
    for w in _mac_words(cluster_mac):
        new = _ones_add(new, w)
    return _ones_add(old, (~new) & 0xFFFF)


# Offsets (bits from the ICMPv6 header) of neighbour solicitation and advert:
# both have 32 reserved or flag bits at 32, the target at 64 and their first
# option at 192; Linux sends the link-layer address option (source: type 1,
# target: type 2) first, its 6-byte address at 208.
_ND_RESERVED_LOW16 = 48
_ND_OPT_TYPE = 192
_ND_OPT_LLADDR = 208


def _raw_th(offset: int, length: int) -> dict:
    return {"payload": {"base": "th", "offset": offset, "len": length}}


def build_nd_rules(spec: DataPlaneSpec, rule) -> list[dict]:
    """IPv6 counterpart of the ARP rewrite: the node's neighbour discovery names the cluster MAC.

    Adverts for a VIP (the kernel sends them from the VIP) and solicitations
    the node sends from a VIP carry a link-layer address option with the
    node's own MAC; a client would learn it for the VIP and pin all its
    traffic to this node. Both get the cluster MAC, checksum-neutrally
    (``nd_checksum_delta``).
    """
    vips = vips_of(spec, IPV6)
    if not vips:
        return []
    if not spec.node_mac:
        raise ValueError("an IPv6 VIP needs the node's MAC in the spec (node_mac) for the ND rewrite")
    mac_value = int(spec.cluster_mac.replace(":", ""), 16)
    delta = nd_checksum_delta(spec.node_mac, spec.cluster_mac)
    out = []
    for icmp_type, opt in (("nd-neighbor-advert", 2), ("nd-neighbor-solicit", 1)):
        out.append(rule(
            "nd_out",
            {"match": {"op": "==", "left": _payload("icmpv6", "type"), "right": icmp_type}},
            {"match": {"op": "==", "left": _payload("ip6", "saddr"), "right": _set_or_value(vips)}},
            {"match": {"op": "==", "left": _raw_th(_ND_OPT_TYPE, 8), "right": opt}},
            {"mangle": {"key": _raw_th(_ND_OPT_LLADDR, 48), "value": mac_value}},
            {"mangle": {"key": _raw_th(_ND_RESERVED_LOW16, 16), "value": delta}},
        ))
    return out


def fence_element(spec: DataPlaneSpec, timeout_s: int = 1) -> dict:
    # Whole seconds are all the JSON API takes (a fraction silently means
    # "never expires"): JSON writes an element only for whole seconds, or to
    # delete it; anything finer is written in text: build_fence_write().
    return {"element": {"family": "inet", "table": spec.table, "name": "fence",
                        "elem": [{"elem": {"val": spec.interface, "timeout": int(timeout_s)}}]}}


_NFT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def build_fence_write(spec: DataPlaneSpec, ms: int) -> str:
    """The fence element for ``ms`` milliseconds, as one text transaction.

    Re-adding an element keeps its old expiry; delete + add resets it. The
    leading add makes the delete valid when the element already expired.
    Text, because only nft's text syntax carries millisecond timeouts.
    """
    if not (_NFT_NAME.match(spec.table) and _NFT_NAME.match(spec.interface)) or int(ms) <= 0:
        raise DataPlaneError(f"refusing a fence write for table {spec.table!r} interface {spec.interface!r} "
                             f"and {ms!r} ms")
    t, e = f"inet {spec.table} fence", f'"{spec.interface}"'
    return (f"add element {t} {{ {e} timeout 1s }}; delete element {t} {{ {e} }}; "
            f"add element {t} {{ {e} timeout {int(ms)}ms }}")


_SYN_ONLY = {"&": [_payload("tcp", "flags"), ["syn", "ack"]]}


def _l4(protos: list[str]) -> dict:
    return {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": _set_or_value(protos)}}


def affinity_hash_expr(affinity: str, buckets: int, seed: int, fam: Family = IPV4) -> dict:
    """The jhash of a rule's affinity (coordinator/rules.py has the Python twin).

    The raw ``@nh`` payload of ``network`` has no family guard of its own: the
    chains that use it are reached only through an ``ip``/``ip6 daddr`` match.
    """
    if affinity == "none":
        return bucket_hash_expr(buckets, seed, fam)
    if affinity == "client":
        return address_hash_expr(buckets, seed, fam)
    if affinity == "network":
        payload = network_hash_payload() if fam.version == 4 else network6_hash_payload()
        return {"jhash": {"mod": buckets, "seed": seed, "expr": payload}}
    raise ValueError(f"unknown affinity {affinity!r}")


def _in_buckets(spec: DataPlaneSpec, ranges, affinity: str = "none", fam: Family = IPV4) -> dict:
    return {"match": {"op": "==", "left": affinity_hash_expr(affinity, spec.buckets, spec.seed, fam),
                      "right": {"set": _range_elems(ranges)}}}


def effective_rules(spec: DataPlaneSpec) -> tuple[TrafficRule, ...]:
    """The spec's port rules; none given: every TCP and UDP port of every VIP, affinity none."""
    return spec.rules or tuple(TrafficRule(v, ("tcp", "udp"), 1, 65535, "none") for v in spec.vips)


def _affinities(rules) -> list[str]:
    return sorted({r.affinity for r in rules})


def _has(ranges, bucket: int) -> bool:
    return any(lo <= bucket <= hi for lo, hi in ranges)


def _rule_match(r: TrafficRule, spec: DataPlaneSpec, fam: Family, tcp_only: bool = False) -> list[dict]:
    out = []
    if len(vips_of(spec, fam)) > 1:
        out.append({"match": {"op": "==", "left": _payload(fam.ip, "daddr"), "right": r.vip}})
    out.append(_l4(["tcp"] if tcp_only else list(r.protocols)))
    if (r.first, r.last) != (1, 65535):
        port = r.first if r.first == r.last else {"range": [r.first, r.last]}
        out.append({"match": {"op": "==", "left": _payload("th", "dport"), "right": port}})
    return out


def _count(spec: DataPlaneSpec, rule: str, fam: Family = IPV4) -> dict:
    """The counter statement that counts a packet under ``rule`` for its VIP.

    Only packets to one of the family's VIPs reach its counted chains (the
    jumps into them match the same VIPs), so the map lookup always hits; a
    miss would end the rule without its verdict.
    """
    names = [(vip, counter_name(vip, rule)) for vip in vips_of(spec, fam)]
    if len(names) == 1:
        return {"counter": names[0][1]}
    return {"counter": {"map": {"key": _payload(fam.ip, "daddr"),
                                "data": {"set": [[vip, name] for vip, name in names]}}}}


def _family_chains_pre(fam: Family) -> list[str]:
    return [fam.chain("vip_in"), fam.chain("drain_in")]


def _needs_post_ct(spec: DataPlaneSpec) -> bool:
    """Is the hook after conntrack needed? Only while a bucket drains here or is guarded.

    In the steady state every verdict is taken before conntrack; a base chain
    after it would cost every packet a hook call and a few rules for nothing.
    """
    return bool(spec.draining or spec.guarded)


def _family_chains_post(spec: DataPlaneSpec, fam: Family) -> list[str]:
    rules = _family_rules(spec, fam)
    return [fam.chain("vip_ct"),
            # Jump targets exist before the rules that name them (one transaction, in order).
            *[fam.chain(f"pick_{aff}") for aff in _affinities(rules)],
            *[fam.chain(f"ct_{aff}") for aff in _affinities([r for r in rules if "tcp" in r.protocols])],
            *([fam.chain("pick_one"), fam.chain("ct_one")] if spec.unmatched == "one-node" else [])]


def _family_rules(spec: DataPlaneSpec, fam: Family) -> tuple[TrafficRule, ...]:
    vips = set(vips_of(spec, fam))
    return tuple(r for r in effective_rules(spec) if r.vip in vips)


def _build_family(spec: DataPlaneSpec, fam: Family, rule) -> list[dict]:
    """The rules of one address family's chains (created beforehand by ``build_inet_table``)."""
    count = lambda name: _count(spec, name, fam)  # noqa: E731
    ch = fam.chain
    in_buckets = lambda ranges, aff: _in_buckets(spec, ranges, aff, fam)  # noqa: E731
    to_vip = {"match": {"op": "==", "left": _payload(fam.ip, "daddr"), "right": _set_or_value(vips_of(spec, fam))}}
    icmp_type = lambda right: {"match": {"op": "==", "left": _payload(fam.icmp, "type"), "right": right}}  # noqa: E731
    rules = _family_rules(spec, fam)
    cmds = [
        rule("prerouting", to_vip, {"jump": {"target": ch("vip_in")}}),
        # Frames addressed to the multicast cluster MAC arrive as
        # PACKET_MULTICAST, which TCP refuses; they are ours to deliver.
        rule(ch("vip_in"), {"mangle": {"key": {"meta": {"key": "pkttype"}}, "value": "host"}}),
    ]
    if fam.version == 6:
        # Neighbour discovery for a VIP is every node's to answer, fenced or
        # not: each answers alike with the cluster MAC (nd_out).
        cmds.append(rule(ch("vip_in"), icmp_type({"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]}),
                         {"accept": None}))
    cmds += [
        rule(ch("vip_in"),
             {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "@fence"}},
             count("dropped_fenced"), {"drop": None}),
        rule(ch("vip_in"), icmp_type({"set": _ICMP_ERRORS[fam.version]}), {"accept": None}),
    ]
    # ICMP echo: exactly one node answers, the owner of the client address's
    # bucket. Echo has no connection to keep, so it moves at once.
    echo = icmp_type("echo-request")
    if spec.accepting:
        cmds.append(rule(ch("vip_in"), echo, in_buckets(spec.accepting, "client"), count("accepted"),
                         {"accept": None}))
    # Another node's echo: never left to the unmatched policy, or the owner of
    # bucket 0 would answer it a second time.
    cmds.append(rule(ch("vip_in"), echo, count("dropped_foreign"), {"drop": None}))
    # Port rules send each packet to the chain of its affinity, which hashes
    # it and decides by bucket; the rules do not overlap (config checks it).
    for r in rules:
        cmds.append(rule(ch("vip_in"), *_rule_match(r, spec, fam), {"goto": {"target": ch(f"pick_{r.affinity}")}}))
    if spec.unmatched == "one-node":
        cmds.append(rule(ch("vip_in"), {"goto": {"target": ch("pick_one")}}))
    cmds.append(rule(ch("vip_in"), count("dropped_unmatched"), {"drop": None}))
    for aff in _affinities(rules):
        if spec.accepting:
            cmds.append(rule(ch(f"pick_{aff}"), in_buckets(spec.accepting, aff), count("accepted"),
                             {"accept": None}))
        if spec.draining:
            cmds.append(rule(ch(f"pick_{aff}"), _l4(["tcp"]), in_buckets(spec.draining, aff),
                             {"jump": {"target": ch("drain_in")}}))
        cmds.append(rule(ch(f"pick_{aff}"), count("dropped_foreign"), {"drop": None}))
    if spec.unmatched == "one-node":
        # The default host: whoever owns bucket 0 serves what no rule matches.
        if _has(spec.accepting, UNMATCHED_BUCKET):
            cmds.append(rule(ch("pick_one"), count("accepted"), {"accept": None}))
        elif _has(spec.draining, UNMATCHED_BUCKET):
            cmds.append(rule(ch("pick_one"), _l4(["tcp"]), {"jump": {"target": ch("drain_in")}}))
        cmds.append(rule(ch("pick_one"), count("dropped_foreign"), {"drop": None}))
    if spec.draining:
        # A new connection in a released bucket belongs to its new owner.
        cmds.append(rule(ch("drain_in"), {"match": {"op": "==", "left": _SYN_ONLY, "right": "syn"}},
                         count("dropped_draining_syn"), {"drop": None}))
        cmds.append(rule(ch("drain_in"), count("draining"), {"accept": None}))

    if _needs_post_ct(spec):
        cmds.append(rule("postct", to_vip, {"jump": {"target": ch("vip_ct")}}))
    # Always present, reached or not: this ct expression is what keeps conntrack
    # tracking the VIP's connections in this namespace, so that a drain starting
    # later knows every connection that was open before it.
    cmds.append(rule(ch("vip_ct"), {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                              "right": ["established", "related"]}}, {"accept": None}))
    if _needs_post_ct(spec):
        for r in rules:
            if "tcp" in r.protocols:
                cmds.append(rule(ch("vip_ct"), *_rule_match(r, spec, fam, tcp_only=True),
                                 {"goto": {"target": ch(f"ct_{r.affinity}")}}))
        if spec.unmatched == "one-node":
            cmds.append(rule(ch("vip_ct"), _l4(["tcp"]), {"goto": {"target": ch("ct_one")}}))
        for aff in _affinities([r for r in rules if "tcp" in r.protocols]):
            if spec.draining:
                # Not an established connection of ours: nothing to keep serving.
                cmds.append(rule(ch(f"ct_{aff}"), in_buckets(spec.draining, aff),
                                 count("dropped_draining_unknown"), {"drop": None}))
            if spec.guarded:
                # Mid-stream packet of a connection this node does not know, in a
                # bucket a live peer still drains: it is the peer's. Drop it silently.
                cmds.append(rule(ch(f"ct_{aff}"), {"match": {"op": "!=", "left": _SYN_ONLY, "right": "syn"}},
                                 in_buckets(spec.guarded, aff), count("dropped_guarded"),
                                 {"drop": None}))
        if spec.unmatched == "one-node":
            if _has(spec.draining, UNMATCHED_BUCKET):
                cmds.append(rule(ch("ct_one"), count("dropped_draining_unknown"), {"drop": None}))
            elif _has(spec.guarded, UNMATCHED_BUCKET):
                cmds.append(rule(ch("ct_one"), {"match": {"op": "!=", "left": _SYN_ONLY, "right": "syn"}},
                                 count("dropped_guarded"), {"drop": None}))
    return cmds


def all_inet_chains() -> list[str]:
    """Every chain name build_inet_table can create, for any spec."""
    names = ["prerouting", "postct", "nd_out"]
    affs = list(ALL_AFFINITIES) + ["one"]
    for f in (IPV4, IPV6):
        names += _family_chains_pre(f) + [f.chain("vip_ct")]
        names += [f.chain(f"{kind}_{a}") for kind in ("pick", "ct") for a in affs]
    return names


def _rebuild_inet_table(spec: DataPlaneSpec, previous_vips: Iterable[str] = ()) -> list[dict]:
    """Empty the inet table in place, all but its fence set.

    Replacing the table (as the arp and netdev tables are) would also drop
    the fence element, and the JSON API cannot write it back with its
    millisecond expiry in the same transaction. So: flush every rule, then
    delete every chain and counter this code can create (each first added,
    which is a no-op for one that exists, so that the delete is valid).
    Packets see the old rules or the new ones, never a mix.
    """
    fam, tbl = "inet", spec.table
    t = {"family": fam, "table": tbl}
    cmds = [{"add": {"table": {"family": fam, "name": tbl}}}, {"flush": {"table": {"family": fam, "name": tbl}}}]
    for name in all_inet_chains():
        cmds += [{"add": {"chain": dict(t, name=name)}}, {"delete": {"chain": dict(t, name=name)}}]
    for vip in sorted(set(spec.vips) | set(previous_vips)):
        for r in COUNTER_RULES:
            c = dict(t, name=counter_name(vip, r))
            cmds += [{"add": {"counter": c}}, {"delete": {"counter": dict(c)}}]
    return cmds


def build_inet_table(spec: DataPlaneSpec, previous_vips: Iterable[str] = (), fence_write_s: int = 0) -> list[dict]:
    fam, tbl = "inet", spec.table

    def rule(chain: str, *expr: dict) -> dict:
        return {"add": {"rule": {"family": fam, "table": tbl, "chain": chain, "expr": list(expr)}}}

    def chain(name: str, prio: int | None = None, hook: str = "prerouting") -> dict:
        c = {"family": fam, "table": tbl, "name": name}
        if prio is not None:
            c.update(type="filter", hook=hook, prio=prio, policy="accept")
        return {"add": {"chain": c}}

    fams = families(spec)
    cmds = _rebuild_inet_table(spec, previous_vips) + [
        {"add": {"set": {"family": fam, "table": tbl, "name": "fence", "type": "ifname",
                         "flags": ["timeout"]}}},
    ]
    # Every counter exists for every VIP, also while its rule is absent, so
    # the set of counters depends on the VIPs only.
    cmds += [{"add": {"counter": {"family": fam, "table": tbl, "name": counter_name(vip, r)}}}
             for vip in spec.vips for r in COUNTER_RULES]
    if not spec.fence_open:
        # Closed in the same transaction as the new rules.
        cmds += build_fence_close(spec)
    elif fence_write_s > 0:
        # Opened with the rules, for whole seconds (delete + add resets an existing one).
        cmds += build_fence_close(spec) + [{"add": fence_element(spec, fence_write_s)}]
    # Otherwise an open fence is left as it is: its element, with its
    # millisecond expiry, is written by build_fence_write() alone.
    cmds += [chain("prerouting", PRIO_RAW), *[chain(n) for f in fams for n in _family_chains_pre(f)],
             *([chain("postct", PRIO_POST_CT)] if _needs_post_ct(spec) else []),
             *[chain(n) for f in fams for n in _family_chains_post(spec, f)]]
    for f in fams:
        cmds += _build_family(spec, f, rule)
    nd = build_nd_rules(spec, rule)
    if nd:
        cmds += [chain("nd_out", 0, hook="output"), *nd]
    return cmds


PRIO_INGRESS = -500


def build_netdev_table(spec: DataPlaneSpec) -> list[dict]:
    """unicast-flood: frames to the cluster MAC are this node's to deliver.

    The NIC is promiscuous, so it passes flooded frames for the cluster MAC,
    but the stack marks them PACKET_OTHERHOST and IP input drops those before
    prerouting; an ingress hook runs earlier and relabels them. In multicast
    mode the table is still replaced (empty), so switching modes leaves nothing.
    """
    fam, tbl = "netdev", spec.table
    cmds = _replace_table(fam, tbl)
    if spec.mac_mode == "unicast-flood":
        cmds += [
            {"add": {"chain": {"family": fam, "table": tbl, "name": "ingress", "type": "filter",
                               "hook": "ingress", "dev": spec.interface, "prio": PRIO_INGRESS,
                               "policy": "accept"}}},
            {"add": {"rule": {"family": fam, "table": tbl, "chain": "ingress", "expr": [
                {"match": {"op": "==", "left": _payload("ether", "daddr"), "right": spec.cluster_mac}},
                {"mangle": {"key": {"meta": {"key": "pkttype"}}, "value": "host"}},
            ]}}},
        ]
    return cmds


def build_ruleset(spec: DataPlaneSpec, previous_vips: Iterable[str] = (), fence_write_s: int = 0) -> list[dict]:
    """The whole nlbfarm ruleset for one node, as one list of JSON commands.

    ``previous_vips``: VIPs of the ruleset being replaced, whose counters go.
    An open fence's element is part of it only with ``fence_write_s`` (whole
    seconds); otherwise it is left alone (see ``build_fence_write``).
    """
    return (build_arp_table(spec) + build_inet_table(spec, previous_vips, fence_write_s)
            + build_netdev_table(spec))


def build_fence_close(spec: DataPlaneSpec) -> list[dict]:
    # The add makes the delete valid when the element has already expired.
    return [{"add": fence_element(spec)}, {"delete": fence_element(spec)}]


# What a planned restart's long fence element leaves before its deadline: the
# time its write may take.
HOLD_SLACK_S = 0.05
# A fence element shorter than this is not worth writing: close instead.
MIN_FENCE_MS = 20


def fence_ms(until: float | None, now: float, fence_timeout: float) -> int:
    """Whole milliseconds of fence element that fit before ``until`` (0: the fence must be closed)."""
    if until is None:
        return 0
    full = int(round(fence_timeout * 1000))
    if until == math.inf:  # no lease behind it (tools, kernel tests): the spec's full timeout
        return full
    ms = min(full, math.floor((until - now) * 1000))
    return ms if ms >= MIN_FENCE_MS else 0


_NFT_DURATION = re.compile(r"(\d+)(ms|d|h|m|s)")
_DURATION_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def fence_left_s(listing: str, interface: str) -> float:
    """Seconds the fence element for ``interface`` has left, from ``list set`` text output (0: none).

    Text, because the JSON listing truncates ``expires`` to whole seconds.
    One millisecond is added (the listing truncates too): the caller treats
    the result as the latest moment the element can still match.
    """
    m = re.search(r'"%s"[^,}]*?expires ([0-9dhms]+)' % re.escape(interface), listing or "")
    if not m:
        return 0.0
    parts = _NFT_DURATION.findall(m.group(1))
    if not parts or "".join(n + u for n, u in parts) != m.group(1):
        return 0.0
    return sum(int(n) * _DURATION_S[u] for n, u in parts) + 0.001


def fence_seconds(until: float | None, now: float, fence_timeout: float) -> float:
    """``fence_ms`` in seconds (the simulation's unit)."""
    return fence_ms(until, now, fence_timeout) / 1000


def build_teardown(table: str = DEFAULT_TABLE) -> list[dict]:
    cmds = []
    for fam in ("inet", "arp", "netdev"):
        t = {"family": fam, "name": table}
        cmds += [{"add": {"table": dict(t)}}, {"delete": {"table": dict(t)}}]
    return cmds


def build_counters_list(table: str = DEFAULT_TABLE) -> list[dict]:
    return [{"list": {"counters": {"family": "inet", "table": table}}}]


def parse_counters(listing, spec: DataPlaneSpec) -> list[RuleCounter]:
    """The per-VIP counters of ``spec`` in a libnftables JSON listing (``list counters`` or ``list table``).

    One entry per VIP of ``spec`` and rule of ``COUNTER_RULES``, sorted by VIP
    then rule; a counter missing from the listing reads as zero.
    """
    found: dict[str, tuple[int, int]] = {}
    items = listing.get("nftables", []) if isinstance(listing, dict) else []
    for item in items:
        obj = item.get("counter") if isinstance(item, dict) else None
        if (isinstance(obj, dict) and obj.get("family") == "inet" and obj.get("table") == spec.table
                and isinstance(obj.get("name"), str)):
            found[obj["name"]] = (int(obj.get("packets", 0)), int(obj.get("bytes", 0)))
    return sorted((RuleCounter(vip, rule, *found.get(counter_name(vip, rule), (0, 0)))
                   for vip in spec.vips for rule in COUNTER_RULES), key=lambda c: (c.vip, c.rule))


@dataclass
class DataPlane:
    """Applies specs to the kernel of the current network namespace.

    The reconcile loop applies specs; the lease keeper only extends an open
    fence. The lock makes "check the spec, then send" one step for both.
    ``spec.fence_open`` is the intent; how long the element lasts is decided
    at the commit from the deadline (``fence_ms``).
    """

    current: DataPlaneSpec | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    # Monotonic time by which the kernel's fence element has surely expired
    # (0: no element). Read by status views instead of listing the kernel.
    fence_expires_at: float = 0.0
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _nft: object = field(default=None, repr=False)
    # Counts of earlier incarnations of the table, (vip, rule) -> [packets, bytes];
    # counters() adds the live kernel counters on top.
    _counter_base: dict = field(default_factory=dict, repr=False)
    # The last spec this object applied, also after refresh_fence forgot
    # ``current``: its table's counters are folded into the base before the
    # next replace. None before the first apply and after teardown.
    _counted: DataPlaneSpec | None = field(default=None, repr=False)
    # The live values of the current table that counters() last returned, so
    # a table that vanished (flushed by someone) cannot make a count go back.
    _live_seen: dict = field(default_factory=dict, repr=False)
    # Readers' own libnftables context and lock, apart from the writers' lock.
    _read_nft: object = field(default=None, repr=False)
    _read_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _applies: int = field(default=0, repr=False)  # ruleset replacements so far
    # (table, interface) whose fence element a predecessor process left and
    # this one adopted (adopt_fence): the first apply keeps it, like its own.
    _adopted: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        if self._nft is not None and self._read_nft is None:
            self._read_nft = self._nft  # a context handed in (tests) serves both

    def _ctx(self):
        if self._nft is None:
            try:
                import nftables  # Debian's python3-nftables
            except ImportError as exc:  # pragma: no cover - depends on the host
                raise DataPlaneError(
                    "the nftables Python binding is missing: install Debian's python3-nftables "
                    "and use a venv created with --system-site-packages") from exc
            nft = nftables.Nftables()
            nft.set_json_output(True)
            nft.set_handle_output(False)
            self._nft = nft
        return self._nft

    def run(self, cmds: list[dict], what: str):
        with self._lock:
            rc, out, err = self._ctx().json_cmd({"nftables": cmds})
        if rc != 0:
            raise DataPlaneError(f"nftables refused {what}: {err.strip() or 'rc=%d' % rc}")
        return out

    def run_text(self, cmd: str, what: str) -> None:
        with self._lock:
            rc, _out, err = self._ctx().cmd(cmd)
        if rc != 0:
            raise DataPlaneError(f"nftables refused {what}: {err.strip() or 'rc=%d' % rc}")

    def _write_fence(self, spec: DataPlaneSpec, until: float | None, cap_s: float | None = None) -> int:
        """Write the element for the milliseconds that fit before ``until`` (close if none); returns them.

        Counted from before the transaction is sent; if it returns so late
        that the element could outlive ``until``, it is deleted at once.
        At most ``spec.fence_timeout`` long unless ``cap_s`` says otherwise.
        """
        ms = fence_ms(until, self.clock(), spec.fence_timeout if cap_s is None else cap_s)
        if not ms:
            if self.fence_expires_at:
                self.run(build_fence_close(spec), "fence close")
            self.fence_expires_at = 0.0
            return 0
        self.run_text(build_fence_write(spec, ms), "fence write")
        return ms if self._after_fence_write(spec, ms / 1000, until) else 0

    def _after_fence_write(self, spec: DataPlaneSpec, seconds: float, until: float | None) -> bool:
        """An element of ``seconds`` went in at some instant before now: close it if it could
        outlive ``until``. Returns whether it stays."""
        done = self.clock()
        if until is not None and done + seconds > until:
            log.warning("fence write took too long left=%.3fs element=%.3fs: closing it (the element could "
                        "outlive its deadline)", until - done, seconds)
            self.run(build_fence_close(spec), "fence close")
            self.fence_expires_at = 0.0
            return False
        self.fence_expires_at = done + seconds
        return True

    def apply(self, spec: DataPlaneSpec, fence_until: float | None = math.inf) -> bool:
        """Replace the whole ruleset in one transaction. Returns False if nothing changed.

        With ``spec.fence_open``, the fence element gets the milliseconds that
        fit before ``fence_until`` (None: none; the default ``math.inf``, for
        callers without a lease such as benchmarks: the spec's fence_timeout).
        An element already in the kernel that cannot outlive ``fence_until``
        is kept through the rebuild (no gap in service); any other is closed
        in the rules' transaction and written anew after it.
        """
        with self._lock:
            if spec == self.current:
                return False
            # The replace resets the kernel counters: read them first and fold
            # them into the base once the kernel accepted the new table. The
            # lock keeps other callers out, but packets keep flowing: those the
            # old table counts between this read and the swap (a few
            # microseconds) are missed by counters(); a count never goes back.
            old = self._read_old_counters()
            # An element already in the kernel that cannot outlive the deadline
            # stays through the rebuild; any other is closed with it, and an
            # open fence then gets a new element (opening late is safe).
            now = self.clock()
            ms = fence_ms(fence_until, now, spec.fence_timeout) if spec.fence_open else 0
            want = ms > 0
            same_element = ((self.current is not None and self.current.table == spec.table
                             and self.current.interface == spec.interface and self.current.fence_open)
                            or (self.current is None and self._adopted == (spec.table, spec.interface)))
            self._adopted = None
            keep = (want and same_element and self.fence_expires_at > now
                    and (fence_until is None or self.fence_expires_at <= fence_until))
            previous = self._counted.vips if self._counted is not None else ()
            # A fence that opens gets its element in the rules' transaction
            # when whole seconds of it fit (one transaction, as before
            # sub-second fences); a shorter one right after, in text.
            json_s = 0 if keep else ms // 1000
            self.run(build_ruleset(replace(spec, fence_open=keep or json_s > 0), previous, json_s),
                     "ruleset replace")
            if json_s:
                self._after_fence_write(spec, json_s, fence_until)
                keep = True  # nothing more to write
            elif not keep:
                self.fence_expires_at = 0.0
            for key in old.keys() | self._live_seen.keys():
                # Never less than counters() already reported from that table.
                (p_old, b_old), (p_seen, b_seen) = old.get(key, (0, 0)), self._live_seen.get(key, (0, 0))
                base = self._counter_base.setdefault(key, [0, 0])
                base[0] += max(p_old, p_seen)
                base[1] += max(b_old, b_seen)
            self._live_seen = {}
            self._applies += 1
            self.current = self._counted = spec
            if want and not keep:
                self._write_fence(spec, fence_until)  # refused: the fence stays closed, the error says why
            return True

    def _read_old_counters(self) -> dict[tuple[str, str], tuple[int, int]]:
        if self._counted is None:
            return {}
        try:
            out = self.run(build_counters_list(self._counted.table), "counter listing")
            return {(c.vip, c.rule): (c.packets, c.bytes) for c in parse_counters(out, self._counted)}
        except Exception as exc:  # noqa: BLE001 - counters must never fail an apply
            # E.g. someone flushed our table: keep the old base (plus what
            # counters() last saw of that table) and go on.
            log.debug("could not read counters before replacing the ruleset reason=%s", exc)
            return {}

    def counters(self) -> list[RuleCounter]:
        """Packets and bytes per VIP and counted rule since this object first applied a spec.

        One entry per VIP of the applied spec and rule of ``COUNTER_RULES``,
        sorted by VIP then rule; [] when nothing is applied. Raises
        DataPlaneError if the kernel cannot list the counters.
        """
        for _ in range(3):
            with self._lock:
                spec, applies = self.current, self._applies
            if spec is None:
                return []
            # The listing runs on a context of its own, outside the lock the fence
            # refresh needs: readers (the API, /metrics) never delay it.
            live = parse_counters(self._read(build_counters_list(spec.table), "counter listing"), spec)
            with self._lock:
                if self._applies != applies:
                    continue  # the table was replaced meanwhile: its counters were folded; read again
                self._live_seen = {(c.vip, c.rule): (c.packets, c.bytes) for c in live}
                base = {k: tuple(v) for k, v in self._counter_base.items()}
            return [replace(c, packets=c.packets + base.get((c.vip, c.rule), (0, 0))[0],
                            bytes=c.bytes + base.get((c.vip, c.rule), (0, 0))[1]) for c in live]
        raise DataPlaneError("counter listing: the ruleset kept changing while it was read")

    def _read(self, cmds: list[dict], what: str):
        with self._read_lock:
            if self._read_nft is None:
                import nftables  # Debian's python3-nftables
                nft = nftables.Nftables()
                nft.set_json_output(True)
                nft.set_handle_output(False)
                self._read_nft = nft
            rc, out, err = self._read_nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise DataPlaneError(f"nftables refused {what}: {err.strip() or 'rc=%d' % rc}")
        return out

    def refresh_fence(self, until: float | None) -> bool:
        """Re-write the fence element for the seconds that fit before ``until``; close it if none do.

        Only while the applied spec has the fence open. If the refresh fails
        (someone flushed our tables), forget the applied spec so the next
        ``apply`` rebuilds everything instead of assuming it.
        """
        with self._lock:
            spec = self.current
            if spec is None or not spec.fence_open:
                return False
            try:
                ms = self._write_fence(spec, until)
            except DataPlaneError:
                self.current = None
                self.fence_expires_at = 0.0
                raise
            return bool(ms)

    def hold_fence(self, until: float) -> int:
        """A planned restart's last fence write: the element lasts until ``until``, past fence_timeout.

        Only the handing-over process calls it, with its lease-based
        deadline, after its own threads stopped. Returns the milliseconds
        written (0: the fence is closed).
        """
        with self._lock:
            spec = self.current
            if spec is None or not spec.fence_open:
                return 0
            # Shorter than the deadline by the write's own time, or the
            # post-write check would find that it could outlive it.
            return self._write_fence(spec, until, cap_s=max(0.0, until - self.clock() - HOLD_SLACK_S))

    def adopt_fence(self, table: str, interface: str) -> float:
        """Take over the fence element a predecessor process left in the kernel.

        Returns the seconds it has left (0: none). The next ``apply`` of a
        spec with this table and interface keeps it through the rebuild if it
        cannot outlive that apply's deadline, exactly as for its own element.
        """
        if not (_NFT_NAME.match(table) and _NFT_NAME.match(interface)):
            return 0.0
        with self._lock:
            ctx = self._ctx()
            ctx.set_json_output(False)
            try:
                rc, out, _err = ctx.cmd(f"list set inet {table} fence")
            finally:
                ctx.set_json_output(True)
            left = fence_left_s(out, interface) if rc == 0 else 0.0  # rc != 0: no table, nothing to adopt
            self.fence_expires_at = self.clock() + left if left else 0.0
            self._adopted = (table, interface) if left else None
            return left

    def close_fence_of(self, table: str, interface: str) -> None:
        """Drop a fence element this object did not write (a predecessor's), if there is one."""
        probe = DataPlaneSpec(interface=interface, vips=(), cluster_mac="", buckets=64, seed=0, table=table)
        with self._lock:
            self._adopted = None
            self.fence_expires_at = 0.0
            rc, _out, _err = self._ctx().cmd(f"list set inet {table} fence") if _NFT_NAME.match(table) else (1, "", "")
            if rc == 0:
                self.run(build_fence_close(probe), "fence close")

    def close_fence(self) -> None:
        """Drop the fence element now (the lease is gone): the node stops serving at once."""
        with self._lock:
            spec = self.current
            if spec is None:
                return
            try:
                self.run(build_fence_close(spec), "fence close")
            finally:
                self.fence_expires_at = 0.0

    def fence_held(self) -> bool:
        """Whether the fence element may still be in the kernel, from what was written (no kernel call)."""
        return self.fence_expires_at > self.clock()

    def fence_is_open(self) -> bool:
        """What the kernel says now (the element may have expired since the last refresh)."""
        with self._lock:
            spec = self.current
            if spec is None:
                return False
            try:
                out = self.run([{"list": {"set": {"family": "inet", "table": spec.table, "name": "fence"}}}],
                               "fence listing")
            except DataPlaneError:
                return False
        for item in out.get("nftables", []) if isinstance(out, dict) else []:
            if "set" in item:
                return bool(item["set"].get("elem"))
        return False

    def teardown(self, table: str | None = None) -> None:
        with self._lock:
            name = table or (self.current.table if self.current else DEFAULT_TABLE)
            self.run(build_teardown(name), "teardown")
            self.current = self._counted = None
            self._counter_base.clear()
            self._live_seen = {}
