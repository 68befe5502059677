"""Netlink layer for nlbfarm, in the style of OpenStack Neutron's ip_lib.

Every network namespace, link, address, link-layer multicast address,
sysctl, gratuitous ARP and unsolicited neighbour advertisement that nlbfarm
touches goes through this package. It is written against pyroute2 0.9.x.
Callers use this facade (``from nlbfarm.node import iplib``;
``iplib.add_address(...)``); the submodules are its implementation:

* pure, no root and no kernel: :mod:`.names` (validation and normalisation
  of names, CIDRs and MACs), :mod:`.frames` (GARP and unsolicited NA frame
  builders), :mod:`.errors` (errno -> NotFound / NetError);
* kernel-touching: :mod:`.netns` (entering, listing, creating and deleting
  namespaces; the ``ip_for`` handle factory), :mod:`.links` (ip link),
  :mod:`.addr` (ip addr), :mod:`.maddr` (ip maddr), :mod:`.sysctl`
  (net.* sysctls) and :mod:`.announce` (sending GARP / unsolicited NA).

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

Namespaces and threads
----------------------
A namespace is entered by running the work in a fresh, dedicated thread that
calls ``setns(2)`` and exits (:func:`run_in_netns`); nothing is forked except
in :func:`ensure_netns`. A handle from :func:`ip_for` belongs to the thread
and the ``with`` block that opened it. Do not call iplib from a thread that
runs an asyncio event loop; use ``asyncio.to_thread``. The docstring of
:mod:`.netns` explains why (read it before changing any of this).
"""
from __future__ import annotations

from nlbfarm.errors import NetError, NotFound

from .addr import add_address, addresses, delete_address
from .announce import send_gratuitous_arp, send_unsolicited_na
from .errors import map_netlink_error, map_os_error
from .frames import build_garp_frame, build_unsolicited_na_frame
from .links import (
    delete_link,
    ensure_bridge,
    ensure_veth_pair,
    link_exists,
    link_mac,
    set_link_down,
    set_link_up,
    set_master,
    set_promisc,
)
from .maddr import add_multicast_mac, delete_multicast_mac, multicast_macs
from .names import normalize_cidr, normalize_mac, parse_cidr, validate_ifname, validate_netns_name
from .netns import (
    IPHandle,
    delete_netns,
    ensure_netns,
    ip_for,
    list_netns,
    netns_exists,
    netns_socket,
    run_in_netns,
)
from .sysctl import get_sysctl, set_sysctl

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
    "set_promisc",
    "set_sysctl",
    "validate_ifname",
    "validate_netns_name",
]
