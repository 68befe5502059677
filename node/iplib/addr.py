"""IP addresses on a link (ip addr)."""
from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import _translated, _where
from .links import _get_link
from .names import parse_cidr, validate_ifname
from .netns import ip_for

IFA_F_NODAD = 0x02  # <linux/if_addr.h>


def _addr_text(msg: Any) -> str:
    # for IPv4, IFA_LOCAL is the local address (IFA_ADDRESS is the peer on
    # point-to-point links); IPv6 only has IFA_ADDRESS
    addr = msg.get("local") if msg["family"] == socket.AF_INET else None
    addr = addr or msg.get("address")
    return str(ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}"))


def _dump_addresses(ipr: IPRoute, index: int) -> list[str]:
    return [_addr_text(m) for m in ipr.addr("dump", index=index)]


def addresses(ifname: str, netns: str | None = None) -> list[str]:
    """All addresses on the link as CIDR strings, IPv6 link-local included,
    in kernel order (IPv4 first). NotFound if the link is missing."""
    validate_ifname(ifname)
    with _translated("list addresses of", f"{ifname!r} {_where(netns)}"):
        with ip_for(netns) as ipr:
            return _dump_addresses(ipr, _get_link(ipr, ifname, netns)["index"])


def add_address(ifname: str, cidr: str, netns: str | None = None,
                nodad: bool = False) -> bool:
    """Add ``cidr`` (e.g. ``"198.18.0.10/24"``) to the link. Returns changed.

    IPv4 addresses get the subnet broadcast address (like ``brd +``) when the
    prefix is /30 or shorter. IPv6 addresses go through duplicate address
    detection as usual, unless ``nodad=True``: then they are added with
    IFA_F_NODAD (like ``ip addr add ... nodad``) and are usable at once,
    never "tentative" or "dadfailed". Use it for a VIP that lives on several
    nodes at the same time, where DAD would fail on all but the first.
    ``nodad`` is ignored for IPv4. An address that is already there is left
    as it is (its flags are not changed). NotFound if the link is missing.
    """
    validate_ifname(ifname)
    iface = parse_cidr(cidr)
    text = str(iface)
    with _translated("add address", f"{text} to {ifname!r} {_where(netns)}"):
        with ip_for(netns) as ipr:
            index = _get_link(ipr, ifname, netns)["index"]
            if text in _dump_addresses(ipr, index):
                return False
            spec: dict[str, Any] = {}
            if iface.version == 4 and iface.network.prefixlen <= 30:
                spec["broadcast"] = str(iface.network.broadcast_address)
            if iface.version == 6 and nodad:
                spec["flags"] = IFA_F_NODAD  # sent as IFA_FLAGS by pyroute2
            try:
                ipr.addr("add", index=index, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen, **spec)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    return False
                raise
    return True


def delete_address(ifname: str, cidr: str, netns: str | None = None) -> bool:
    """Remove ``cidr`` from the link. Returns changed (False if it was not
    there). NotFound if the link is missing."""
    validate_ifname(ifname)
    iface = parse_cidr(cidr)
    text = str(iface)
    with _translated("delete address", f"{text} from {ifname!r} {_where(netns)}"):
        with ip_for(netns) as ipr:
            index = _get_link(ipr, ifname, netns)["index"]
            if text not in _dump_addresses(ipr, index):
                return False
            try:
                ipr.addr("del", index=index, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen)
            except NetlinkError as exc:
                if exc.code == errno.EADDRNOTAVAIL:
                    return False
                raise
    return True
