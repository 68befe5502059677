"""Pure helpers: argument validation and normalisation (no root, no kernel).

Interface and namespace names, CIDRs, MAC addresses and IP addresses are
checked and brought into canonical form here, before anything is touched:
an invalid argument raises ``ValueError``.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any

IFNAMSIZ = 16  # including the trailing NUL: names are at most 15 characters

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}$")


def validate_ifname(name: str) -> str:
    """Return ``name`` if it is a valid Linux interface name, else ValueError.

    Rules: 1..15 characters (IFNAMSIZ - 1), only letters, digits, ``_``, ``.``
    and ``-``, and not ``.`` or ``..``. The kernel accepts a few more
    characters, but ``@``, ``:``, ``/`` and spaces confuse ``ip`` output and
    sysctl paths, so nlbfarm refuses them.
    """
    if not isinstance(name, str):
        raise ValueError(f"interface name must be a string, got {type(name).__name__}")
    if not name:
        raise ValueError("interface name must not be empty")
    if len(name) > IFNAMSIZ - 1:
        raise ValueError(
            f"interface name {name!r} is {len(name)} characters long;"
            f" Linux allows at most {IFNAMSIZ - 1}"
        )
    if name in (".", ".."):
        raise ValueError(f"interface name {name!r} is reserved")
    if not _IFNAME_RE.match(name):
        raise ValueError(
            f"interface name {name!r} contains characters other than"
            " letters, digits, '_', '.' and '-'"
        )
    return name


def validate_netns_name(name: str) -> str:
    """Return ``name`` if it is usable as a namespace name, else ValueError.

    1..64 characters of letters, digits, ``_``, ``.`` and ``-``, not starting
    with ``.`` or ``-`` (it becomes a file name under /run/netns).
    """
    if not isinstance(name, str):
        raise ValueError(f"namespace name must be a string, got {type(name).__name__}")
    if not _NETNS_RE.match(name):
        raise ValueError(
            f"namespace name {name!r} is invalid: use 1-64 letters, digits,"
            " '_', '.' or '-', not starting with '.' or '-'"
        )
    return name


def parse_cidr(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """Parse ``"198.18.0.10/24"`` or ``"2001:db8::10/64"`` into an interface.

    The prefix length is mandatory: a forgotten ``/24`` would silently become
    a /32 and change routing, so ``"198.18.0.10"`` is refused (write
    ``/32`` for a host address).
    """
    if isinstance(cidr, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return cidr
    if not isinstance(cidr, str):
        raise ValueError(f"address must be a string like '198.18.0.10/24', got {cidr!r}")
    text = cidr.strip()
    if "/" not in text:
        raise ValueError(
            f"address {cidr!r} has no prefix length; write e.g. '{text}/24',"
            f" or '{text}/{128 if ':' in text else 32}' for a host address"
        )
    try:
        return ipaddress.ip_interface(text)
    except ValueError as exc:
        raise ValueError(f"address {cidr!r} is not a valid IPv4/IPv6 CIDR: {exc}") from None


def normalize_cidr(cidr: str) -> str:
    """Canonical text form: ``" 2001:DB8:0::1/64"`` -> ``"2001:db8::1/64"``."""
    return str(parse_cidr(cidr))


def normalize_mac(mac: str) -> str:
    """Canonical MAC text: lower case, colon separated.

    Accepts ``03:BF:C6:12:00:0A``, ``03-bf-c6-12-00-0a`` and ``03bfc612000a``.
    """
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise ValueError(f"MAC address must be 6 bytes, got {len(mac)}")
        return ":".join(f"{b:02x}" for b in mac)
    if not isinstance(mac, str):
        raise ValueError(f"MAC address must be a string, got {mac!r}")
    text = mac.strip().lower()
    if not _MAC_RE.match(text):
        raise ValueError(
            f"MAC address {mac!r} is invalid; expected six hex octets like 03:bf:c6:12:00:0a"
        )
    digits = text.replace(":", "").replace("-", "")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def _mac_bytes(mac: str | bytes) -> bytes:
    return bytes.fromhex(normalize_mac(mac).replace(":", ""))


def _is_multicast_mac(mac: bytes) -> bool:
    return bool(mac[0] & 0x01)


def _ip_address(ip: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Accept '198.18.0.10', '2001:db8::10/64' or an ipaddress object."""
    try:
        if isinstance(ip, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
            addr = ip.ip
        elif isinstance(ip, str) and "/" in ip:
            addr = ipaddress.ip_interface(ip.strip()).ip
        else:
            addr = ipaddress.ip_address(ip.strip() if isinstance(ip, str) else ip)
    except ValueError as exc:
        raise ValueError(f"{ip!r} is not an IP address: {exc}") from None
    return addr


def _ipv4(ip: Any) -> ipaddress.IPv4Address:
    """Accept '198.18.0.10', '198.18.0.10/24' or an ipaddress object."""
    addr = _ip_address(ip)
    if addr.version != 4:
        raise ValueError(f"gratuitous ARP is IPv4 only; {ip!r} is IPv6")
    return addr


def _ipv6(ip: Any) -> ipaddress.IPv6Address:
    """Accept '2001:db8::10', '2001:db8::10/64' or an ipaddress object."""
    addr = _ip_address(ip)
    if addr.version != 6:
        raise ValueError(f"unsolicited neighbour advertisement is IPv6 only; {ip!r} is IPv4")
    return addr
