"""The coordination store: a small key/value + lease + watch interface over etcd.

Every piece of shared state in nlbfarm (node leases, the bucket table) goes
through :class:`Store`. The interface is deliberately small, in the spirit of
Patroni's DCS abstraction: the rest of the code depends on the contract below,
not on etcd or on python-etcd3.

Contract (every implementation must honour it)
==============================================

Data model
    Keys are ``str`` (UTF-8 in etcd), values are ``bytes``; encoding values
    (JSON, ...) is the caller's job. Every change gets a store-wide,
    strictly increasing *revision*; :class:`KV.mod_revision` is the revision of
    the last change to that key. Reads are linearizable (never stale).

    Keys that are not UTF-8 are skipped with a warning (one per distinct key;
    any other etcd client can write one): ``get``, ``get_prefix`` and resync
    snapshots omit them, watches do not deliver their changes but still
    advance past them. Everything else under the prefix is unaffected.

Leases
    :meth:`Store.grant_lease` returns a :class:`Lease` whose ``ttl`` is the TTL
    the server actually granted, which may be *longer* than requested (etcd 3.4
    enforces a minimum of ceil(1.5 x election timeout), 2 s with defaults).
    Keys written with ``lease_id`` are deleted by the server when the lease
    expires or is revoked. Writing with a lease that no longer exists raises
    :class:`LeaseExpired`; so does :meth:`Store.refresh_lease`. Revoking is
    idempotent.

Writes
    ``create`` writes only if the key does not exist (one atomic transaction);
    it never modifies an existing key. ``compare_and_swap`` writes only if the
    key's ``mod_revision`` still equals the expected one (0 = must not exist).
    Both return ``False`` -- not an exception -- when the condition does not
    hold. ``put`` overwrites unconditionally and returns the new revision.

Errors
    Connection-level failures (endpoint down, timeout, leader election) are
    retried with capped exponential backoff, rotating through the endpoints,
    until ``retry_deadline`` has passed; then the call raises
    :class:`~nlbfarm.errors.StoreUnavailable`, whose message names every
    endpoint and the last error. A call therefore returns or raises within
    about ``retry_deadline + timeout`` seconds. Any other failure raises
    :class:`~nlbfarm.errors.StoreError` (or :class:`LeaseExpired`) at once.
    Nothing outside the :mod:`nlbfarm.errors` tree escapes.

    Retries make ``grant_lease``, ``put`` and ``delete`` at-least-once (a
    retried grant may leave an orphan lease that simply expires; a retried
    delete whose first attempt was applied reports ``False``). ``create`` and
    ``compare_and_swap`` stay exactly-once; when a retry finds the key already
    holding exactly the value and lease this call wrote (our first attempt was
    applied but its reply was lost), they report ``True``.

Watches
    :meth:`Store.watch_prefix` delivers changes under a prefix to a callback,
    from a dedicated thread, one call at a time:

    * Events arrive in revision order. After the first delivery, every change
      with a higher revision is delivered at least once, across any number of
      connection losses, etcd restarts and endpoint switches: the watch
      resumes from the last delivered revision + 1. It never gives up; it
      stops only when its handle is cancelled or the store is closed.
    * If the history needed to resume has been compacted (or
      ``start_revision`` is older than the compaction point), the watch
      re-lists the prefix and delivers one ``"resync"`` event whose
      ``snapshot`` is the complete current content and whose ``mod_revision``
      is the revision of that read; the consumer must replace its cache with
      it. Events then continue from that revision + 1.
    * The same happens, with a warning, when etcd's revision is lower than
      the last delivered one (etcd restored from an older snapshot, or a new
      empty etcd at the same endpoints; also a ``start_revision`` beyond
      etcd's current revision): resuming there would wait for revisions this
      etcd may never reach.
    * With ``start_revision=None`` (or 0) the first delivery is a
      ``"resync"`` with the current content (a list-then-watch without a
      gap); with a ``start_revision`` the first deliveries are the changes
      from that revision on (pass ``get_prefix()[1] + 1`` to continue after
      a read).
    * A callback that raises is logged and skipped; the event is not
      redelivered. A slow callback delays later events, it does not lose them.

Thread safety
    A store may be used from any number of threads at once.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import nlbfarm  # noqa: F401  -- must precede etcd3: selects the protobuf implementation

import grpc
import tenacity

with warnings.catch_warnings():
    # etcd3 0.12's generated protobuf modules use descriptor APIs that
    # protobuf >= 4 deprecates: hundreds of warnings, once, at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import etcd3
    import etcd3.exceptions as etcd3_exc
    from etcd3 import etcdrpc
    from etcd3.etcdrpc import kv_pb2

from nlbfarm import tls as _tls
from nlbfarm.errors import ConfigError, StoreError, StoreUnavailable

__all__ = [
    "KV",
    "Lease",
    "LeaseExpired",
    "StoreAuthError",
    "WatchEvent",
    "WatchHandle",
    "Store",
    "EtcdStore",
    "retrying",
    "is_connection_error",
]

log = logging.getLogger(__name__)


class LeaseExpired(StoreError):
    """The lease no longer exists (expired or revoked); keys bound to it are gone."""


class StoreAuthError(StoreError):
    """etcd refused our credentials (user name or password). Not retried: retrying cannot fix it."""


@dataclass(frozen=True)
class KV:
    """One key as read from the store. ``lease`` is 0 when not lease-bound."""

    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Lease:
    """A granted lease. ``ttl`` is what the server granted (may exceed the request)."""

    id: int
    ttl: int


WatchKind = Literal["put", "delete", "resync"]


@dataclass(frozen=True)
class WatchEvent:
    """One change delivered by :meth:`Store.watch_prefix`.

    ``put``:    ``key``/``value``/``lease`` are the new content.
    ``delete``: ``value`` is ``b""``; ``mod_revision`` is the deletion revision.
    ``resync``: ``key`` is the watched prefix; ``snapshot`` holds the complete
                current content under it and ``mod_revision`` the revision it
                was read at. Replace the cache with it.
    """

    kind: WatchKind
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0
    snapshot: Mapping[str, KV] | None = field(default=None, compare=False)
    # On a resync: etcd's revision went backwards (a restore, a new etcd), so
    # this read is newer than anything held, though its revision is lower.
    rewound: bool = False


class WatchHandle(abc.ABC):
    """Returned by :meth:`Store.watch_prefix`."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop the watch. Idempotent. No callback starts after this returns,
        except when called from inside the callback itself."""


class Store(abc.ABC):
    """Coordination store contract; see the module docstring for the guarantees."""

    @abc.abstractmethod
    def grant_lease(self, ttl: int) -> Lease:
        """Grant a lease of at least ``ttl`` seconds; returns the granted lease."""

    @abc.abstractmethod
    def refresh_lease(self, lease_id: int, deadline: float | None = None) -> int:
        """Renew the lease to its full TTL; returns that TTL in seconds.

        ``deadline`` overrides the store's retry deadline for this call (a
        keepalive wants to fail fast and try again on its next tick).
        Raises :class:`LeaseExpired` if the lease no longer exists."""

    @abc.abstractmethod
    def revoke_lease(self, lease_id: int, deadline: float | None = None) -> None:
        """Revoke the lease, deleting its keys. Idempotent (no error if gone)."""

    @abc.abstractmethod
    def create(self, key: str, value: bytes, lease_id: int | None = None,
               deadline: float | None = None) -> bool:
        """Write ``key`` only if it does not exist. ``False`` if it exists
        (its value and lease are left untouched)."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes, lease_id: int | None = None, deadline: float | None = None) -> int:
        """Write ``key`` unconditionally; returns the new revision.

        ``deadline`` (on every write) overrides the retry deadline for this
        call: the agent's loop must not sit in retries longer than its lease."""

    @abc.abstractmethod
    def get(self, key: str) -> KV | None:
        """The key's current content, or ``None`` if it does not exist."""

    @abc.abstractmethod
    def get_prefix(self, prefix: str) -> tuple[dict[str, KV], int]:
        """All keys under ``prefix`` and the store revision they were read at."""

    @abc.abstractmethod
    def compare_and_swap(
        self, key: str, value: bytes, expected_mod_revision: int, lease_id: int | None = None,
        deadline: float | None = None,
    ) -> bool:
        """Write ``key`` only if its mod_revision equals ``expected_mod_revision``
        (0: only if it does not exist). ``False`` if it did not match."""

    @abc.abstractmethod
    def delete(self, key: str, deadline: float | None = None) -> bool:
        """Delete ``key``; ``True`` if it existed."""

    @abc.abstractmethod
    def watch_prefix(
        self,
        prefix: str,
        on_event: Callable[[WatchEvent], None],
        start_revision: int | None = None,
    ) -> WatchHandle:
        """Deliver every change under ``prefix`` to ``on_event`` (see module doc)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Cancel all watches and release connections. Idempotent."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# Retry policy
# --------------------------------------------------------------------------

_RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # endpoint down, no leader, leader changed
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,  # channel closed by an endpoint rotation
    }
)

BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 1.0

# gRPC channel options: detect half-open connections (keepalive within etcd's
# default 5 s minimum ping interval) and never sit in a long reconnect backoff.
_GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.use_local_subchannel_pool", 1),
]


class _StaleClient(Exception):
    """An attempt failed on a client that another thread had already replaced."""


class _TokenRejected(Exception):
    """etcd no longer accepts our auth token (expired, etcd restarted, auth store changed):
    authenticate again and retry."""


# What etcd says when a token it issued is no longer good, or when a request
# came without one although authentication is on.
_TOKEN_ERRORS = ("invalid auth token", "revision of auth store is old", "user name is empty")


def _grpc_error(exc: BaseException):
    """The gRPC error behind ``exc`` (python-etcd3 wraps some codes in its own exceptions)."""
    if isinstance(exc, (_StaleClient, _TokenRejected)) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, grpc.RpcError):
        return exc
    inner = exc.__context__
    return inner if isinstance(inner, grpc.RpcError) else None


def _error_text(exc: BaseException) -> str:
    """gRPC's status details, else the exception's message."""
    inner = _grpc_error(exc)
    if inner is not None:
        try:
            return inner.details() or ""
        except Exception:
            return ""
    return str(exc)


class _Secret:
    """Holds a secret; its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "_Secret('**********')"

    __str__ = __repr__


def is_connection_error(exc: BaseException) -> bool:
    """True for failures worth retrying on (possibly) another endpoint."""
    if isinstance(
        exc,
        (
            etcd3_exc.ConnectionFailedError,
            etcd3_exc.ConnectionTimeoutError,
            etcd3_exc.WatchTimedOut,
            _StaleClient,
            _TokenRejected,
        ),
    ):
        return True
    return isinstance(exc, grpc.RpcError) and _rpc_code(exc) in _RETRY_CODES


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


def _rpc_code(exc: BaseException):
    try:
        return exc.code()  # type: ignore[attr-defined]
    except Exception:
        return None


def _describe(exc: BaseException) -> str:
    """One line naming the real cause (etcd3 hides gRPC details in __context__)."""
    if isinstance(exc, (_StaleClient, _TokenRejected)) and exc.__cause__ is not None:
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


def _is_lease_not_found(exc: BaseException) -> bool:
    if not isinstance(exc, grpc.RpcError) or _rpc_code(exc) != grpc.StatusCode.NOT_FOUND:
        return False
    try:
        return "lease not found" in (exc.details() or "")
    except Exception:
        return False


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    ep = endpoint.strip()
    for scheme in ("http://", "https://"):
        if ep.startswith(scheme):
            ep = ep[len(scheme):]
    ep = ep.rstrip("/")
    host, sep, port = ep.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"invalid etcd endpoint {endpoint!r}: expected host:port")
    return host, int(port)


def _prefix_range_end(prefix: str) -> bytes:
    """The exclusive end of the key range under ``prefix`` (etcd's convention)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # every key from prefix on
    raw[-1] += 1
    return bytes(raw)


def _kv(pb_kv, key: str) -> KV:
    """``pb_kv`` as a :class:`KV`; ``key`` is its key, already decoded (see _KeyDecoder)."""
    return KV(key=key, value=bytes(pb_kv.value), mod_revision=pb_kv.mod_revision, lease=pb_kv.lease)


# How many distinct non-UTF-8 keys a store remembers having warned about. The
# keys are outside input: without a bound, a client writing fresh ones would
# grow our memory for ever.
MAX_SKIPPED_KEYS_REMEMBERED = 1000
# A key may be up to etcd's request size (1.5 MiB): log only its start.
_KEY_LOG_BYTES = 200


def _key_repr(raw: bytes) -> str:
    if len(raw) <= _KEY_LOG_BYTES:
        return repr(raw)
    return f"{raw[:_KEY_LOG_BYTES]!r}... ({len(raw)} bytes)"


class _KeyDecoder:
    """etcd key bytes -> ``str``, or ``None`` for a key that is not UTF-8 (skip it).

    etcd keys are bytes and any client with write access can put one that is
    not UTF-8. Raising would stop every read that lists it and freeze a watch
    for good (it would reconnect at that event again and again), so such a key
    is skipped instead. Each distinct key is warned about once; the keys warned
    about are remembered as small digests, at most ``limit`` of them. Past
    that, one more warning says so and further keys are skipped with a debug
    line only: a warning per read would flood the log just the same.
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._warned: set[bytes] = set()
        self._full = False
        self._lock = threading.Lock()

    def __call__(self, raw: bytes) -> str | None:
        try:
            return raw.decode()  # strict: no surrogates, no overlong forms
        except UnicodeDecodeError:
            self._skipped(bytes(raw))
            return None

    def _skipped(self, raw: bytes) -> None:
        digest = hashlib.blake2b(raw, digest_size=16).digest()  # a 1 MiB key costs 16 bytes
        with self._lock:
            if digest in self._warned:
                return
            if len(self._warned) < self._limit:
                self._warned.add(digest)
                outcome = "warn"
            elif not self._full:
                self._full = True
                outcome = "limit reached"
            else:
                outcome = "quiet"
        if outcome == "warn":
            log.warning("etcd key is not UTF-8, skipped key=%s", _key_repr(raw))
        elif outcome == "limit reached":
            log.warning("more than %d distinct etcd keys are not UTF-8; skipping further ones "
                        "without a warning each key=%s", self._limit, _key_repr(raw))
        else:
            log.debug("etcd key is not UTF-8, skipped key=%s", _key_repr(raw))


# --------------------------------------------------------------------------
# etcd implementation
# --------------------------------------------------------------------------


class EtcdStore(Store):
    """:class:`Store` on etcd v3 through python-etcd3 0.12.

    ``endpoints`` are ``"host:port"`` strings of one etcd cluster, tried in
    order: a connection failure moves every user of the store (unary calls and
    watches) to the next one, wrapping around. ``timeout`` bounds each RPC
    attempt; ``retry_deadline`` bounds the retries of one call.

    TLS: ``ca_file`` verifies etcd's certificate (TLS is on when it is given);
    ``cert_file`` + ``key_file`` are the client certificate for an etcd with
    ``--client-cert-auth``. The files are read on every (re)connection, so
    renewed certificates are picked up at the next endpoint switch.

    Authentication: with ``username``, every connection first authenticates
    (``password``, or ``password_file`` read at each authentication) and
    sends the token etcd returns on every call, lease keepalive and watch
    stream. When etcd stops accepting a token (it expired, etcd restarted,
    the auth store changed), the store authenticates again and retries.
    Wrong credentials raise :class:`StoreAuthError` at once. Neither the
    password nor the token is ever logged or put in an error message.
    """

    def __init__(self, endpoints: list[str], timeout: float = 2.0, retry_deadline: float = 10.0, *,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 username: str | None = None, password: str | None = None,
                 password_file: str | None = None):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ConfigError("no etcd endpoints given")
        if (cert_file is None) != (key_file is None):
            raise ConfigError("etcd.cert_file and etcd.key_file go together: give both or neither")
        if cert_file is not None and ca_file is None:
            raise ConfigError("etcd.cert_file needs etcd.ca_file")
        if username is not None and password is None and password_file is None:
            raise ConfigError("etcd.username needs etcd.password_file")
        if username is None and (password is not None or password_file is not None):
            raise ConfigError("etcd.password_file needs etcd.username")
        self._endpoints = [_parse_endpoint(ep) for ep in endpoints]
        self.endpoints = [f"{h}:{p}" for h, p in self._endpoints]
        self.timeout = timeout
        self.retry_deadline = retry_deadline
        self._tls_files = {"ca_cert": ca_file, "cert_cert": cert_file, "cert_key": key_file}
        self.username = username
        self._password = _Secret(password) if password is not None else None
        self._password_file = password_file
        self._auth_lock = threading.Lock()
        self._auth_off_warned = False
        if username is not None and ca_file is None:
            log.warning("etcd authentication without TLS: the password and token cross the network "
                        "in clear user=%s endpoints=%s; set etcd.ca_file", username, ",".join(self.endpoints))
        self._lock = threading.Lock()
        self._closed = False
        self._index = 0
        self._client = self._connect(0)
        self._watches: set[_PrefixWatch] = set()
        self._decode_key = _KeyDecoder(MAX_SKIPPED_KEYS_REMEMBERED)

    @classmethod
    def from_config(cls, etcd) -> "EtcdStore":
        """A store for a config's ``etcd`` section (endpoints, timing, TLS, credentials)."""
        return cls(list(etcd.endpoints), timeout=etcd.timeout, retry_deadline=etcd.retry_deadline,
                   ca_file=etcd.ca_file, cert_file=etcd.cert_file, key_file=etcd.key_file,
                   username=etcd.username, password_file=etcd.password_file)

    @property
    def tls(self) -> bool:
        return self._tls_files["ca_cert"] is not None

    # -- connection management ----------------------------------------------

    def _connect(self, index: int):
        host, port = self._endpoints[index]
        try:
            client = etcd3.client(host, port, timeout=self.timeout, grpc_options=_GRPC_OPTIONS, **self._tls_files)
        except OSError as exc:  # python-etcd3 reads the TLS files here
            raise ConfigError(f"etcd TLS: cannot read {exc.filename}: {exc.strerror} "
                              "(etcd.ca_file, etcd.cert_file, etcd.key_file)") from None
        # Not authenticated yet: _authenticate() sets the token on first use.
        client.nlbfarm_authenticated = self.username is None
        return client

    # -- authentication ------------------------------------------------------

    def _password_value(self) -> str:
        if self._password is not None:
            return self._password.get()
        try:
            with open(self._password_file) as f:
                password = f.read().rstrip("\r\n")
        except OSError as exc:
            raise StoreAuthError(f"etcd.password_file: cannot read {self._password_file}: {exc.strerror}") from None
        if not password:
            raise StoreAuthError(f"etcd.password_file: {self._password_file} is empty")
        return password

    def _authenticate(self, client, endpoint: str) -> None:
        """Get a token for ``client`` unless it has one. Connection failures propagate (and are
        retried by the caller); wrong credentials raise StoreAuthError."""
        if client.nlbfarm_authenticated:
            return
        with self._auth_lock:
            if client.nlbfarm_authenticated:
                return
            request = etcdrpc.AuthenticateRequest(name=self.username, password=self._password_value())
            try:
                resp = etcdrpc.AuthStub(client.channel).Authenticate(request, self.timeout)
            except grpc.RpcError as exc:
                code, details = _rpc_code(exc), _error_text(exc)
                if code == grpc.StatusCode.FAILED_PRECONDITION and "authentication is not enabled" in details:
                    if not self._auth_off_warned:
                        self._auth_off_warned = True
                        log.warning("etcd authentication is not enabled on the server; working without a "
                                    "token user=%s endpoint=%s", self.username, endpoint)
                    client.metadata = None
                    client.nlbfarm_authenticated = True
                    return
                if code == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in details:
                    raise StoreAuthError(
                        f"etcd at {endpoint} refused user {self.username!r}: wrong user name or password "
                        "(etcd.username, etcd.password_file)") from None
                raise
            finally:
                del request
            client.metadata = (("token", resp.token),)
            client.nlbfarm_authenticated = True
            log.debug("etcd authenticated user=%s endpoint=%s", self.username, endpoint)

    def _token_rejected(self, client, used_metadata, exc: BaseException) -> bool:
        """If etcd refused the token ``used_metadata`` carried, drop it so the next use of
        ``client`` authenticates again. True if that was the failure."""
        if self.username is None:
            return False
        text = _error_text(exc)
        # Without a token (auth was off when we connected), "permission denied"
        # may mean that auth has been enabled since: try to authenticate.
        if not any(t in text for t in _TOKEN_ERRORS) and not (
                used_metadata is None and "permission denied" in text):
            return False
        with self._auth_lock:
            if client.metadata is used_metadata:  # nobody has re-authenticated since
                client.nlbfarm_authenticated = False
        log.debug("etcd token rejected user=%s reason=%s", self.username, text)
        return True

    def _why(self, exc: BaseException) -> str:
        """``_describe(exc)`` plus what to change when the cause is TLS or authentication."""
        text = _describe(exc)
        hint = self._hint(exc)
        return f"{text} ({hint})" if hint else text

    def _hint(self, exc: BaseException) -> str | None:
        details = _error_text(exc)
        has_cert = self._tls_files["cert_cert"] is not None
        problem = _tls.classify(details, self.tls, has_cert)
        if problem is None and not self.tls and "Socket closed" in details:
            return "etcd closed the connection at once: if it serves TLS (https), set etcd.ca_file"
        hints = {
            _tls.NOT_TLS: "etcd does not speak TLS on this endpoint: remove etcd.ca_file or use its TLS port",
            _tls.UNTRUSTED: "etcd's certificate is not signed by the CA in etcd.ca_file, or it has expired",
            _tls.NAME_MISMATCH: "etcd's certificate does not name this endpoint's host in its subjectAltName",
            _tls.CERT_REQUIRED: "etcd refused the connection: it requires a client certificate "
                                "(set etcd.cert_file and etcd.key_file)",
            _tls.CERT_REFUSED: "etcd refused the client certificate in etcd.cert_file: not signed by etcd's "
                               "--trusted-ca-file, expired, or not for client authentication",
        }
        if problem is not None:
            return hints[problem]
        if "permission denied" in details or "user name is empty" in details:
            if self.username is None:
                return ("etcd has authentication on: set etcd.username and etcd.password_file "
                        "(or use a client certificate whose CN is an etcd user with access)")
            return f"etcd user {self.username!r} has no read-write permission on this key (grant it etcd.prefix)"
        return None

    @property
    def endpoint(self) -> str:
        """The endpoint currently in use."""
        return self.endpoints[self._index]

    def _current(self):
        with self._lock:
            if self._closed:
                raise StoreError("etcd store is closed")
            return self._client, self.endpoints[self._index]

    def _rotate(self, failed_client) -> None:
        """Move to the next endpoint, unless another thread already did."""
        with self._lock:
            if self._closed or self._client is not failed_client:
                return
            old_ep = self.endpoints[self._index]
            index = (self._index + 1) % len(self._endpoints)
            try:
                client = self._connect(index)
            except ConfigError as exc:
                # A TLS file that cannot be read right now (a certificate being
                # renewed, say) must not kill the calling thread: stay on the old
                # client, so the next failure tries again, and report etcd unreachable.
                raise StoreUnavailable(f"cannot reconnect to etcd at {self.endpoints[index]}: {exc}") from None
            self._index, self._client = index, client
            new_ep = self.endpoints[self._index]
        log.debug("etcd reconnect from=%s to=%s", old_ep, new_ep)
        failed_client.close()

    def _call(self, op: str, fn: Callable, deadline: float | None = None):
        """Run ``fn(client, is_retry)`` under the retry policy on the current
        endpoint's client; map every failure into the nlbfarm.errors tree."""
        started = time.monotonic()
        attempts = 0
        reconnect_error: StoreError | None = None

        def attempt():
            nonlocal attempts, reconnect_error
            attempts += 1
            client, endpoint = self._current()
            metadata = None
            try:
                self._authenticate(client, endpoint)
                metadata = client.metadata
                return fn(client, attempts > 1)
            except StoreAuthError:
                raise
            except Exception as exc:
                if is_connection_error(exc):
                    log.debug("etcd call failed op=%s endpoint=%s attempt=%d reason=%s",
                              op, endpoint, attempts, _describe(exc))
                    try:
                        self._rotate(client)
                    except StoreError as rot:  # e.g. a TLS file unreadable during a renewal
                        reconnect_error = rot  # keep retrying on the old client until the deadline
                    raise
                if self._token_rejected(client, metadata, exc):
                    raise _TokenRejected(_error_text(exc)) from exc
                with self._lock:
                    stale = self._client is not client and not self._closed
                if stale:  # e.g. "Cannot invoke RPC on closed channel!"
                    raise _StaleClient(str(exc)) from exc
                raise

        try:
            return retrying(self.retry_deadline if deadline is None else deadline)(attempt)
        except StoreError:  # store closed, credentials refused
            raise
        except _TokenRejected as exc:
            raise StoreAuthError(f"etcd keeps refusing the auth token of user {self.username!r}: op={op} "
                                 f"endpoint={self.endpoint} error={_describe(exc)}") from exc
        except Exception as exc:
            if is_connection_error(exc):
                raise StoreUnavailable(
                    f"etcd unreachable: op={op} endpoints={','.join(self.endpoints)} "
                    f"attempts={attempts} elapsed={time.monotonic() - started:.1f}s "
                    f"last_error={self._why(exc)}"
                    + (f"; {reconnect_error}" if reconnect_error is not None else "")
                ) from exc
            if _is_lease_not_found(exc):
                raise LeaseExpired(f"etcd lease not found (expired or revoked): op={op}") from exc
            raise StoreError(f"etcd call failed: op={op} endpoint={self.endpoint} error={self._why(exc)}") from exc

    # -- leases ----------------------------------------------------------------

    def grant_lease(self, ttl: int) -> Lease:
        if int(ttl) <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        lease = self._call(f"grant_lease ttl={ttl}", lambda c, retry: c.lease(int(ttl)))
        return Lease(id=lease.id, ttl=lease.ttl)

    def refresh_lease(self, lease_id: int, deadline: float | None = None) -> int:
        def fn(c, retry):
            responses = list(c.refresh_lease(lease_id))
            return responses[-1].TTL if responses else 0

        ttl = self._call(f"refresh_lease lease={lease_id:x}", fn, deadline)
        if ttl <= 0:
            raise LeaseExpired(f"etcd lease {lease_id:x} expired or was revoked")
        return ttl

    def revoke_lease(self, lease_id: int, deadline: float | None = None) -> None:
        def fn(c, retry):
            try:
                c.revoke_lease(lease_id)
            except grpc.RpcError as exc:
                if not _is_lease_not_found(exc):
                    raise

        self._call(f"revoke_lease lease={lease_id:x}", fn, deadline)

    # -- keys --------------------------------------------------------------------

    def create(self, key: str, value: bytes, lease_id: int | None = None,
               deadline: float | None = None) -> bool:
        value = bytes(value)

        def fn(c, retry):
            ok, responses = c.transaction(
                compare=[c.transactions.version(key) == 0],
                success=[c.transactions.put(key, value, lease_id)],
                failure=[c.transactions.get(key)],
            )
            if ok:
                return True
            # An earlier attempt may have been applied with its reply lost.
            return retry and _holds(responses, value, lease_id)

        return self._call(f"create key={key}", fn, deadline)

    def put(self, key: str, value: bytes, lease_id: int | None = None, deadline: float | None = None) -> int:
        resp = self._call(f"put key={key}", lambda c, retry: c.put(key, bytes(value), lease_id), deadline)
        return resp.header.revision

    def get(self, key: str) -> KV | None:
        resp = self._call(f"get key={key}", lambda c, retry: c.get_response(key))
        return self._kvs(resp.kvs).get(key)

    def get_prefix(self, prefix: str) -> tuple[dict[str, KV], int]:
        if not prefix:
            raise ValueError("prefix must not be empty")
        resp = self._call(
            f"get_prefix prefix={prefix}",
            lambda c, retry: c.get_range_response(prefix, _prefix_range_end(prefix)),
        )
        return self._kvs(resp.kvs), resp.header.revision

    def _kvs(self, pb_kvs) -> dict[str, KV]:
        """The keys of a range response by name, without those that are not UTF-8."""
        out = {}
        for pb_kv in pb_kvs:
            key = self._decode_key(pb_kv.key)
            if key is not None:
                out[key] = _kv(pb_kv, key)
        return out

    def compare_and_swap(
        self, key: str, value: bytes, expected_mod_revision: int, lease_id: int | None = None,
        deadline: float | None = None,
    ) -> bool:
        value = bytes(value)
        if expected_mod_revision == 0:
            compare = lambda c: c.transactions.version(key) == 0  # noqa: E731
        else:
            compare = lambda c: c.transactions.mod(key) == expected_mod_revision  # noqa: E731

        def fn(c, retry):
            ok, responses = c.transaction(
                compare=[compare(c)],
                success=[c.transactions.put(key, value, lease_id)],
                failure=[c.transactions.get(key)],
            )
            if ok:
                return True
            return retry and _holds(responses, value, lease_id, newer_than=expected_mod_revision)

        return self._call(f"compare_and_swap key={key} expected={expected_mod_revision}", fn, deadline)

    def delete(self, key: str, deadline: float | None = None) -> bool:
        return self._call(f"delete key={key}", lambda c, retry: c.delete(key), deadline)

    # -- watches -------------------------------------------------------------

    def watch_prefix(
        self,
        prefix: str,
        on_event: Callable[[WatchEvent], None],
        start_revision: int | None = None,
    ) -> WatchHandle:
        if not prefix:
            raise ValueError("prefix must not be empty")
        watch = _PrefixWatch(self, prefix, on_event, start_revision)
        with self._lock:
            if self._closed:
                raise StoreError("etcd store is closed")
            self._watches.add(watch)
        watch.start()
        return watch

    def _forget(self, watch: "_PrefixWatch") -> None:
        with self._lock:
            self._watches.discard(watch)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            watches = list(self._watches)
        for w in watches:
            w.cancel()
        with self._lock:
            self._closed = True
            client = self._client
        client.close()


def _holds(responses, value: bytes, lease_id: int | None, newer_than: int = 0) -> bool:
    """Whether the txn failure-branch get shows exactly our write."""
    if not responses or not responses[0]:
        return False
    cur_value, meta = responses[0][0]
    return (
        cur_value == value
        and meta.lease_id == (lease_id or 0)
        and meta.mod_revision > newer_than
    )


class _Compacted(Exception):
    def __init__(self, compact_revision: int):
        super().__init__(f"revision compacted at {compact_revision}")
        self.compact_revision = compact_revision


class _RevisionWentBack(Exception):
    def __init__(self, etcd_revision: int):
        super().__init__(f"etcd is at revision {etcd_revision}")
        self.etcd_revision = etcd_revision


class _PrefixWatch(WatchHandle):
    """One prefix watch: its own thread and its own gRPC Watch stream.

    python-etcd3's ``Watcher`` is not used: after a stream error it drops all
    callbacks, and while etcd is down its thread re-opens streams in a busy
    loop. Here the stream is driven directly through the client's channel.
    """

    def __init__(self, store: EtcdStore, prefix: str, on_event, start_revision: int | None):
        self._store = store
        self.prefix = prefix
        self._range_end = _prefix_range_end(prefix)
        self._on_event = on_event
        # Revision the next (re)created stream starts at; None = list first.
        self._next_rev: int | None = start_revision if start_revision else None
        self._stop = threading.Event()
        self._rewound = False  # the next resync follows a revision that went backwards
        self._lock = threading.Lock()
        self._call = None
        self._established = False  # the current stream got its "created" reply
        self._lost_since: float | None = None  # start of the current outage
        self._reconnect_failing = False  # a reconnect failed (warned once until one succeeds)
        self._thread = threading.Thread(
            target=self._run, name=f"etcd-watch {prefix}", daemon=True
        )

    @property
    def last_revision(self) -> int:
        """The last revision known to be delivered (0 before the first delivery)."""
        return (self._next_rev or 1) - 1

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.warning("watch thread did not stop prefix=%s", self.prefix)
        self._store._forget(self)

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        delay = BACKOFF_INITIAL_S
        while not self._stop.is_set():
            try:
                client, endpoint = self._store._current()
            except StoreError:
                break  # store closed
            self._established = False
            metadata = None
            try:
                # The stream sends the client's auth token (if any) as metadata,
                # over the client's channel (TLS when configured).
                self._store._authenticate(client, endpoint)
                metadata = client.metadata
                if self._next_rev is None:
                    self._resync(client)
                self._stream(client, endpoint)
                break  # returns only once cancelled
            except _Compacted as exc:
                log.warning(
                    "watch compacted prefix=%s last_revision=%d compact_revision=%d action=resync",
                    self.prefix, self.last_revision, exc.compact_revision,
                )
                self._next_rev = None
                continue
            except _RevisionWentBack as exc:
                log.warning(
                    "etcd revision went backwards (restored from an older snapshot, or a new etcd) "
                    "prefix=%s endpoint=%s last_revision=%d etcd_revision=%d action=resync",
                    self.prefix, endpoint, self.last_revision, exc.etcd_revision,
                )
                self._next_rev = None
                self._rewound = True
                # No `continue`: pause as after an error, so that an etcd that
                # keeps answering below our revision cannot make us re-list in a
                # tight loop.
            except Exception as exc:
                if self._stop.is_set():
                    break
                if self._established:
                    delay = BACKOFF_INITIAL_S
                token_rejected = self._store._token_rejected(client, metadata, exc)
                if token_rejected and self._established:
                    # A stream that ran and then lost its token: authenticate and resume at once.
                    log.info("watch re-authenticating prefix=%s endpoint=%s last_revision=%d",
                             self.prefix, endpoint, self.last_revision)
                elif self._lost_since is None:
                    self._lost_since = time.monotonic()
                    log.warning(
                        "watch lost prefix=%s endpoint=%s last_revision=%d reason=%s",
                        self.prefix, endpoint, self.last_revision, self._store._why(exc),
                    )
                else:
                    log.debug(
                        "watch retry failed prefix=%s endpoint=%s last_revision=%d reason=%s",
                        self.prefix, endpoint, self.last_revision, self._store._why(exc),
                    )
                if is_connection_error(exc):
                    try:
                        self._store._rotate(client)
                        self._reconnect_failing = False
                    except Exception as rot:  # noqa: BLE001 - e.g. a TLS file unreadable during a renewal
                        if not self._reconnect_failing:  # once per outage, not once per retry
                            log.warning("watch cannot reconnect prefix=%s reason=%s; retrying", self.prefix, rot)
                        self._reconnect_failing = True
            # Always pause, so a stream that keeps failing right after
            # creation cannot spin.
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, BACKOFF_MAX_S)
        log.debug("watch stopped prefix=%s last_revision=%d", self.prefix, self.last_revision)

    def _resync(self, client) -> None:
        resp = client.get_range_response(self.prefix, self._range_end)
        snapshot = self._store._kvs(resp.kvs)
        rev = resp.header.revision
        log.info("watch resync prefix=%s revision=%d keys=%d", self.prefix, rev, len(snapshot))
        self._deliver(
            WatchEvent(kind="resync", key=self.prefix, value=b"", mod_revision=rev, snapshot=snapshot,
                       rewound=self._rewound)
        )
        self._rewound = False
        self._next_rev = rev + 1

    def _stream(self, client, endpoint: str) -> None:
        """Run one Watch stream until it fails (raises) or is cancelled (returns)."""
        request = etcdrpc.WatchRequest(
            create_request=etcdrpc.WatchCreateRequest(
                key=self.prefix.encode(),
                range_end=self._range_end,
                start_revision=self._next_rev,
                progress_notify=True,
            )
        )
        done = threading.Event()

        def requests():
            yield request
            done.wait()  # keep the request side open until this stream ends

        call = etcdrpc.WatchStub(client.channel).Watch(requests(), metadata=client.metadata)
        with self._lock:
            self._call = call
        if self._stop.is_set():
            call.cancel()
        try:
            for rs in call:
                if rs.compact_revision:
                    raise _Compacted(rs.compact_revision)
                if rs.canceled:
                    raise StoreError(f"watch canceled by etcd: {rs.cancel_reason or 'no reason given'}")
                self._check_revision(rs.header.revision)
                if rs.created:
                    self._established = True
                    if self._lost_since is not None:
                        log.info(
                            "watch resumed prefix=%s endpoint=%s from_revision=%d down_for=%.1fs",
                            self.prefix, endpoint, self._next_rev,
                            time.monotonic() - self._lost_since,
                        )
                        self._lost_since = None
                    else:
                        log.debug("watch started prefix=%s endpoint=%s from_revision=%s",
                                  self.prefix, endpoint, self._next_rev)
                if rs.events:
                    for ev in rs.events:
                        if self._stop.is_set():
                            return
                        key = self._store._decode_key(ev.kv.key)
                        if key is not None:  # else skipped; _next_rev still moves past it
                            self._deliver(_event(ev, key))
                    self._next_rev = rs.events[-1].kv.mod_revision + 1
                elif not rs.created and self._next_rev is not None:
                    # Progress notification: nothing under the prefix changed
                    # up to header.revision.
                    self._next_rev = max(self._next_rev, rs.header.revision + 1)
            raise StoreError("watch stream ended by etcd")
        except grpc.RpcError:
            if self._stop.is_set():
                return
            raise
        finally:
            done.set()
            call.cancel()
            with self._lock:
                self._call = None

    def _check_revision(self, etcd_revision: int) -> None:
        """Raise _RevisionWentBack if etcd is below the revision we have delivered.

        A live etcd's revision never decreases, so this means it lost history
        (restored from a snapshot, or replaced by a new one): resuming at
        ``_next_rev`` would wait, silently, until etcd reaches it. Every
        response carries the revision, and a new stream always gets one at
        once: etcd answers ``created`` even when ``start_revision`` lies in the
        future. (A member lagging a little behind may also trip this after an
        endpoint switch; a resync is then merely redundant.)
        """
        if etcd_revision and etcd_revision < self.last_revision:  # 0: no header
            raise _RevisionWentBack(etcd_revision)

    def _deliver(self, event: WatchEvent) -> None:
        if self._stop.is_set():
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception(
                "watch callback failed prefix=%s kind=%s key=%s revision=%d",
                self.prefix, event.kind, event.key, event.mod_revision,
            )


def _event(ev, key: str) -> WatchEvent:
    """``ev`` as a :class:`WatchEvent`; ``key`` is its key, already decoded (see _KeyDecoder)."""
    kv = ev.kv
    if ev.type == kv_pb2.Event.DELETE:
        return WatchEvent(kind="delete", key=key, value=b"", mod_revision=kv.mod_revision)
    return WatchEvent(
        kind="put",
        key=key,
        value=bytes(kv.value),
        mod_revision=kv.mod_revision,
        lease=kv.lease,
    )
