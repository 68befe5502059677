"""The VIP on the node's LAN interface: address, cluster MAC membership, announcements.

Ordering (the caller's contract, kept by the agent): ``up()`` runs only after
the ARP and neighbour-discovery rewrite rules are in the kernel, and
``down()`` runs before they go, so no ARP or ND packet ever leaves with the
VIP and this node's own MAC.

An IPv4 VIP is added as a /32, an IPv6 VIP as a /128 without duplicate
address detection: every node holds the same address on purpose, and DAD
would mark it "dadfailed" on all nodes but the first.
"""
from __future__ import annotations

import ipaddress
import logging

from nlbfarm.node import iplib

log = logging.getLogger(__name__)


def vip_cidr(vip: str) -> str:
    return f"{vip}/{ipaddress.ip_address(vip).max_prefixlen}"


def _is_v6(vip: str) -> bool:
    return ipaddress.ip_address(vip).version == 6


class Vip:
    def __init__(self, interface: str, vips: tuple[str, ...], cluster_mac: str, netns: str | None = None,
                 mac_mode: str = "multicast"):
        self.interface = interface
        self.vips = tuple(vips)
        self.cluster_mac = cluster_mac
        self.netns = netns
        self.mac_mode = mac_mode

    def up(self) -> None:
        # Requests this node sends must not carry the VIP as sender address:
        # arp_announce=2 picks the interface's primary address instead (the
        # nft rewrite covers the rest).
        iplib.set_sysctl(self.netns, f"net.ipv4.conf.{self.interface}.arp_announce", "2")
        if self.mac_mode == "unicast-flood":
            # The NIC must pass frames for a unicast MAC that is not its own.
            if iplib.set_promisc(self.interface, True, netns=self.netns):
                log.info("promiscuous on for cluster mac=%s dev=%s", self.cluster_mac, self.interface)
        elif iplib.add_multicast_mac(self.interface, self.cluster_mac, netns=self.netns):
            log.info("joined cluster mac=%s dev=%s", self.cluster_mac, self.interface)
        for vip in self.vips:
            if iplib.add_address(self.interface, vip_cidr(vip), netns=self.netns, nodad=_is_v6(vip)):
                log.info("vip added address=%s dev=%s", vip, self.interface)
        self.announce()

    def announce(self) -> None:
        """Gratuitous ARP (IPv4) or an unsolicited neighbour advert with the override flag
        (IPv6): neighbours that cached another MAC for a VIP learn the cluster MAC."""
        for vip in self.vips:
            if _is_v6(vip):
                iplib.send_unsolicited_na(self.interface, vip, self.cluster_mac, netns=self.netns, count=2)
            else:
                iplib.send_gratuitous_arp(self.interface, vip, self.cluster_mac, netns=self.netns, count=2)

    def link_up(self) -> bool:
        """Does the LAN interface have carrier? A cut cable means: withdraw at once."""
        try:
            with open(f"/sys/class/net/{self.interface}/carrier") as f:
                return f.read().strip() == "1"
        except OSError:  # interface gone, or down (reading carrier fails with EINVAL)
            return False

    def down(self) -> bool:
        """Remove every VIP and the cluster MAC; True only if no VIP is left.

        Each VIP is tried even if another fails: while any VIP remains, the
        caller must keep the ARP rewrite, or the node would answer ARP for it
        with its own MAC and pin clients to itself.
        """
        all_gone = True
        for vip in self.vips:
            try:
                if iplib.delete_address(self.interface, vip_cidr(vip), netns=self.netns):
                    log.info("vip removed address=%s dev=%s", vip, self.interface)
            except iplib.NotFound:
                pass
            except iplib.NetError as exc:
                all_gone = False
                log.error("vip removal failed address=%s dev=%s reason=%s", vip, self.interface, exc)
        try:
            if self.mac_mode == "unicast-flood":
                iplib.set_promisc(self.interface, False, netns=self.netns)
            else:
                iplib.delete_multicast_mac(self.interface, self.cluster_mac, netns=self.netns)
        except iplib.NetError as exc:  # NotFound included: nothing to leave
            log.warning("cluster mac removal failed mac=%s dev=%s reason=%s", self.cluster_mac,
                        self.interface, exc)
        return all_gone
