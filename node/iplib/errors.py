"""Error mapping: errno -> :class:`NotFound` / :class:`NetError`.

NetError and NotFound are defined in :mod:`nlbfarm.errors`; they are
imported here (and re-exported by the package) only for convenience. A missing
namespace, link or sysctl (ENOENT, ENODEV, ESRCH) becomes NotFound; EPERM and
EACCES get a capability hint; everything else becomes a NetError whose
message names the operation, the object, the namespace and the errno.
:func:`_translated` wraps each kernel-touching call so that a raw pyroute2
``NetlinkError`` or ``OSError`` never escapes.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from nlbfarm.errors import NetError, NotFound

_CAP_NET_ADMIN = "needs CAP_NET_ADMIN in that network namespace (run as root)"
_CAP_NET_RAW = "needs CAP_NET_RAW (run as root) to open an AF_PACKET socket"
_CAP_SYS_ADMIN = "needs CAP_SYS_ADMIN (run as root) to create, enter or delete network namespaces"


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
