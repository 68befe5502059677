"""Per-namespace net.* sysctls.

Implemented by opening /proc/sys/net/... from a thread that has entered the
namespace (run_in_netns): the kernel resolves /proc/sys/net against the
opening thread's namespace, which is also how `ip netns exec NS sysctl`
works, without a subprocess. Only net.* keys are accepted: every other
sysctl is global, and writing it "inside a namespace" would change the host.
"""
from __future__ import annotations

import re

from .errors import _translated, _where
from .netns import run_in_netns

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
