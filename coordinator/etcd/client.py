"""The :class:`~nlbfarm.coordinator.store.Store` on etcd v3, through python-etcd3 0.12.

Connections, endpoint rotation, TLS and authentication, and every unary call
under the one retry policy of :mod:`.retry`. Watches are in :mod:`.watch`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import grpc

from nlbfarm import tls as _tls
from nlbfarm.coordinator.etcd import keys as _keys
from nlbfarm.coordinator.etcd._lib import etcd3, etcdrpc
from nlbfarm.coordinator.etcd.keepalive import KeepAliveStream
from nlbfarm.coordinator.etcd.keys import KeyDecoder, kv_from_pb, prefix_range_end
from nlbfarm.coordinator.etcd.retry import (
    TOKEN_ERRORS,
    describe,
    error_text,
    is_lease_not_found,
    rpc_code,
    StaleClient,
    TokenRejected,
    is_connection_error,
    retrying,
)
from nlbfarm.coordinator.etcd.watch import PrefixWatch
from nlbfarm.coordinator.store import KV, Lease, LeaseExpired, Store, StoreAuthError, WatchEvent, WatchHandle
from nlbfarm.errors import ConfigError, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

# gRPC channel options: detect half-open connections (keepalive within etcd's
# default 5 s minimum ping interval) and never sit in a long reconnect backoff.
_GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.use_local_subchannel_pool", 1),
]


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
        self._watches: set[PrefixWatch] = set()
        self._keepalive: KeepAliveStream | None = None
        self._keepalive_lock = threading.Lock()
        self._decode_key = KeyDecoder(_keys.MAX_SKIPPED_KEYS_REMEMBERED)

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
                code, details = rpc_code(exc), error_text(exc)
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
        text = error_text(exc)
        # Without a token (auth was off when we connected), "permission denied"
        # may mean that auth has been enabled since: try to authenticate.
        if not any(t in text for t in TOKEN_ERRORS) and not (
                used_metadata is None and "permission denied" in text):
            return False
        with self._auth_lock:
            if client.metadata is used_metadata:  # nobody has re-authenticated since
                client.nlbfarm_authenticated = False
        log.debug("etcd token rejected user=%s reason=%s", self.username, text)
        return True

    def _why(self, exc: BaseException) -> str:
        """``describe(exc)`` plus what to change when the cause is TLS or authentication."""
        text = describe(exc)
        hint = self._hint(exc)
        return f"{text} ({hint})" if hint else text

    def _hint(self, exc: BaseException) -> str | None:
        details = error_text(exc)
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
                              op, endpoint, attempts, describe(exc))
                    try:
                        self._rotate(client)
                    except StoreError as rot:  # e.g. a TLS file unreadable during a renewal
                        reconnect_error = rot  # keep retrying on the old client until the deadline
                    raise
                if self._token_rejected(client, metadata, exc):
                    raise TokenRejected(error_text(exc)) from exc
                with self._lock:
                    stale = self._client is not client and not self._closed
                if stale:  # e.g. "Cannot invoke RPC on closed channel!"
                    raise StaleClient(str(exc)) from exc
                raise

        try:
            return retrying(self.retry_deadline if deadline is None else deadline)(attempt)
        except StoreError:  # store closed, credentials refused
            raise
        except TokenRejected as exc:
            raise StoreAuthError(f"etcd keeps refusing the auth token of user {self.username!r}: op={op} "
                                 f"endpoint={self.endpoint} error={describe(exc)}") from exc
        except Exception as exc:
            if is_connection_error(exc):
                raise StoreUnavailable(
                    f"etcd unreachable: op={op} endpoints={','.join(self.endpoints)} "
                    f"attempts={attempts} elapsed={time.monotonic() - started:.1f}s "
                    f"last_error={self._why(exc)}"
                    + (f"; {reconnect_error}" if reconnect_error is not None else "")
                ) from exc
            if is_lease_not_found(exc):
                raise LeaseExpired(f"etcd lease not found (expired or revoked): op={op}") from exc
            raise StoreError(f"etcd call failed: op={op} endpoint={self.endpoint} error={self._why(exc)}") from exc

    # -- leases ----------------------------------------------------------------

    def grant_lease(self, ttl: int) -> Lease:
        if int(ttl) <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        lease = self._call(f"grant_lease ttl={ttl}", lambda c, retry: c.lease(int(ttl)))
        return Lease(id=lease.id, ttl=lease.ttl)

    def refresh_lease(self, lease_id: int, deadline: float | None = None) -> int:
        return self.refresh_leases((lease_id,), deadline)[lease_id]

    def refresh_leases(self, lease_ids, deadline: float | None = None) -> dict[int, int]:
        """Renew several leases in one round on the long-lived keepalive stream."""
        lease_ids = tuple(lease_ids)
        end = time.monotonic() + (self.retry_deadline if deadline is None else deadline)

        def fn(c, retry):
            with self._keepalive_lock:
                stream = self._keepalive
                if stream is None or stream.broken or stream.client is not c:
                    if stream is not None:
                        stream.close()
                    stream = self._keepalive = KeepAliveStream(c, c.metadata)
                timeout = max(0.01, min(self.timeout, end - time.monotonic()))
                return stream.refresh(lease_ids, timeout)

        what = ",".join(f"{i:x}" for i in lease_ids)
        ttls = self._call(f"refresh_lease lease={what}", fn, deadline)
        gone = [i for i in lease_ids if ttls.get(i, 0) <= 0]
        if gone:
            raise LeaseExpired(f"etcd lease {','.join(f'{i:x}' for i in gone)} expired or was revoked")
        return ttls

    def revoke_lease(self, lease_id: int, deadline: float | None = None) -> None:
        def fn(c, retry):
            try:
                c.revoke_lease(lease_id)
            except grpc.RpcError as exc:
                if not is_lease_not_found(exc):
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
            lambda c, retry: c.get_range_response(prefix, prefix_range_end(prefix)),
        )
        return self._kvs(resp.kvs), resp.header.revision

    def _kvs(self, pb_kvs) -> dict[str, KV]:
        """The keys of a range response by name, without those that are not UTF-8."""
        out = {}
        for pb_kv in pb_kvs:
            key = self._decode_key(pb_kv.key)
            if key is not None:
                out[key] = kv_from_pb(pb_kv, key)
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

    def delete_if_unchanged(self, expected, deadline: float | None = None) -> bool:
        items = sorted(expected.items())
        if not items:
            raise ValueError("delete_if_unchanged needs at least one key")

        def fn(c, retry):
            compare = [c.transactions.version(k) == 0 if rev == 0 else c.transactions.mod(k) == rev
                       for k, rev in items]
            ok, _responses = c.transaction(
                compare=compare, success=[c.transactions.delete(k) for k, rev in items if rev], failure=[])
            return bool(ok)

        return self._call(f"delete_if_unchanged keys={','.join(k for k, _ in items)}", fn, deadline)

    # -- watches -------------------------------------------------------------

    def watch_prefix(
        self,
        prefix: str,
        on_event: Callable[[WatchEvent], None],
        start_revision: int | None = None,
    ) -> WatchHandle:
        if not prefix:
            raise ValueError("prefix must not be empty")
        watch = PrefixWatch(self, prefix, on_event, start_revision)
        with self._lock:
            if self._closed:
                raise StoreError("etcd store is closed")
            self._watches.add(watch)
        watch.start()
        return watch

    def _forget(self, watch: "PrefixWatch") -> None:
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
        with self._keepalive_lock:
            if self._keepalive is not None:
                self._keepalive.close()
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
