"""How etcd failures are classified and retried: the one retry policy of the store.

Pure: no connection, no I/O. :func:`is_connection_error` says which failures
are worth another attempt (possibly on another endpoint), :func:`retrying` is
the policy with its deadline, and the ``describe`` family turns python-etcd3's
wrapped gRPC errors into one line that names the real cause.
"""
from __future__ import annotations

from typing import Callable

import grpc
import tenacity

from nlbfarm.coordinator.etcd._lib import etcd3_exc
from nlbfarm.coordinator.etcd.keepalive import KeepAliveStreamEnded, KeepAliveTimeout

_RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # endpoint down, no leader, leader changed
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,  # channel closed by an endpoint rotation
    }
)

BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 1.0


class StaleClient(Exception):
    """An attempt failed on a client that another thread had already replaced."""


class TokenRejected(Exception):
    """etcd no longer accepts our auth token (expired, etcd restarted, auth store changed):
    authenticate again and retry."""


# What etcd says when a token it issued is no longer good, or when a request
# came without one although authentication is on.
TOKEN_ERRORS = ("invalid auth token", "revision of auth store is old", "user name is empty")


def grpc_error(exc: BaseException):
    """The gRPC error behind ``exc`` (python-etcd3 wraps some codes in its own exceptions)."""
    if isinstance(exc, (StaleClient, TokenRejected)) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, grpc.RpcError):
        return exc
    inner = exc.__context__
    return inner if isinstance(inner, grpc.RpcError) else None


def error_text(exc: BaseException) -> str:
    """gRPC's status details, else the exception's message."""
    inner = grpc_error(exc)
    if inner is not None:
        try:
            return inner.details() or ""
        except Exception:
            return ""
    return str(exc)


def is_connection_error(exc: BaseException) -> bool:
    """True for failures worth retrying on (possibly) another endpoint."""
    if isinstance(
        exc,
        (
            etcd3_exc.ConnectionFailedError,
            etcd3_exc.ConnectionTimeoutError,
            etcd3_exc.WatchTimedOut,
            StaleClient,
            TokenRejected,
            KeepAliveTimeout,       # no answer in time: maybe another endpoint answers
            KeepAliveStreamEnded,
        ),
    ):
        return True
    return isinstance(exc, grpc.RpcError) and rpc_code(exc) in _RETRY_CODES


def retrying(deadline_s: float, retry_on: Callable[[BaseException], bool] = is_connection_error):
    """The one retry policy for unary store calls.

    Retries while ``retry_on(exc)``, with jittered exponential backoff from
    ``BACKOFF_INITIAL_S`` capped at ``BACKOFF_MAX_S``, and gives up before a
    sleep would cross ``deadline_s``; the last exception is then re-raised.
    Usage: ``retrying(10.0)(fn, *args)``.
    """
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(retry_on),
        stop=tenacity.stop_before_delay(deadline_s),
        wait=tenacity.wait_exponential_jitter(
            multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S, jitter=BACKOFF_INITIAL_S
        ),
        reraise=True,
    )


def rpc_code(exc: BaseException):
    try:
        return exc.code()  # type: ignore[attr-defined]
    except Exception:
        return None


def describe(exc: BaseException) -> str:
    """One line naming the real cause (etcd3 hides gRPC details in __context__)."""
    if isinstance(exc, (StaleClient, TokenRejected)) and exc.__cause__ is not None:
        exc = exc.__cause__
    inner = exc if isinstance(exc, grpc.RpcError) else exc.__context__
    if isinstance(inner, grpc.RpcError):
        try:
            detail = f"{inner.code().name}: {inner.details()}"
        except Exception:
            detail = None
        if detail:
            return detail if inner is exc else f"{type(exc).__name__}: {detail}"
    return f"{type(exc).__name__}: {exc}"


def is_lease_not_found(exc: BaseException) -> bool:
    if not isinstance(exc, grpc.RpcError) or rpc_code(exc) != grpc.StatusCode.NOT_FOUND:
        return False
    try:
        return "lease not found" in (exc.details() or "")
    except Exception:
        return False
