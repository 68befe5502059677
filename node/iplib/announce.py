"""Sending gratuitous ARP and unsolicited neighbour advertisements.

The frames are built by :mod:`.frames` and sent through an AF_PACKET raw
socket created inside the namespace (see :func:`.netns.run_in_netns`).
"""
from __future__ import annotations

import socket
import time

from nlbfarm.errors import NetError

from .errors import _CAP_NET_RAW, _translated, _where
from .frames import ARPHRD_ETHER, ETH_P_ARP, ETH_P_IPV6, build_garp_frame, build_unsolicited_na_frame
from .names import _ipv4, _ipv6, _mac_bytes, normalize_mac, validate_ifname
from .netns import run_in_netns


# --------------------------------------------------------------------------
# Gratuitous ARP
# --------------------------------------------------------------------------

def _send_frames_in_ns(ifname: str, what: str, build, ethertype: int, count: int, interval: float) -> None:
    """Send ``count`` frames ``build(own_mac)`` on ``ifname``, ``interval`` seconds apart."""
    # protocol 0: the socket only sends, so no frames are queued to it
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((ifname, 0))
        _, _, _, hatype, own_mac = sock.getsockname()
        if hatype != ARPHRD_ETHER or len(own_mac) != 6:
            raise NetError(f"send {what} on {ifname!r}: not an Ethernet link"
                           f" (ARPHRD {hatype})")
        frame = build(own_mac)
        for i in range(count):
            if i:
                time.sleep(interval)
            sock.sendto(frame, (ifname, ethertype))


def send_gratuitous_arp(ifname: str, ip: str, mac: str, netns: str | None = None,
                        count: int = 1, interval: float = 0.2) -> None:
    """Announce ``ip`` at ``mac`` (the cluster MAC) on ``ifname``.

    Sends ``count`` frames built by :func:`build_garp_frame` (Ethernet source
    = the interface's own MAC), ``interval`` seconds apart, through an
    AF_PACKET raw socket created inside ``netns`` (see :func:`run_in_netns`).
    Blocks for ``(count - 1) * interval`` seconds. Note that Linux neighbours
    only *update* existing entries from a gratuitous ARP unless
    ``net.ipv4.conf.*.arp_accept`` is set. NotFound if the link is missing.
    """
    _announce(ifname, "gratuitous ARP", _ipv4(ip), mac, build_garp_frame, ETH_P_ARP, netns, count, interval)


def _announce(ifname: str, what: str, addr, mac: str, build_frame, ethertype: int, netns: str | None,
              count: int, interval: float) -> None:
    validate_ifname(ifname)
    announced = _mac_bytes(mac)
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if interval < 0:
        raise ValueError(f"interval must not be negative, got {interval}")
    with _translated(f"send {what}", f"for {addr} at {normalize_mac(announced)}"
                     f" on {ifname!r} {_where(netns)}", _CAP_NET_RAW):
        run_in_netns(netns, _send_frames_in_ns, ifname, what,
                     lambda own: build_frame(own, announced, str(addr)), ethertype, count, interval)


# --------------------------------------------------------------------------
# Unsolicited neighbour advertisement (the IPv6 gratuitous ARP)
# --------------------------------------------------------------------------

def send_unsolicited_na(ifname: str, ip: str, mac: str, netns: str | None = None,
                        count: int = 1, interval: float = 0.2) -> None:
    """Announce IPv6 ``ip`` at ``mac`` (the cluster MAC) on ``ifname``.

    Sends ``count`` frames built by :func:`build_unsolicited_na_frame`
    (Ethernet source = the interface's own MAC), ``interval`` seconds apart,
    through an AF_PACKET raw socket created inside ``netns`` (see
    :func:`run_in_netns`). Blocks for ``(count - 1) * interval`` seconds.
    Note that Linux neighbours only *update* existing entries from an
    unsolicited NA unless ``net.ipv6.conf.*.accept_untracked_na`` is set.
    NotFound if the link is missing.
    """
    _announce(ifname, "unsolicited NA", _ipv6(ip), mac, build_unsolicited_na_frame, ETH_P_IPV6, netns, count,
              interval)
