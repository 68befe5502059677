"""Link-layer multicast addresses (ip maddr).

rtnetlink has no message for a link's multicast list and pyroute2 offers
none, so this does exactly what `ip maddr add/del` does: the SIOCADDMULTI /
SIOCDELMULTI ioctls on a socket created inside the namespace. The list is
read back from /proc/thread-self/net/dev_mcast (what `ip maddr show`
parses); its "global_use" column marks the entries added this way, which
`ip maddr show` prints as "static". The kernel keeps a single reference for
such entries, so a second add is harmless and a delete removes it.
"""
from __future__ import annotations

import errno
import fcntl
import socket
import struct

from nlbfarm.errors import NotFound

from .errors import _translated, _where
from .names import _is_multicast_mac, _mac_bytes, normalize_mac, validate_ifname
from .netns import run_in_netns

# <linux/sockios.h>: link-layer multicast list, what `ip maddr add/del` uses
SIOCGIFINDEX = 0x8933
SIOCADDMULTI = 0x8931
SIOCDELMULTI = 0x8932


def _ifreq_hwaddr(ifname: str, mac: bytes) -> bytes:
    # struct ifreq { char ifr_name[16]; struct sockaddr ifr_hwaddr; }
    # sa_family must be AF_UNSPEC for SIOC{ADD,DEL}MULTI
    return struct.pack("16sH14s", ifname.encode(), socket.AF_UNSPEC, mac)


def _read_dev_mcast(ifname: str) -> list[tuple[str, bool]]:
    """[(mac, static)] for ifname; call inside the namespace's thread."""
    entries = []
    with open("/proc/thread-self/net/dev_mcast") as f:
        for line in f:
            fields = line.split()
            # ifindex name refcount global_use hexaddr
            if len(fields) == 5 and fields[1] == ifname and len(fields[4]) == 12:
                entries.append((normalize_mac(fields[4]), fields[3] != "0"))
    return entries


def _maddr_in_ns(ifname: str, mac: bytes, add: bool) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # existence check first: a missing link must be NotFound, not "unchanged"
        fcntl.ioctl(sock, SIOCGIFINDEX, struct.pack("16s16x", ifname.encode()))
        static = normalize_mac(mac) in {m for m, s in _read_dev_mcast(ifname) if s}
        if static == add:
            return False
        try:
            fcntl.ioctl(sock, SIOCADDMULTI if add else SIOCDELMULTI,
                        _ifreq_hwaddr(ifname, mac))
        except OSError as exc:
            if not add and exc.errno == errno.ENOENT:
                return False  # removed concurrently
            raise
    return True


def _maddr(ifname: str, mac: str, netns: str | None, add: bool) -> bool:
    validate_ifname(ifname)
    raw = _mac_bytes(mac)
    if not _is_multicast_mac(raw):
        raise ValueError(f"{normalize_mac(raw)} is not a multicast MAC address"
                         " (the low bit of the first octet must be set)")
    op = "add multicast MAC" if add else "delete multicast MAC"
    with _translated(op, f"{normalize_mac(raw)} on {ifname!r} {_where(netns)}"):
        try:
            return run_in_netns(netns, _maddr_in_ns, ifname, raw, add)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise NotFound(f"link {ifname!r} does not exist {_where(netns)}") from exc
            raise


def add_multicast_mac(ifname: str, mac: str, netns: str | None = None) -> bool:
    """``ip maddr add MAC dev IFNAME``: the link accepts frames sent to MAC.
    Returns changed. ValueError if MAC is not multicast; NotFound if the link
    is missing."""
    return _maddr(ifname, mac, netns, True)


def delete_multicast_mac(ifname: str, mac: str, netns: str | None = None) -> bool:
    """``ip maddr del MAC dev IFNAME``. Returns changed (False if MAC was not
    added statically). NotFound if the link is missing."""
    return _maddr(ifname, mac, netns, False)


def multicast_macs(ifname: str, netns: str | None = None, static_only: bool = False) -> list[str]:
    """The link's link-layer multicast list (``ip maddr show dev IFNAME``).

    ``static_only=True`` returns only the entries added with
    :func:`add_multicast_mac` (or ``ip maddr add``), not those the kernel
    joined for IPv4/IPv6 multicast groups.
    """
    validate_ifname(ifname)

    def read() -> list[str]:
        socket.if_nametoindex(ifname)  # raises OSError if missing
        return [m for m, s in _read_dev_mcast(ifname) if s or not static_only]

    with _translated("list multicast MACs of", f"{ifname!r} {_where(netns)}"):
        try:
            return run_in_netns(netns, read)
        except OSError as exc:
            if exc.errno is None:  # if_nametoindex: "no interface with this name"
                raise NotFound(f"link {ifname!r} does not exist {_where(netns)}") from exc
            raise
