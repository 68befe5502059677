"""Netlink layer for nlbfarm, in the style of OpenStack Neutron's ip_lib.

Every network namespace, link, address, link-layer multicast address,
sysctl, gratuitous ARP and unsolicited neighbour advertisement that nlbfarm
touches goes through this module.
It is written against pyroute2 0.9.x.

Conventions
-----------
* ``netns=None`` always means *the namespace of the calling thread* (for the
  agent that is the host namespace). Any other value is the name of a
  namespace under ``/run/netns`` (what ``ip netns add NAME`` creates).
* Every add/ensure/delete call is idempotent and returns ``changed: bool``:
  True when it changed the system, False when the system already was in the
  requested state.
* Errors: a missing namespace, link or sysctl raises :class:`NotFound`; any
  other failure raises :class:`NetError` whose message names the operation,
  the object, the namespace and the errno. A raw pyroute2 ``NetlinkError``
  or ``OSError`` never escapes. Invalid *arguments* (bad interface name,
  CIDR, MAC, sysctl key) raise ``ValueError`` before anything is touched.

How a namespace is entered (read this before changing it)
---------------------------------------------------------
``setns(2)`` with ``CLONE_NEWNET`` changes the network namespace of the
*calling thread only*, and a socket stays in the namespace it was created
in for its whole life, whichever thread uses it later. So
:func:`run_in_netns` opens ``/run/netns/NAME`` in the caller, starts a fresh,
dedicated thread that calls ``setns()`` on that descriptor, runs the given
function there and exits; the caller joins it and closes the descriptor.
The thread is never switched back and never reused, so no other code - not
the caller, not a thread pool, not gRPC's threads - can ever run in the wrong
namespace, even if the function raises. Nothing is forked: pyroute2 0.9's
own ``IPRoute(netns=...)`` forks a child per handle to create the socket,
which is risky in a process that already runs other threads (gRPC, etcd
watchers): the child runs Python code and could deadlock on a lock another
thread held at fork time. (``IPRoute(netns=...)`` would also silently
*create* a missing namespace, because its default flags include O_CREAT.)

On top of it :func:`netns_socket` creates any socket inside a namespace, and
:func:`ip_for` - the *one* factory for pyroute2 handles in nlbfarm - builds an
``IPRoute`` around a NETLINK_ROUTE socket created that way.

The only fork left is in :func:`ensure_netns`, which uses pyroute2's
``netns.create`` (a short-lived child unshares and bind-mounts the new
namespace, exactly like ``ip netns add``); it only runs while setting up a lab.

Threads and handles
-------------------
pyroute2 0.9 keeps a socket and an asyncio event loop *per thread* inside
one ``IPRoute`` object, and ``close()`` only releases the calling thread's.
Hence the rule: a handle from :func:`ip_for` belongs to the thread that
opened it and to the ``with`` block that opened it; it is closed when the
block ends. Opening one costs about 3 ms. Do not call this module from a
thread that runs an asyncio event loop (pyroute2's sync API would try to run
its own loop there); use ``asyncio.to_thread``.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import ipaddress
import os
import re
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns
from pyroute2.netlink import NETLINK_ROUTE
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from nlbfarm.errors import NetError, NotFound

__all__ = [
    "IPHandle",
    "NetError",
    "NotFound",
    "add_address",
    "add_multicast_mac",
    "addresses",
    "build_garp_frame",
    "build_unsolicited_na_frame",
    "delete_address",
    "delete_link",
    "delete_multicast_mac",
    "delete_netns",
    "ensure_bridge",
    "ensure_netns",
    "ensure_veth_pair",
    "get_sysctl",
    "ip_for",
    "link_exists",
    "link_mac",
    "list_netns",
    "map_netlink_error",
    "map_os_error",
    "multicast_macs",
    "netns_exists",
    "netns_socket",
    "normalize_cidr",
    "normalize_mac",
    "parse_cidr",
    "run_in_netns",
    "send_gratuitous_arp",
    "send_unsolicited_na",
    "set_link_down",
    "set_link_up",
    "set_master",
    "set_sysctl",
    "validate_ifname",
    "validate_netns_name",
]

IPHandle = IPRoute
T = TypeVar("T")

NETNS_RUN_DIR = _pr_netns.NETNS_RUN_DIR  # "/var/run/netns" == "/run/netns"
CLONE_NEWNET = 0x40000000
IFF_UP = 0x1
IFF_PROMISC = 0x100
IFNAMSIZ = 16  # including the trailing NUL: names are at most 15 characters

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
IFA_F_NODAD = 0x02  # <linux/if_addr.h>

# <linux/sockios.h>: link-layer multicast list, what `ip maddr add/del` uses
SIOCGIFINDEX = 0x8933
SIOCADDMULTI = 0x8931
SIOCDELMULTI = 0x8932

_CAP_NET_ADMIN = "needs CAP_NET_ADMIN in that network namespace (run as root)"
_CAP_NET_RAW = "needs CAP_NET_RAW (run as root) to open an AF_PACKET socket"
_CAP_SYS_ADMIN = "needs CAP_SYS_ADMIN (run as root) to create, enter or delete network namespaces"


# --------------------------------------------------------------------------
# Pure helpers (no root, no kernel)
# --------------------------------------------------------------------------

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


def _where(netns: str | None) -> str:
    return "in the current namespace" if netns is None else f"in netns {netns!r}"


def _error(code: int | None, op: str, target: str, hint: str | None = None,
           detail: str | None = None) -> NetError:
    """Build the domain exception for an errno (see map_netlink_error)."""
    if code is None or code <= 0:
        text = detail or "unknown error"
        return NetError(f"{op} {target}: {text}")
    name = errno.errorcode.get(code, str(code))
    text = f"{op} {target}: {os.strerror(code)} ({name})"
    if code in (errno.ENOENT, errno.ENODEV, errno.ESRCH):
        return NotFound(text)
    if code in (errno.EPERM, errno.EACCES):
        return NetError(f"{text}; {hint or _CAP_NET_ADMIN}")
    return NetError(text)


def map_netlink_error(exc: NetlinkError, op: str, target: str,
                      hint: str | None = None) -> NetError:
    """Turn a pyroute2 NetlinkError into NotFound / NetError.

    ENOENT, ENODEV, ESRCH (rtnetlink's "no such route/rule") -> NotFound; EPERM, EACCES -> NetError with a
    capability hint; anything else (EEXIST included: callers that treat it as
    "unchanged" check for it before calling this) -> NetError naming the
    operation, the object and the errno text.
    """
    if isinstance(exc, NetlinkDumpInterrupted):
        return NetError(f"{op} {target}: netlink dump interrupted by a concurrent change; retry")
    return _error(getattr(exc, "code", None), op, target, hint,
                  detail=str(exc))


def map_os_error(exc: OSError, op: str, target: str, hint: str | None = None) -> NetError:
    """Same mapping as :func:`map_netlink_error` for an OSError."""
    return _error(exc.errno, op, target, hint, detail=str(exc) or type(exc).__name__)


@contextlib.contextmanager
def _translated(op: str, target: str, hint: str | None = None) -> Iterator[None]:
    try:
        yield
    except NetError:
        raise
    except NetlinkError as exc:
        raise map_netlink_error(exc, op, target, hint) from exc
    except OSError as exc:
        raise map_os_error(exc, op, target, hint) from exc


# --------------------------------------------------------------------------
# Entering a namespace
# --------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    """setns(fd, CLONE_NEWNET) for the calling thread only."""
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _netns_path(netns: str) -> str:
    return os.path.join(NETNS_RUN_DIR, validate_netns_name(netns))


def _open_netns(netns: str) -> int:
    path = _netns_path(netns)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"network namespace {netns!r} does not exist ({path})") from None
    except OSError as exc:
        raise map_os_error(exc, "open", f"network namespace {netns!r}", _CAP_SYS_ADMIN) from exc


def run_in_netns(netns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` inside ``netns`` and return its result.

    ``netns=None`` runs it directly in the calling thread. Otherwise a new,
    dedicated thread enters the namespace with setns(2) (which affects only
    that thread), runs ``fn`` and exits; the caller waits for it. Exceptions
    raised by ``fn`` are re-raised here unchanged. Sockets created by ``fn``
    stay in ``netns`` after it returns; files under /proc/sys and
    /proc/thread-self/net read by ``fn`` show ``netns``. Threads started by
    ``fn`` inherit ``netns``.
    """
    if netns is None:
        return fn(*args, **kwargs)
    fd = _open_netns(netns)
    outcome: dict[str, Any] = {}

    def _body() -> None:
        try:
            try:
                _setns(fd)
            except OSError as exc:
                raise map_os_error(exc, "enter", f"network namespace {netns!r}",
                                   _CAP_SYS_ADMIN) from exc
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    try:
        worker = threading.Thread(target=_body, name=f"netns:{netns}", daemon=True)
        worker.start()
        worker.join()
    finally:
        os.close(fd)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def netns_socket(netns: str | None, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket created inside ``netns`` (see :func:`run_in_netns`)."""
    with _translated("create socket", _where(netns)):
        return run_in_netns(netns, socket.socket, family, type, proto)


@contextlib.contextmanager
def ip_for(netns: str | None = None) -> Iterator[IPRoute]:
    """The one factory for pyroute2 handles: ``with ip_for("ns1") as ipr: ...``.

    Yields an ``IPRoute`` bound to ``netns`` (None = the calling thread's
    namespace) and always closes it when the block ends. Use the handle only
    in the thread that opened it. Raises NotFound if the namespace does not
    exist; RuntimeError if called from a thread running an asyncio loop.
    Errors raised by pyroute2 inside the block are the caller's to translate
    (with :func:`map_netlink_error`; this module's functions do it for you).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # good: no event loop in this thread
    else:
        raise RuntimeError("nlbfarm.node.iplib is synchronous: call it from a thread"
                           " without a running asyncio loop (e.g. asyncio.to_thread)")
    with _translated("open netlink socket", _where(netns)):
        sock = run_in_netns(netns, socket.socket, socket.AF_NETLINK,
                            socket.SOCK_DGRAM, NETLINK_ROUTE)
        # IPRoute takes ownership of the descriptor and closes it in close().
        ipr = IPRoute(fileno=sock.detach())
    try:
        yield ipr
    finally:
        ipr.close()


# --------------------------------------------------------------------------
# Namespaces
# --------------------------------------------------------------------------

def list_netns() -> list[str]:
    """Names of the namespaces under /run/netns, sorted."""
    return sorted(_pr_netns.listnetns())


def netns_exists(name: str) -> bool:
    return os.path.exists(_netns_path(name))


def ensure_netns(name: str) -> bool:
    """Create the named namespace (like ``ip netns add``). Returns changed.

    Uses pyroute2's ``netns.create``, which forks a short-lived child to
    unshare and bind-mount the namespace; only lab setup calls this.
    """
    path = _netns_path(name)
    if os.path.exists(path):
        return False
    try:
        with _translated("create", f"network namespace {name!r}", _CAP_SYS_ADMIN):
            try:
                _pr_netns.create(name)
            except OSError as exc:
                if exc.errno == errno.EEXIST and os.path.exists(path):
                    return False  # created concurrently
                raise
    except NetError:
        _remove_failed_mountpoint(path)
        raise
    except Exception as exc:  # pyroute2 re-raises child errors as other types
        _remove_failed_mountpoint(path)
        raise NetError(f"create network namespace {name!r}: {exc}") from exc
    return True


def _remove_failed_mountpoint(path: str) -> None:
    """pyroute2 creates the mountpoint file before it mounts; drop a leftover."""
    try:
        if os.stat(path).st_dev != os.stat("/proc/self/ns/net").st_dev:
            os.unlink(path)  # a plain file, not a bound namespace
    except OSError:
        pass


def delete_netns(name: str) -> bool:
    """Delete the named namespace (like ``ip netns del``). Returns changed.

    Links inside it disappear when the kernel tears the namespace down, which
    happens asynchronously after the last reference is gone.
    """
    path = _netns_path(name)
    if not os.path.exists(path):
        return False
    with _translated("delete", f"network namespace {name!r}", _CAP_SYS_ADMIN):
        try:
            _pr_netns.remove(name)
        except FileNotFoundError:
            return False  # deleted concurrently
    return True


# --------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------

def _find_link(ipr: IPRoute, name: str) -> Any | None:
    """The RTM_NEWLINK message for ``name``, or None if there is none."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise


def _get_link(ipr: IPRoute, name: str, netns: str | None, what: str = "link") -> Any:
    msg = _find_link(ipr, name)
    if msg is None:
        raise NotFound(f"{what} {name!r} does not exist {_where(netns)}")
    return msg


def _kind(msg: Any) -> str | None:
    return msg.get(("linkinfo", "kind"))


def link_exists(name: str, netns: str | None = None) -> bool:
    """True if the link exists. A missing namespace raises NotFound."""
    validate_ifname(name)
    with _translated("look up link", f"{name!r} {_where(netns)}"):
        with ip_for(netns) as ipr:
            return _find_link(ipr, name) is not None


def link_mac(name: str, netns: str | None = None) -> str:
    """The link's hardware address, e.g. ``"ba:eb:66:88:3a:c5"``."""
    validate_ifname(name)
    with _translated("read MAC of link", f"{name!r} {_where(netns)}"):
        with ip_for(netns) as ipr:
            mac = _get_link(ipr, name, netns).get("address")
    if not mac:
        raise NetError(f"link {name!r} {_where(netns)} has no hardware address")
    return mac.lower()


def _ensure_link(netns: str | None, name: str, kind: str, target: str,
                 verify: Callable[[Any], None], **spec: Any) -> bool:
    with _translated(f"create {kind}", target):
        with ip_for(netns) as ipr:
            existing = _find_link(ipr, name)
            if existing is None:
                try:
                    ipr.link("add", ifname=name, kind=kind, **spec)
                    return True
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
                    existing = _find_link(ipr, name)  # lost a race?
                    if existing is None:
                        raise
            verify(existing)
            return False


def ensure_bridge(name: str, netns: str | None = None) -> bool:
    """Create a Linux bridge (left down). Returns changed.

    NetError if a link of that name exists but is not a bridge.
    """
    validate_ifname(name)
    target = f"{name!r} {_where(netns)}"

    def verify(msg: Any) -> None:
        if _kind(msg) != "bridge":
            raise NetError(f"create bridge {target}: a link of that name exists"
                           f" with kind {_kind(msg) or 'unknown'!r}")

    return _ensure_link(netns, name, "bridge", target, verify)


def ensure_veth_pair(name: str, peer: str, netns: str | None = None,
                     peer_netns: str | None = None) -> bool:
    """Create veth ``name`` in ``netns`` with its peer ``peer`` in ``peer_netns``.

    ``None`` means the calling thread's namespace for either end (so
    ``peer_netns=None`` with ``netns="a"`` puts the peer in the host
    namespace). The peer is created directly in ``peer_netns`` in the same
    netlink request, so its name never has to be free in ``netns``. Both
    ends are left down. Returns changed; False if exactly this pair already
    exists. NetError if either name is taken by something else.
    """
    validate_ifname(name)
    validate_ifname(peer)
    target = f"{name!r} {_where(netns)} <-> {peer!r} {_where(peer_netns)}"
    same_ns = netns == peer_netns

    def verify(msg: Any) -> None:
        if _kind(msg) != "veth":
            raise NetError(f"create veth {target}: {name!r} exists with kind"
                           f" {_kind(msg) or 'unknown'!r}")
        with ip_for(peer_netns) as pipr:
            pmsg = _find_link(pipr, peer)
        if (pmsg is None or _kind(pmsg) != "veth"
                or pmsg.get("link") != msg["index"] or msg.get("link") != pmsg["index"]):
            raise NetError(f"create veth {target}: {name!r} exists but its peer"
                           f" is not {peer!r} {_where(peer_netns)}")

    if same_ns:
        return _ensure_link(netns, name, "veth", target, verify, peer=peer)

    if peer_netns is None:
        # the caller's own namespace, as seen from the calling thread
        try:
            peer_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise map_os_error(exc, "create veth", target) from exc
    else:
        peer_fd = _open_netns(peer_netns)
    try:
        return _ensure_link(netns, name, "veth", target, verify,
                            peer={"ifname": peer, "net_ns_fd": peer_fd})
    finally:
        os.close(peer_fd)


def delete_link(name: str, netns: str | None = None) -> bool:
    """Delete a link (a veth takes its peer with it). Returns changed."""
    validate_ifname(name)
    with _translated("delete link", f"{name!r} {_where(netns)}"):
        with ip_for(netns) as ipr:
            msg = _find_link(ipr, name)
            if msg is None:
                return False
            try:
                ipr.link("del", index=msg["index"])
            except NetlinkError as exc:
                if exc.code in (errno.ENODEV, errno.ENOENT):
                    return False
                raise
    return True


def _set_state(name: str, netns: str | None, up: bool) -> bool:
    validate_ifname(name)
    state = "up" if up else "down"
    with _translated(f"set link {state}", f"{name!r} {_where(netns)}"):
        with ip_for(netns) as ipr:
            msg = _get_link(ipr, name, netns)
            if bool(msg["flags"] & IFF_UP) == up:
                return False
            ipr.link("set", index=msg["index"], state=state)
    return True


def set_link_up(name: str, netns: str | None = None) -> bool:
    """Administratively enable the link (``ip link set NAME up``). Returns changed."""
    return _set_state(name, netns, True)


def set_link_down(name: str, netns: str | None = None) -> bool:
    """Administratively disable the link. Returns changed."""
    return _set_state(name, netns, False)


def set_promisc(name: str, on: bool, netns: str | None = None) -> bool:
    """``ip link set NAME promisc on|off``. Returns changed."""
    validate_ifname(name)
    with _translated(f"set promisc {'on' if on else 'off'}", f"{name!r} {_where(netns)}"):
        with ip_for(netns) as ipr:
            msg = _get_link(ipr, name, netns)
            if bool(msg["flags"] & IFF_PROMISC) == on:
                return False
            ipr.link("set", index=msg["index"], flags=IFF_PROMISC if on else 0, change=IFF_PROMISC)
    return True


def set_master(name: str, bridge: str | None, netns: str | None = None) -> bool:
    """Enslave ``name`` to ``bridge`` (``ip link set NAME master BRIDGE``).

    ``bridge=None`` releases it (``nomaster``). Returns changed. NotFound if
    either link is missing.
    """
    validate_ifname(name)
    if bridge is not None:
        validate_ifname(bridge)
    with _translated("set master of", f"{name!r} to {bridge!r} {_where(netns)}"):
        with ip_for(netns) as ipr:
            msg = _get_link(ipr, name, netns)
            want = 0 if bridge is None else _get_link(ipr, bridge, netns, "bridge")["index"]
            if (msg.get("master") or 0) == want:
                return False
            ipr.link("set", index=msg["index"], master=want)
    return True


# --------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Link-layer multicast addresses (ip maddr)
# --------------------------------------------------------------------------
# rtnetlink has no message for a link's multicast list and pyroute2 offers
# none, so this does exactly what `ip maddr add/del` does: the SIOCADDMULTI /
# SIOCDELMULTI ioctls on a socket created inside the namespace. The list is
# read back from /proc/thread-self/net/dev_mcast (what `ip maddr show`
# parses); its "global_use" column marks the entries added this way, which
# `ip maddr show` prints as "static". The kernel keeps a single reference for
# such entries, so a second add is harmless and a delete removes it.

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


# --------------------------------------------------------------------------
# sysctl
# --------------------------------------------------------------------------
# Implemented by opening /proc/sys/net/... from a thread that has entered the
# namespace (run_in_netns): the kernel resolves /proc/sys/net against the
# opening thread's namespace, which is also how `ip netns exec NS sysctl`
# works, without a subprocess. Only net.* keys are accepted: every other
# sysctl is global, and writing it "inside a namespace" would change the host.

_SYSCTL_PART_RE = re.compile(r"^[A-Za-z0-9_.:@-]+$")


def _sysctl_path(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sysctl key must be a non-empty string, got {key!r}")
    # "net.ipv4.conf.eth0.arp_announce" or, for names containing dots,
    # "net/ipv4/conf/eth0.100/arp_announce" (the same convention as sysctl(8))
    parts = key.split("/") if "/" in key else key.split(".")
    if parts[0] != "net":
        raise ValueError(f"sysctl key {key!r} is not under net.: only per-namespace"
                         " net.* keys can be set for a namespace")
    for part in parts:
        if part in ("", ".", "..") or not _SYSCTL_PART_RE.match(part):
            raise ValueError(f"sysctl key {key!r} has an invalid component {part!r}")
    return "/proc/sys/" + "/".join(parts)


def get_sysctl(netns: str | None, key: str) -> str:
    """Read a net.* sysctl inside ``netns`` (value stripped of whitespace)."""
    path = _sysctl_path(key)

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    with _translated("read sysctl", f"{key} {_where(netns)}"):
        return run_in_netns(netns, read)


def set_sysctl(netns: str | None, key: str, value: int | str | bool) -> bool:
    """Set a net.* sysctl inside ``netns``, e.g.
    ``set_sysctl("n1", "net.ipv4.conf.all.arp_announce", 2)``. Returns changed.
    NotFound if the key does not exist (e.g. the link in the key is missing)."""
    path = _sysctl_path(key)
    text = str(int(value)) if isinstance(value, bool) else str(value).strip()

    def write() -> bool:
        with open(path) as f:
            if f.read().split() == text.split():
                return False
        with open(path, "w") as f:
            f.write(text + "\n")
        return True

    with _translated("set sysctl", f"{key}={text} {_where(netns)}"):
        return run_in_netns(netns, write)


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
