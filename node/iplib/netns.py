"""Network namespaces: entering one, and listing, creating and deleting them.

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
block ends. Opening one costs about 3 ms. Do not call iplib from a thread
that runs an asyncio event loop (pyroute2's sync API would try to run its
own loop there); use ``asyncio.to_thread``.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import socket
import threading
from typing import Any, Callable, Iterator, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns
from pyroute2.netlink import NETLINK_ROUTE

from nlbfarm.errors import NetError, NotFound

from .errors import _CAP_SYS_ADMIN, _translated, _where, map_os_error
from .names import validate_netns_name

IPHandle = IPRoute
T = TypeVar("T")

NETNS_RUN_DIR = _pr_netns.NETNS_RUN_DIR  # "/var/run/netns" == "/run/netns"
CLONE_NEWNET = 0x40000000


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
