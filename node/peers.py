"""Asking peers whether they reach etcd: "am I cut off, or is etcd down for everyone?"

Used only while this node's own keepalives fail. See ``coordinator/handover.py``
(rule E) for why the answer lets a node keep serving during an etcd outage.

When the API speaks TLS (``status.tls_*``), peers are asked over TLS: the
peer's certificate is verified against ``status.tls_client_ca_file`` (the
farm's CA) and this node presents its own ``tls_cert_file`` as client
certificate, which a peer with mutual TLS requires. Every node's
certificate must therefore be signed by that CA, name the node's
``peer_listen`` address, and be valid for server and client authentication.
"""
from __future__ import annotations

import logging
from concurrent import futures

import grpc

from nlbfarm import tls as _tls
from nlbfarm.proto import farm_pb2, farm_pb2_grpc

log = logging.getLogger(__name__)


def peer_tls(status) -> _tls.ClientTLS | None:
    """How this node's peer probes speak TLS, from its ``status`` config section."""
    if not status.tls_cert_file:
        return None
    return _tls.ClientTLS(ca_file=status.tls_client_ca_file, cert_file=status.tls_cert_file,
                          key_file=status.tls_key_file,
                          names=("status.tls_client_ca_file", "status.tls_cert_file", "status.tls_key_file"))


class PeerProbe:
    def __init__(self, me: str, timeout: float, tls: _tls.ClientTLS | None = None):
        self.me = me
        self.timeout = timeout
        self.tls = tls
        self._channels: dict[str, grpc.Channel] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="peer-probe")
        self._tls_warned: set[tuple[str, str]] = set()

    def _stub(self, addr: str):
        ch = self._channels.get(addr)
        if ch is None:
            ch = self._channels[addr] = _tls.channel(addr, self.tls)
        return farm_pb2_grpc.FarmStub(ch)

    def _ask(self, node: str, addr: str):
        try:
            return self._stub(addr).EtcdReachability(
                farm_pb2.EtcdReachabilityRequest(asking_node=self.me), timeout=self.timeout)
        except grpc.RpcError as exc:
            problem = _tls.classify(exc.details() or "", self.tls is not None,
                                    bool(self.tls and self.tls.cert_file))
            if problem and (node, problem) not in self._tls_warned:
                # A TLS mismatch between peers silently disables rule E: say so once.
                self._tls_warned.add((node, problem))
                log.warning("peer probe failed on TLS peer=%s addr=%s problem=%s detail=%r: check "
                            "status.tls_* on both nodes", node, addr, problem, exc.details())
            else:
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
