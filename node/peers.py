"""Asking peers whether they reach etcd: "am I cut off, or is etcd down for everyone?"

Used only while this node's own keepalives fail. See ``coordinator/handover.py``
(rule E) for why the answer lets a node keep serving during an etcd outage.
"""
from __future__ import annotations

import logging
from concurrent import futures

import grpc

from nlbfarm.proto import farm_pb2, farm_pb2_grpc

log = logging.getLogger(__name__)


class PeerProbe:
    def __init__(self, me: str, timeout: float):
        self.me = me
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="peer-probe")

    def _stub(self, addr: str):
        ch = self._channels.get(addr)
        if ch is None:
            ch = self._channels[addr] = grpc.insecure_channel(addr)
        return farm_pb2_grpc.FarmStub(ch)

    def _ask(self, node: str, addr: str):
        try:
            return self._stub(addr).EtcdReachability(
                farm_pb2.EtcdReachabilityRequest(asking_node=self.me), timeout=self.timeout)
        except grpc.RpcError as exc:
            log.debug("peer probe failed peer=%s addr=%s code=%s", node, addr, exc.code().name)
            return None

    def etcd_down_for_all(self, peers: dict[str, str]) -> tuple[bool, str]:
        """``peers`` maps node id -> peer API address ("" if none).

        True only if at least one peer exists and every peer answered that it
        cannot reach etcd either. The reason names who broke the consensus.
        """
        if not peers:
            return False, "no peer to confirm an etcd outage"
        missing = sorted(n for n, a in peers.items() if not a)
        if missing:
            return False, f"no peer address for {','.join(missing)}"
        jobs = {n: self._pool.submit(self._ask, n, a) for n, a in peers.items()}
        for node, job in sorted(jobs.items()):
            answer = job.result()
            if answer is None:
                return False, f"peer {node} did not answer"
            if answer.reachable:
                return False, f"peer {node} reaches etcd"
        return True, f"{len(peers)} peers cannot reach etcd either"

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
