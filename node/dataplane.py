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
  A second prerouting chain after conntrack (priority -150) decides per
  connection: established and related packets pass; in draining buckets
  nothing else does; in *guarded* buckets (owned here, but a live peer still
  drains old connections in them) unknown mid-stream TCP packets are dropped
  silently because they belong to that peer. Anything else in an owned bucket
  reaches the TCP stack, which answers an unknown connection with a reset:
  that is how clients of a dead node learn at once that their connection is gone.

The fence is a set element with a kernel timeout. The agent refreshes it while
its etcd session is healthy; if the agent dies the element expires and the
node drops all VIP traffic on its own, before its lease can expire.

``build_*`` functions are pure and golden-tested. ``DataPlane.apply`` sends one
transaction (old ruleset or new, never a mix) and records the new spec only
after the kernel accepted it.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Iterable

from nlbfarm.errors import DataPlaneError

log = logging.getLogger(__name__)

DEFAULT_TABLE = "nlbfarm"
PRIO_RAW = -300  # before conntrack (-200): foreign packets cost no conntrack entry
PRIO_POST_CT = -150  # after conntrack: ct state is known


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
    fence_timeout: int = 2
    table: str = DEFAULT_TABLE

    def with_buckets(self, accepting, draining=(), guarded=()) -> "DataPlaneSpec":
        as_tuple = lambda rs: tuple(tuple(r) for r in rs)  # noqa: E731
        return replace(self, accepting=as_tuple(accepting), draining=as_tuple(draining),
                       guarded=as_tuple(guarded))


def cluster_mac_for(vip: str) -> str:
    """The multicast cluster MAC for a VIP, as Windows NLB derives it: 03:bf + the IPv4 bytes.

    Bit 0 of the first octet makes it multicast (every NIC that joined it
    accepts, switches flood it), bit 1 marks it locally administered.
    """
    packed = ipaddress.IPv4Address(vip).packed
    return "03:bf:" + ":".join(f"{b:02x}" for b in packed)


def _payload(proto: str, fld: str) -> dict:
    return {"payload": {"protocol": proto, "field": fld}}


def _set_or_value(values: list):
    return values[0] if len(values) == 1 else {"set": list(values)}


def bucket_hash_expr(buckets: int, seed: int) -> dict:
    """jhash over (client address . client port) mod B, the same on every node."""
    return {
        "jhash": {
            "mod": buckets,
            "seed": seed,
            "expr": {"concat": [_payload("ip", "saddr"), _payload("th", "sport")]},
        }
    }


def _range_elems(ranges: Iterable[tuple[int, int]]) -> list:
    return [lo if lo == hi else {"range": [lo, hi]} for lo, hi in ranges]


def _replace_table(family: str, name: str) -> list[dict]:
    # "add" makes the following "delete" safe on a first run; all three run in
    # the same transaction, so packets see the old table or the new one.
    t = {"family": family, "name": name}
    return [{"add": {"table": dict(t)}}, {"delete": {"table": dict(t)}}, {"add": {"table": dict(t)}}]


def build_arp_table(spec: DataPlaneSpec) -> list[dict]:
    fam, tbl = "arp", spec.table
    return _replace_table(fam, tbl) + [
        {"add": {"chain": {"family": fam, "table": tbl, "name": "out", "type": "filter",
                           "hook": "output", "prio": 0, "policy": "accept"}}},
        # Requests as well as replies: a request sent from the VIP would teach
        # the client this node's own MAC and pin all traffic to it.
        {"add": {"rule": {"family": fam, "table": tbl, "chain": "out", "expr": [
            {"match": {"op": "==", "left": _payload("arp", "saddr ip"),
                       "right": _set_or_value(list(spec.vips))}},
            {"mangle": {"key": _payload("arp", "saddr ether"), "value": spec.cluster_mac}},
        ]}}},
    ]


def fence_element(spec: DataPlaneSpec) -> dict:
    return {"element": {"family": "inet", "table": spec.table, "name": "fence",
                        "elem": [{"elem": {"val": spec.interface, "timeout": spec.fence_timeout}}]}}


_SYN_ONLY = {"&": [_payload("tcp", "flags"), ["syn", "ack"]]}


def _l4(protos: list[str]) -> dict:
    return {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": _set_or_value(protos)}}


def _in_buckets(spec: DataPlaneSpec, ranges) -> dict:
    return {"match": {"op": "==", "left": bucket_hash_expr(spec.buckets, spec.seed),
                      "right": {"set": _range_elems(ranges)}}}


def build_inet_table(spec: DataPlaneSpec) -> list[dict]:
    fam, tbl = "inet", spec.table

    def rule(chain: str, *expr: dict) -> dict:
        return {"add": {"rule": {"family": fam, "table": tbl, "chain": chain, "expr": list(expr)}}}

    def chain(name: str, prio: int | None = None) -> dict:
        c = {"family": fam, "table": tbl, "name": name}
        if prio is not None:
            c.update(type="filter", hook="prerouting", prio=prio, policy="accept")
        return {"add": {"chain": c}}

    to_vip = {"match": {"op": "==", "left": _payload("ip", "daddr"), "right": _set_or_value(list(spec.vips))}}
    cmds = _replace_table(fam, tbl) + [
        {"add": {"set": {"family": fam, "table": tbl, "name": "fence", "type": "ifname",
                         "flags": ["timeout"]}}},
    ]
    if spec.fence_open:
        cmds.append({"add": fence_element(spec)})
    cmds += [
        chain("prerouting", PRIO_RAW), chain("vip_in"), chain("drain_in"),
        chain("postct", PRIO_POST_CT), chain("vip_ct"),
        rule("prerouting", to_vip, {"jump": {"target": "vip_in"}}),
        # Frames addressed to the multicast cluster MAC arrive as
        # PACKET_MULTICAST, which TCP refuses; they are ours to deliver.
        rule("vip_in", {"mangle": {"key": {"meta": {"key": "pkttype"}}, "value": "host"}}),
        rule("vip_in",
             {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "@fence"}},
             {"counter": None}, {"drop": None}),
        # ICMP errors (fragmentation needed, unreachable) carry no client port;
        # every node takes them and its stack delivers them to the matching
        # socket, if it has one. Path MTU discovery depends on it.
        rule("vip_in",
             {"match": {"op": "==", "left": _payload("icmp", "type"),
                        "right": {"set": ["destination-unreachable", "time-exceeded"]}}},
             {"accept": None}),
    ]
    if spec.accepting:
        cmds.append(rule("vip_in", _l4(["tcp", "udp"]), _in_buckets(spec, spec.accepting),
                         {"counter": None}, {"accept": None}))
    if spec.draining:
        cmds.append(rule("vip_in", _l4(["tcp"]), _in_buckets(spec, spec.draining),
                         {"jump": {"target": "drain_in"}}))
        # A new connection in a released bucket belongs to its new owner.
        cmds.append(rule("drain_in", {"match": {"op": "==", "left": _SYN_ONLY, "right": "syn"}},
                         {"counter": None}, {"drop": None}))
        cmds.append(rule("drain_in", {"counter": None}, {"accept": None}))
    cmds.append(rule("vip_in", {"counter": None}, {"drop": None}))

    cmds += [
        rule("postct", to_vip, {"jump": {"target": "vip_ct"}}),
        rule("vip_ct", {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                  "right": ["established", "related"]}}, {"accept": None}),
    ]
    if spec.draining:
        # Not an established connection of ours: nothing to keep serving.
        cmds.append(rule("vip_ct", _l4(["tcp"]), _in_buckets(spec, spec.draining),
                         {"counter": None}, {"drop": None}))
    if spec.guarded:
        # Mid-stream packet of a connection this node does not know, in a bucket
        # a live peer still drains: it is the peer's. Drop it without a reset.
        cmds.append(rule("vip_ct", _l4(["tcp"]),
                         {"match": {"op": "!=", "left": _SYN_ONLY, "right": "syn"}},
                         _in_buckets(spec, spec.guarded), {"counter": None}, {"drop": None}))
    return cmds


def build_ruleset(spec: DataPlaneSpec) -> list[dict]:
    """The whole nlbfarm ruleset for one node, as one list of JSON commands."""
    return build_arp_table(spec) + build_inet_table(spec)


def build_fence_refresh(spec: DataPlaneSpec) -> list[dict]:
    # Re-adding an existing element keeps its old expiry; delete + add resets
    # it. The leading add makes the delete valid if the element already expired.
    e = fence_element(spec)
    return [{"add": e}, {"delete": fence_element(spec)}, {"add": fence_element(spec)}]


def build_teardown(table: str = DEFAULT_TABLE) -> list[dict]:
    cmds = []
    for fam in ("inet", "arp"):
        t = {"family": fam, "name": table}
        cmds += [{"add": {"table": dict(t)}}, {"delete": {"table": dict(t)}}]
    return cmds


@dataclass
class DataPlane:
    """Applies specs to the kernel of the current network namespace.

    The reconcile loop applies specs; the keepalive thread only extends an
    open fence. The lock makes "check the spec, then send" one step for both.
    """

    current: DataPlaneSpec | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _nft: object = field(default=None, repr=False)

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

    def apply(self, spec: DataPlaneSpec) -> bool:
        """Replace the whole ruleset in one transaction. Returns False if nothing changed."""
        with self._lock:
            if spec == self.current:
                return False
            self.run(build_ruleset(spec), "ruleset replace")
            self.current = spec
            return True

    def refresh_fence(self, still_ok) -> bool:
        """Extend the fence if the applied spec has it open and ``still_ok()`` holds now.

        If the refresh fails (someone flushed our tables), forget the applied
        spec so the next ``apply`` rebuilds everything instead of assuming it.
        """
        with self._lock:
            spec = self.current
            if spec is None or not spec.fence_open or not still_ok():
                return False
            try:
                self.run(build_fence_refresh(spec), "fence refresh")
            except DataPlaneError:
                self.current = None
                raise
            return True

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
            self.current = None
