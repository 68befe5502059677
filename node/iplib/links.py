"""Links: bridges, veth pairs, state, promiscuity and bridge ports (ip link)."""
from __future__ import annotations

import errno
import os
from typing import Any, Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nlbfarm.errors import NetError, NotFound

from .errors import _translated, _where, map_os_error
from .names import validate_ifname
from .netns import _open_netns, ip_for

IFF_UP = 0x1
IFF_PROMISC = 0x100


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
