"""The gRPC API server.

Two listeners: ``status.listen`` (loopback by default) serves every call;
``status.peer_listen`` (optional, on the LAN address) serves only what peers
and read-only tools need (status and etcd reachability) and refuses changes.
"""
from __future__ import annotations

import logging
import math
from concurrent import futures

import grpc

from nlbfarm.errors import ConfigError, StoreError
from nlbfarm.proto import farm_pb2, farm_pb2_grpc

log = logging.getLogger(__name__)


def status_to_proto(st: dict) -> farm_pb2.GetStatusResponse:
    members = [farm_pb2.Member(**m) for m in st["members"]]
    rest = {k: v for k, v in st.items() if k != "members"}
    return farm_pb2.GetStatusResponse(members=members, **rest)


class FarmService(farm_pb2_grpc.FarmServicer):
    def __init__(self, agent, allow_changes: bool = True):
        self.agent = agent
        self.allow_changes = allow_changes

    def GetStatus(self, request, context):
        return status_to_proto(self.agent.status())

    def EtcdReachability(self, request, context):
        reachable, age = self.agent.etcd_reachability()
        return farm_pb2.EtcdReachabilityResponse(node_id=self.agent.me, reachable=reachable,
                                                 last_success_age_s=age)

    def GetTable(self, request, context):
        t = self.agent.table_view()
        nodes = [farm_pb2.NodeBuckets(node_id=n["node_id"], buckets=n["buckets"],
                                      ranges=[farm_pb2.BucketRange(first=a, last=b) for a, b in n["ranges"]])
                 for n in t["nodes"]]
        return farm_pb2.GetTableResponse(generation=t["generation"], bucket_count=t["bucket_count"],
                                         nodes=nodes, unowned=t["unowned"])

    def Which(self, request, context):
        try:
            w = self.agent.which(request.client_ip, request.client_port, request.vip or None)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except LookupError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return farm_pb2.WhichResponse(**w)

    def _change(self, context, node_id: str, fn):
        if not self.allow_changes:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "changes are only accepted on the status.listen address, not the peer address")
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
        msg = self._change(context, request.node_id,
                           lambda: self.agent.request_drain(request.node_id, timeout or None))
        return farm_pb2.DrainResponse(node_id=request.node_id, message=msg)

    def Undrain(self, request, context):
        msg = self._change(context, request.node_id, lambda: self.agent.request_undrain(request.node_id))
        return farm_pb2.UndrainResponse(node_id=request.node_id, message=msg)


def _bind(server: grpc.Server, listen: str, field: str) -> None:
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise ConfigError(f"{field}: cannot bind {listen}: {exc}") from None
    if port == 0:
        raise ConfigError(f"{field}: cannot bind {listen}")


def serve_status(agent, listen: str, peer_listen: str | None = None) -> list[grpc.Server]:
    servers = []
    main = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="grpc"))
    farm_pb2_grpc.add_FarmServicer_to_server(FarmService(agent), main)
    _bind(main, listen, "status.listen")
    servers.append(main)
    if peer_listen:
        peer = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="grpc-peer"))
        farm_pb2_grpc.add_FarmServicer_to_server(FarmService(agent, allow_changes=False), peer)
        _bind(peer, peer_listen, "status.peer_listen")
        servers.append(peer)
    for s in servers:
        s.start()
    return servers
