"""Pure frame builders: gratuitous ARP and unsolicited neighbour advertisement.

They only build bytes (no root, no kernel); :mod:`.announce` sends them.
"""
from __future__ import annotations

import ipaddress
import struct

from .names import _ipv4, _ipv6, _mac_bytes

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ETH_ZLEN = 60  # minimum Ethernet frame length without the FCS
BROADCAST_MAC = b"\xff" * 6

ETH_P_IPV6 = 0x86DD
IPPROTO_ICMPV6 = 58
ND_NEIGHBOR_ADVERT = 136
ND_NA_FLAG_OVERRIDE = 0x20000000  # R = 0x80000000, S = 0x40000000, O = 0x20000000
ND_OPT_TARGET_LLADDR = 2
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"  # 33:33 + low 32 bits of ff02::1
ALL_NODES_IP = ipaddress.IPv6Address("ff02::1")


def build_garp_frame(src_mac: str | bytes, sender_mac: str | bytes, ip: str) -> bytes:
    """Build a gratuitous ARP frame (RFC 5227 "ARP announcement").

    * Ethernet: dst ff:ff:ff:ff:ff:ff, src ``src_mac`` (the sending
      interface's own MAC), ethertype 0x0806.
    * ARP: Ethernet/IPv4, opcode 1 (request), sender hw ``sender_mac`` (the
      cluster MAC), sender IP = target IP = ``ip``, target hw all zeros
      (RFC 5227: ignored, SHOULD be zero).
    * Zero-padded to 60 bytes (ETH_ZLEN) so that no driver has to pad it.
    """
    addr = _ipv4(ip).packed
    eth = BROADCAST_MAC + _mac_bytes(src_mac) + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack(
        "!HHBBH6s4s6s4s",
        ARPHRD_ETHER,  # hardware type
        ETH_P_IP,  # protocol type
        6,  # hardware address length
        4,  # protocol address length
        ARPOP_REQUEST,
        _mac_bytes(sender_mac),
        addr,
        b"\x00" * 6,
        addr,
    )
    return (eth + arp).ljust(ETH_ZLEN, b"\x00")


def _inet_checksum(data: bytes) -> int:
    """RFC 1071 one's complement checksum (an odd tail is zero-padded)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_unsolicited_na_frame(src_mac: str | bytes, target_mac: str | bytes, ip: str) -> bytes:
    """Build an unsolicited Neighbor Advertisement frame (RFC 4861 7.2.6).

    * Ethernet: dst 33:33:00:00:00:01 (all-nodes), src ``src_mac`` (the
      sending interface's own MAC), ethertype 0x86dd.
    * IPv6: src ``ip`` (the VIP), dst ff02::1, next header 58 (ICMPv6), hop
      limit 255 (receivers drop ND messages with any other value).
    * ICMPv6 type 136 code 0, flags Router = 0, Solicited = 0, Override = 1,
      target ``ip``, one Target Link-Layer Address option (type 2, length 1)
      carrying ``target_mac`` (the cluster MAC). The checksum covers the IPv6
      pseudo-header.
    86 bytes, longer than ETH_ZLEN, so no padding.
    """
    addr = _ipv6(ip).packed
    dst = ALL_NODES_IP.packed
    icmp = struct.pack("!BBHI16sBB6s", ND_NEIGHBOR_ADVERT, 0, 0, ND_NA_FLAG_OVERRIDE,
                       addr, ND_OPT_TARGET_LLADDR, 1, _mac_bytes(target_mac))
    pseudo = addr + dst + struct.pack("!I3xB", len(icmp), IPPROTO_ICMPV6)
    icmp = icmp[:2] + struct.pack("!H", _inet_checksum(pseudo + icmp)) + icmp[4:]
    eth = ALL_NODES_MAC + _mac_bytes(src_mac) + struct.pack("!H", ETH_P_IPV6)
    # version 6, traffic class 0, flow label 0; payload length; next header; hop limit
    ipv6 = struct.pack("!IHBB", 6 << 28, len(icmp), IPPROTO_ICMPV6, 255) + addr + dst
    return eth + ipv6 + icmp
