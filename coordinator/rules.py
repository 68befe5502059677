"""Port rules: which VIP traffic the farm serves, and which bucket a client lands in.

Every node must compute the same bucket for the same packet, or a connection
would be served by two nodes or none; so rules, like the bucket count, are
identical on every node. The kernel computes the bucket with the jhash
expression of the matching rule's affinity (``node/dataplane.py``); this
module is its Python twin, used to count draining connections and to answer
``Which``:

* ``none``: jhash(client address . client port), the best spread;
* ``client``: jhash(client address), session affinity;
* ``network``: jhash(the client's /24, or /64 for IPv6), for proxy pools.

IPv6 clients hash the same way with their 16-byte address (``hashing.py``
has the kernel-checked models for both families).

Traffic that matches no rule is dropped, or (``unmatched: one-node``) served
by the owner of bucket 0, which moves with the usual handover.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from nlbfarm.coordinator import hashing

UNMATCHED_BUCKET = 0


@dataclass(frozen=True)
class TrafficRule:
    vip: str
    protocols: tuple[str, ...]  # ("tcp",), ("udp",) or ("tcp", "udp")
    first: int
    last: int
    affinity: str  # none, client, network

    def matches(self, vip: str, protocol: str, port: int) -> bool:
        # The kernel rule for every port (1-65535) has no port match: it takes port 0 too.
        in_range = (self.first, self.last) == (1, 65535) or self.first <= port <= self.last
        return vip == self.vip and protocol in self.protocols and in_range


def resolve(vips, rules) -> tuple[TrafficRule, ...]:
    """Config port rules (``PortRule``, vip None = every VIP) -> one TrafficRule per VIP, in order."""
    out = []
    for r in rules:
        lo, hi = r.port_range
        for vip in ([r.vip] if r.vip else vips):
            out.append(TrafficRule(vip, r.protocols, lo, hi, r.affinity))
    return tuple(out)


def digest(rules: tuple[TrafficRule, ...], unmatched: str) -> str:
    """A short fingerprint of the traffic rules, compared between nodes."""
    import hashlib
    text = repr((tuple(sorted(rules, key=repr)), unmatched))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def match(rules: tuple[TrafficRule, ...], vip: str, protocol: str, port: int) -> TrafficRule | None:
    return next((r for r in rules if r.matches(vip, protocol, port)), None)


_BY_AFFINITY = {
    # affinity: (IPv4 model, IPv6 model); each takes (client_ip, client_port, buckets, seed)
    "none": (hashing.bucket_of, hashing.bucket_of6),
    "client": (lambda ip, _port, b, s: hashing.bucket_of_address(ip, b, s),
               lambda ip, _port, b, s: hashing.bucket_of_address6(ip, b, s)),
    "network": (lambda ip, _port, b, s: hashing.bucket_of_network(ip, b, s),
                lambda ip, _port, b, s: hashing.bucket_of_network6(ip, b, s)),
}


def bucket_by_affinity(affinity: str, client_ip: str, client_port: int, buckets: int, seed: int) -> int:
    """The bucket the kernel gives a client under ``affinity``, for an IPv4 or IPv6 client."""
    try:
        v4, v6 = _BY_AFFINITY[affinity]
    except KeyError:
        raise ValueError(f"unknown affinity {affinity!r}") from None
    model = v6 if ipaddress.ip_address(client_ip).version == 6 else v4
    return model(client_ip, client_port, buckets, seed)


def bucket_for(rules: tuple[TrafficRule, ...], unmatched: str, vip: str, protocol: str, port: int,
               client_ip: str, client_port: int, buckets: int, seed: int) -> int | None:
    """The bucket of a packet from client_ip:client_port to vip:port, or None if it is dropped.

    A client of the other address family than the VIP can never reach it: ValueError.
    """
    if ipaddress.ip_address(client_ip).version != ipaddress.ip_address(vip).version:
        raise ValueError(f"client {client_ip} and VIP {vip} are not of the same address family")
    rule = match(rules, vip, protocol, port)
    if rule is None:
        return UNMATCHED_BUCKET if unmatched == "one-node" else None
    return bucket_by_affinity(rule.affinity, client_ip, client_port, buckets, seed)
