"""The gRPC API server.

Two listeners: ``status.listen`` (loopback by default) serves every call;
``status.peer_listen`` (optional, on the LAN address) serves only what peers
and read-only tools need and refuses changes.

Mutating calls (Drain, Undrain) also need the bearer token from
``status.token_file`` in the ``authorization`` metadata; without a configured
token they are refused on every listener. Read-only calls are open: they show
no secret.

TLS (``status.tls_cert_file`` + ``tls_key_file``) applies to both listeners;
with ``status.tls_client_ca_file`` clients must also present a certificate
signed by that CA (mutual TLS), farmctl and peers alike. Without them both
listeners speak plaintext (the default listener is on loopback).

The peer listener is reachable from the LAN without credentials (unless
mutual TLS), so it gets its own small thread pool, a cap on concurrent calls
(a flood is refused with RESOURCE_EXHAUSTED instead of queueing) and its own,
smaller cap on event streams; its GetNode leaves out the nft counters, which
are read under the data plane's lock. Nothing a peer sends can use up the
main listener's threads or streams.

Integer fields of the answers are clamped into their proto type's range: one
bad number (negative, or too large for uint32/uint64) gives a clamped value
and a warning in the log, not an UNKNOWN error for the whole call.

Both listeners also serve the standard ``grpc.health.v1.Health`` service
(service "" = the agent answers; service ``nlbfarm.ready`` = this node is an
active member accepting all its buckets) and server reflection, so grpcurl
and Kubernetes-style gRPC probes work without the .proto file.
"""
from __future__ import annotations

import hmac
import logging
import math
import os
import stat
import threading
from concurrent import futures

import grpc
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nlbfarm.errors import ConfigError, StoreError
from nlbfarm.proto import farm_pb2, farm_pb2_grpc

log = logging.getLogger(__name__)

READY_SERVICE = "nlbfarm.ready"
FARM_SERVICE = farm_pb2.DESCRIPTOR.services_by_name["Farm"].full_name
# Event streams each hold a server thread; past this many, new followers are refused.
# Counted per listener: followers on the peer address cannot take the operator's.
MAX_STREAMS = 8
# The peer listener (status.peer_listen) is on the LAN and needs no credentials
# without mutual TLS. Its peers only ask EtcdReachability now and then, so a few
# threads are plenty; the cap on concurrent calls equals the pool so that every
# admitted call has a thread at once and a flood is refused (RESOURCE_EXHAUSTED)
# at the door instead of queueing behind the pool, where it would delay the
# probes peers rely on during an etcd outage and pile up work for the agent.
PEER_WORKERS = 8
PEER_MAX_RPCS = PEER_WORKERS
# Event streams on the peer listener: few, so that followers there leave most
# of its threads to the peers' EtcdReachability calls.
PEER_MAX_STREAMS = 2
MIN_TOKEN_LEN = 16


def read_token(path: str) -> str:
    """The API token from status.token_file; a ConfigError names what is wrong with the file."""
    try:
        st = os.stat(path)
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"status.token_file: cannot read {path}: {exc.strerror}") from None
    if len(token) < MIN_TOKEN_LEN or any(c.isspace() for c in token):
        raise ConfigError(f"status.token_file: {path} must hold one token of at least {MIN_TOKEN_LEN} "
                          "characters without spaces (e.g. `openssl rand -hex 32`)")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file readable by others path=%s mode=%o: chmod 600 it", path,
                    stat.S_IMODE(st.st_mode))
    return token


class Auth:
    """Who may change the farm: callers presenting the configured bearer token."""

    def __init__(self, token: str | None):
        self._token = token.encode() if token else None

    def check(self, context, what: str) -> None:
        if self._token is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{what} refused: this agent accepts changes only with a token, and "
                          "status.token_file is not configured")
        meta = {k: v for k, v in context.invocation_metadata()}
        given = meta.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if not given or scheme.lower() != "bearer":
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"{what} needs credentials: send 'authorization: Bearer <token>' "
                          "(farmctl --token-file)")
        if not hmac.compare_digest(value.strip().encode(), self._token):
            log.warning("refused: wrong token call=%s peer=%s", what, context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{what} refused: wrong token")


# The range of each unsigned integer type farm.proto uses. protobuf raises
# ValueError for a value outside it, which gRPC turns into an opaque UNKNOWN.
_UINT_RANGE = {FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1)}
_clamp_warned: set[str] = set()


def clamp(value: int, field: FieldDescriptor) -> int:
    """``value`` forced into the range of the uint32/uint64 ``field``.

    The numbers come from etcd and the agent's bookkeeping: a negative or huge
    one is a bug somewhere else, and an answer with one field pinned to its
    limit is more use to an operator than no answer. Logged once per field.
    """
    low, high = _UINT_RANGE[field.type]
    clamped = min(max(value, low), high)
    if clamped != value and field.full_name not in _clamp_warned:
        _clamp_warned.add(field.full_name)
        log.warning("API field out of range field=%s value=%d sent=%d", field.full_name, value, clamped)
    return clamped


def _message(cls, **values):
    """``cls(**values)`` with every uint32/uint64 field clamped (see ``clamp``)."""
    fields = cls.DESCRIPTOR.fields_by_name
    for name, v in values.items():
        f = fields.get(name)
        if f is not None and f.type in _UINT_RANGE and isinstance(v, int) and not isinstance(v, bool):
            values[name] = clamp(v, f)
    return cls(**values)


def _ranges(pairs) -> list[farm_pb2.BucketRange]:
    return [_message(farm_pb2.BucketRange, first=a, last=b) for a, b in pairs]


def status_to_proto(st: dict) -> farm_pb2.GetStatusResponse:
    members = [_message(farm_pb2.Member, **m) for m in st["members"]]
    rest = {k: v for k, v in st.items() if k != "members"}
    return _message(farm_pb2.GetStatusResponse, members=members, **rest)


def node_to_proto(v: dict) -> farm_pb2.NodeView:
    v = dict(v)
    v["accepting_ranges"] = _ranges(v["accepting_ranges"])
    v["counters"] = [_message(farm_pb2.RuleCounter, **c) for c in v["counters"]]
    v["checks"] = [_message(farm_pb2.CheckStatus, **{k: (False if k == "last_ok" and x is None else x)
                                                     for k, x in c.items()}) for c in v["checks"]]
    return _message(farm_pb2.NodeView, **v)


def event_to_proto(ev) -> farm_pb2.Event:
    return _message(farm_pb2.Event, seq=ev.seq, time=ev.time, kind=ev.kind, node_id=ev.node_id,
                    message=ev.message, fields=ev.fields)


class FarmService(farm_pb2_grpc.FarmServicer):
    """The Farm calls on one listener.

    ``allow_changes``: Drain and Undrain are served (with the token); false on
    the peer listener. ``max_streams``: event streams at once on this listener.
    ``live_counters``: GetNode reads the nft counters from the kernel. That
    takes the data plane's lock, which the agent's reconcile and fence work
    needs too, so the peer listener (no credentials without mutual TLS) passes
    false: its GetNode answers with no counters rather than let any caller on
    the LAN delay the agent's safety work.
    """

    def __init__(self, agent, allow_changes: bool = True, auth: Auth | None = None,
                 max_streams: int = MAX_STREAMS, live_counters: bool = True):
        self.agent = agent
        self.allow_changes = allow_changes
        self.auth = auth or Auth(None)
        self.max_streams = max_streams
        self.live_counters = live_counters
        self._streams = 0
        self._streams_lock = threading.Lock()

    def GetStatus(self, request, context):
        return status_to_proto(self.agent.status())

    def GetNode(self, request, context):
        return node_to_proto(self.agent.node_view(with_counters=self.live_counters))

    def WatchEvents(self, request, context):
        with self._streams_lock:
            if self._streams >= self.max_streams:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"at most {self.max_streams} event streams at once; try again later")
            self._streams += 1
        try:
            bus = self.agent.events
            seq = 0 if request.replay else bus.last_seq
            if request.replay:
                for ev in bus.since(0):
                    seq = max(seq, ev.seq)
                    yield event_to_proto(ev)
            while request.follow and context.is_active() and not bus.closed:
                for ev in bus.wait(seq, timeout=1.0):
                    seq = max(seq, ev.seq)
                    yield event_to_proto(ev)
        finally:
            with self._streams_lock:
                self._streams -= 1

    def EtcdReachability(self, request, context):
        # The agent's answer carries who answers (node id and instance) and
        # whether it votes at all: the asker counts it only if it comes from
        # the peer it meant to ask (rule E, coordinator/handover.py).
        voting, reachable, age = self.agent.etcd_reachability()
        return farm_pb2.EtcdReachabilityResponse(node_id=self.agent.me, instance=self.agent.instance,
                                                 voting=voting, reachable=reachable,
                                                 last_success_age_s=age)

    def GetTable(self, request, context):
        t = self.agent.table_view()
        nodes = [_message(farm_pb2.NodeBuckets, node_id=n["node_id"], buckets=n["buckets"],
                          ranges=_ranges(n["ranges"]))
                 for n in t["nodes"]]
        return _message(farm_pb2.GetTableResponse, generation=t["generation"], bucket_count=t["bucket_count"],
                        nodes=nodes, unowned=t["unowned"])

    def Which(self, request, context):
        try:
            w = self.agent.which(request.client_ip, request.client_port, request.vip or None,
                                 request.vip_port, request.protocol)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except LookupError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return _message(farm_pb2.WhichResponse, **w)

    def _change(self, context, what: str, node_id: str, fn):
        if not self.allow_changes:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "changes are only accepted on the status.listen address, not the peer address")
        self.auth.check(context, what)
        if not node_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_id is required")
        try:
            return fn()
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd: {exc}")

    def Drain(self, request, context):
        timeout = request.timeout_s
        if math.isnan(timeout) or timeout < 0 or timeout > 86400:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"timeout_s must be from 0 to 86400 seconds, got {timeout}")
        msg = self._change(context, "Drain", request.node_id,
                           lambda: self.agent.request_drain(request.node_id, timeout or None))
        return farm_pb2.DrainResponse(node_id=request.node_id, message=msg)

    def Undrain(self, request, context):
        msg = self._change(context, "Undrain", request.node_id, lambda: self.agent.request_undrain(request.node_id))
        return farm_pb2.UndrainResponse(node_id=request.node_id, message=msg)


class ReadyTracker:
    """Keeps the standard health service's answers in step with the agent."""

    def __init__(self):
        self.servicer = health.HealthServicer()
        self._ready: bool | None = None
        for svc in ("", FARM_SERVICE):
            self.servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
        self.set_ready(False)

    def set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            self.servicer.set(READY_SERVICE, health_pb2.HealthCheckResponse.SERVING if ready
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    def shutdown(self) -> None:
        self.servicer.enter_graceful_shutdown()


def _bind(server: grpc.Server, listen: str, field: str, credentials=None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"{field}: cannot bind {listen}: {exc}") from None
    if port == 0:
        raise ConfigError(f"{field}: cannot bind {listen}")
    return port


def _server(agent, ready: ReadyTracker, auth: Auth, peer: bool) -> grpc.Server:
    """The main listener's server, or with ``peer`` the peer listener's: read-only, with
    the fixed limits above and no live kernel counters (see FarmService)."""
    if peer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=PEER_WORKERS, thread_name_prefix="grpc-peer"),
                             maximum_concurrent_rpcs=PEER_MAX_RPCS)
        service = FarmService(agent, allow_changes=False, auth=auth, max_streams=PEER_MAX_STREAMS,
                              live_counters=False)
    else:
        # Event streams hold a thread each; leave room for ordinary calls.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 8, thread_name_prefix="grpc"))
        service = FarmService(agent, allow_changes=True, auth=auth)
    farm_pb2_grpc.add_FarmServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(ready.servicer, server)
    reflection.enable_server_reflection((FARM_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server


def serve_status(agent, listen: str, peer_listen: str | None = None, token: str | None = None,
                 ready: ReadyTracker | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, tls_client_ca_file: str | None = None) -> list[grpc.Server]:
    """Start the API on ``listen`` (and the read-only peer API on ``peer_listen``).

    With ``tls_cert_file`` and ``tls_key_file`` both listeners speak TLS; with
    ``tls_client_ca_file`` too, they require a client certificate signed by it.
    Each returned server has ``bound_port``: the port it bound (useful with port 0).
    """
    ready = ready or ReadyTracker()
    auth = Auth(token)
    credentials = None
    if tls_cert_file or tls_key_file:
        if not (tls_cert_file and tls_key_file):
            raise ConfigError("status.tls_cert_file and status.tls_key_file go together")
        from nlbfarm.tls import server_credentials
        credentials = server_credentials(tls_cert_file, tls_key_file, tls_client_ca_file)
    elif tls_client_ca_file:
        raise ConfigError("status.tls_client_ca_file needs status.tls_cert_file and status.tls_key_file")
    main = _server(agent, ready, auth, peer=False)
    main.bound_port = _bind(main, listen, "status.listen", credentials)
    servers = [main]
    if peer_listen:
        peer = _server(agent, ready, auth, peer=True)
        peer.bound_port = _bind(peer, peer_listen, "status.peer_listen", credentials)
        servers.append(peer)
    for s in servers:
        s.start()
    mode = "plaintext" if credentials is None else ("mutual TLS" if tls_client_ca_file else "TLS")
    log.info("status API listen=%s peer_listen=%s transport=%s", listen, peer_listen or "-", mode)
    return servers
