"""The kernel's bucket hash, in Python: which bucket a client lands in.

nftables' ``jhash ip saddr . th sport mod B seed S`` hashes an 8-byte key:
the IPv4 source address (4 bytes, network order) and the source port (2 bytes,
network order) padded with two zero bytes to a full 32-bit register. The
kernel's ``jhash()`` (include/linux/jhash.h) adds keys of up to 12 bytes in
its tail switch as little-endian 32-bit words and ``nft_jhash_eval`` maps the
32-bit hash onto 0..B-1 with ``reciprocal_scale`` (multiply, shift). ICMP
echo hashes the 4-byte address alone.

Network affinity (clients grouped by their IPv4 /24) is written
``jhash @nh,96,24 mod B seed S``: a raw payload of the first 24 bits of the
source address (network header offset 96 bits). ``nft --debug=netlink`` shows
``payload load 3b @ network header + 12`` and ``jhash(reg 2, 3, S)``: a
3-byte key, see ``bucket_of_network``. Its libnftables JSON (``nft -j list
ruleset``; ``nft -j -f`` and ``Nftables().json_cmd`` accept it back) is::

    {"jhash": {"mod": B, "seed": S,
               "expr": {"payload": {"base": "nh", "offset": 96, "len": 24}}}}

``network_hash_payload()`` returns the ``expr`` part.

IPv6 (``jhash_bytes`` models the whole kernel jhash, mix loop included, for
keys longer than 12 bytes). ``nft --debug=netlink`` (nftables 1.0.6) shows:

* ``jhash ip6 saddr . th sport``: ``payload load 16b @ network header + 8``,
  ``payload load 2b @ transport header + 0`` into the next register and
  ``jhash(reg 2, 20, S)``: a 20-byte key, the address and the port padded with
  two zero bytes, see ``bucket_of6``;
* ``jhash ip6 saddr``: ``jhash(reg 2, 16, S)``, see ``bucket_of_address6``;
* ``jhash @nh,64,64``: ``payload load 8b @ network header + 8`` and
  ``jhash(reg 2, 8, S)``: the client's /64 as an 8-byte key, see
  ``bucket_of_network6`` and ``network6_hash_payload()``. Its JSON is::

    {"jhash": {"mod": B, "seed": S,
               "expr": {"payload": {"base": "nh", "offset": 64, "len": 64}}}}

The lab tests check all of this against the buckets real connections land in.
"""
from __future__ import annotations

import ipaddress

_M = 0xFFFFFFFF
JHASH_INITVAL = 0xDEADBEEF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def _final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rol(b, 14)) & _M  # noqa: E702 - mirrors the kernel macro line by line
    a ^= c; a = (a - _rol(c, 11)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _M   # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _M  # noqa: E702
    return c


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """``__jhash_mix``: run once per 12-byte block while more than 12 bytes are left."""
    a = (a - c) & _M; a ^= _rol(c, 4);  c = (c + b) & _M  # noqa: E702 - mirrors the kernel macro
    b = (b - a) & _M; b ^= _rol(a, 6);  a = (a + c) & _M  # noqa: E702
    c = (c - b) & _M; c ^= _rol(b, 8);  b = (b + a) & _M  # noqa: E702
    a = (a - c) & _M; a ^= _rol(c, 16); c = (c + b) & _M  # noqa: E702
    b = (b - a) & _M; b ^= _rol(a, 19); a = (a + c) & _M  # noqa: E702
    c = (c - b) & _M; c ^= _rol(b, 4);  b = (b + a) & _M  # noqa: E702
    return a, b, c


def jhash_bytes(key: bytes, initval: int) -> int:
    """Linux ``jhash(key, len, initval)`` (include/linux/jhash.h) for any key of 1 or more bytes.

    The state starts at ``JHASH_INITVAL + len + initval``. While more than 12
    bytes are left the kernel adds three words read with
    ``__get_unaligned_cpu32`` (CPU order: little-endian on x86, which this
    models) and runs ``__jhash_mix``; the last 1..12 bytes go through the
    tail switch, which assembles them little-endian explicitly, then
    ``__jhash_final``. The kernel returns ``c`` unchanged for an empty key;
    nftables never hashes one, so it is rejected here.
    """
    n = len(key)
    if n < 1:
        raise ValueError("jhash_bytes takes at least 1 byte")
    initval &= _M
    a = b = c = (JHASH_INITVAL + n + initval) & _M
    k = bytes(key)
    while len(k) > 12:
        a = (a + int.from_bytes(k[0:4], "little")) & _M
        b = (b + int.from_bytes(k[4:8], "little")) & _M
        c = (c + int.from_bytes(k[8:12], "little")) & _M
        a, b, c = _mix(a, b, c)
        k = k[12:]
    # tail: 1..12 bytes; missing bytes count as zero, as the fallthrough switch skips them
    tail = k + bytes(12 - len(k))
    a = (a + int.from_bytes(tail[0:4], "little")) & _M
    b = (b + int.from_bytes(tail[4:8], "little")) & _M
    c = (c + int.from_bytes(tail[8:12], "little")) & _M
    return _final(a, b, c)


def jhash_short(key: bytes, initval: int) -> int:
    """Linux ``jhash(key, len, initval)`` for keys of 1 to 12 bytes.

    Up to 12 bytes the kernel adds everything in its tail switch, which
    assembles each 4-byte group little-endian (k[0] + k[1] << 8 + ...)
    whatever the CPU, then runs ``__jhash_final``. Same as ``jhash_bytes``,
    restricted to the lengths that never enter the mix loop.
    """
    n = len(key)
    if not 1 <= n <= 12:
        raise ValueError(f"jhash_short takes 1 to 12 bytes, got {n}")
    return jhash_bytes(key, initval)


def jhash_8(key: bytes, initval: int) -> int:
    """Linux ``jhash(key, 8, initval)``: the (address . port) key."""
    if len(key) != 8:
        raise ValueError("jhash_8 takes exactly 8 bytes")
    return jhash_short(key, initval)


def reciprocal_scale(val: int, ep_ro: int) -> int:
    return (val * ep_ro) >> 32


def bucket_of_address(client_ip: str, buckets: int, seed: int) -> int:
    """The bucket of ``jhash ip saddr mod B seed S``: ICMP echo, which has no client port."""
    key = ipaddress.IPv4Address(client_ip).packed
    return reciprocal_scale(jhash_short(key, seed & _M), buckets)


def bucket_of(client_ip: str, client_port: int, buckets: int, seed: int) -> int:
    """The bucket the kernel computes for a packet from ``client_ip:client_port``."""
    addr = ipaddress.IPv4Address(client_ip)
    if not 0 <= client_port <= 65535:
        raise ValueError(f"port must be 0..65535, got {client_port}")
    key = addr.packed + client_port.to_bytes(2, "big") + b"\0\0"
    return reciprocal_scale(jhash_8(key, seed & _M), buckets)


def network_hash_payload() -> dict:
    """The libnftables JSON ``expr`` of ``jhash @nh,96,24``: the source address's first 24 bits.

    Use it as ``{"jhash": {"mod": B, "seed": S, "expr": network_hash_payload()}}``.
    A raw ``@nh`` payload carries no protocol dependency, so in an ``inet``
    table guard the rule with ``meta nfproto ipv4`` (or an ``ip ...`` match),
    or IPv6 packets get hashed on bytes 12..14 of their header too.
    """
    return {"payload": {"base": "nh", "offset": 96, "len": 24}}


def bucket_of_network(client_ip: str, buckets: int, seed: int) -> int:
    """The bucket of ``jhash @nh,96,24 mod B seed S``: every client of a /24 lands together.

    The kernel hashes a 3-byte key, the first three octets of the source
    address in network order, with no padding: ``nft --debug=netlink``
    (nftables 1.0.6) shows ``payload load 3b @ network header + 12 => reg 2``
    then ``hash reg 1 = jhash(reg 2, 3, seed)``, and jhash's tail switch adds
    only bytes k[0..2] to ``a`` (length 3 also enters the initial value).
    tests/lab/test_hashing_kernel.py checks the prediction against the
    counters of real packets from several /24s.

    This is not the bucket of ``jhash ip saddr & 255.255.255.0`` (which 1.0.6
    also accepts): that loads 4 bytes, masks the last to zero and hashes a
    4-byte key, i.e. ``bucket_of_address("a.b.c.0", B, S)``.
    """
    key = ipaddress.IPv4Address(client_ip).packed[:3]
    return reciprocal_scale(jhash_short(key, seed & _M), buckets)


def bucket_of6(client_ip: str, client_port: int, buckets: int, seed: int) -> int:
    """The bucket of ``jhash ip6 saddr . th sport mod B seed S`` for ``[client_ip]:client_port``.

    A 20-byte key (``nft --debug=netlink``: ``jhash(reg 2, 20, S)``): the
    16-byte source address and the 2-byte port, both in network order, the
    port padded with two zero bytes to a full register. Longer than 12
    bytes, so the kernel runs one ``__jhash_mix`` round before the tail.
    """
    addr = ipaddress.IPv6Address(client_ip)
    if not 0 <= client_port <= 65535:
        raise ValueError(f"port must be 0..65535, got {client_port}")
    key = addr.packed + client_port.to_bytes(2, "big") + b"\0\0"
    return reciprocal_scale(jhash_bytes(key, seed & _M), buckets)


def bucket_of_address6(client_ip: str, buckets: int, seed: int) -> int:
    """The bucket of ``jhash ip6 saddr mod B seed S`` (ICMPv6 echo): the 16-byte address."""
    key = ipaddress.IPv6Address(client_ip).packed
    return reciprocal_scale(jhash_bytes(key, seed & _M), buckets)


def network6_hash_payload() -> dict:
    """The libnftables JSON ``expr`` of ``jhash @nh,64,64``: the source address's first 64 bits.

    Use it as ``{"jhash": {"mod": B, "seed": S, "expr": network6_hash_payload()}}``.
    As with ``network_hash_payload()``, a raw ``@nh`` payload carries no
    protocol dependency: in an ``inet`` table guard the rule with
    ``meta nfproto ipv6`` (or an ``ip6 ...`` match), or IPv4 packets get
    hashed on their addresses (header bytes 8..15) too.
    """
    return {"payload": {"base": "nh", "offset": 64, "len": 64}}


def bucket_of_network6(client_ip: str, buckets: int, seed: int) -> int:
    """The bucket of ``jhash @nh,64,64 mod B seed S``: every client of a /64 lands together.

    The IPv6 source address starts at network-header byte 8, so bits 64..127
    of the header are the address's /64 prefix. ``nft --debug=netlink``
    (nftables 1.0.6) shows ``payload load 8b @ network header + 8 => reg 2``
    then ``jhash(reg 2, 8, seed)``: an 8-byte key, the prefix in network order.

    Not the bucket of ``jhash ip6 saddr & ffff:ffff:ffff:ffff::`` (which 1.0.6
    also accepts): that loads all 16 bytes, zeroes the last 8 with a bitwise
    and hashes a 16-byte key, i.e. ``bucket_of_address6("<prefix>::", B, S)``.
    """
    key = ipaddress.IPv6Address(client_ip).packed[:8]
    return reciprocal_scale(jhash_bytes(key, seed & _M), buckets)
