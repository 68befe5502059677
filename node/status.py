"""The gRPC status server: a read-only view of the agent (mutating calls come later)."""
from __future__ import annotations

import logging
from concurrent import futures

import grpc

from nlbfarm.errors import ConfigError
from nlbfarm.proto import farm_pb2, farm_pb2_grpc

log = logging.getLogger(__name__)


def status_to_proto(st: dict) -> farm_pb2.GetStatusResponse:
    members = [farm_pb2.Member(**m) for m in st["members"]]
    rest = {k: v for k, v in st.items() if k != "members"}
    return farm_pb2.GetStatusResponse(members=members, **rest)


class FarmService(farm_pb2_grpc.FarmServicer):
    def __init__(self, agent):
        self.agent = agent

    def GetStatus(self, request, context):
        return status_to_proto(self.agent.status())


def serve_status(agent, listen: str) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="grpc"))
    farm_pb2_grpc.add_FarmServicer_to_server(FarmService(agent), server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise ConfigError(f"status.listen: cannot bind {listen}: {exc}") from None
    if port == 0:
        raise ConfigError(f"status.listen: cannot bind {listen}")
    server.start()
    return server
