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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Peer:
    """Whom to ask: a member's id, its agent instance and its advertised peer address."""

    id: str
    instance: str
    addr: str


def judge_answers(me: str, my_instance: str, peers: list[Peer], answers: dict) -> tuple[bool, str]:
    """Rule E's verdict (pure): True only if every peer answered, as itself and registered, "no".

    ``answers`` maps peer id -> an answer with ``node_id``, ``instance``,
    ``voting``, ``reachable`` (the EtcdReachability response), or None.
    """
    if not peers:
        return False, "no peer to confirm an etcd outage"
    for peer in sorted(peers, key=lambda p: p.id):
        answer = answers.get(peer.id)
        if answer is None:
            return False, f"peer {peer.id} did not answer"
        problem = foreign_answer(me, my_instance, peer, answer)
        if problem:
            return False, problem
        if not answer.voting:
            return False, f"peer {peer.id} is not registered and does not vote"
        if answer.reachable:
            return False, f"peer {peer.id} reaches etcd"
    return True, f"{len(peers)} peers cannot reach etcd either"


def foreign_answer(me: str, my_instance: str, peer: Peer, answer) -> str | None:
    """Why ``answer`` does not come from ``peer``, or None if it does."""
    if answer.node_id == me or (my_instance and answer.instance == my_instance):
        return (f"peer {peer.id}'s address {peer.addr} answered as this node: its peer address "
                "leads back here (a wildcard or loopback status.peer_listen without "
                "status.peer_advertise?)")
    if answer.node_id != peer.id:
        return f"peer {peer.id}'s address {peer.addr} answered as {answer.node_id[:63]!r}"
    if peer.instance and answer.instance != peer.instance:
        return (f"peer {peer.id}'s address {peer.addr} answered from another agent process "
                "(restarted, or a second agent with that id)")
    return None


# A peer that restarts must be reachable again at once: gRPC's default
# reconnect backoff (1 s, growing to 120 s) after a peer's death left this
# node unable to identify its successor (no certificate of death for it, and
# no rule E vote) for as long as the backoff lasted.
PEER_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class PeerProbe:
    def __init__(self, me: str, timeout: float, tls: _tls.ClientTLS | None = None, instance: str = ""):
        self.me = me
        self.instance = instance
        self.timeout = timeout
        self.tls = tls
        self._channels: dict[str, grpc.Channel] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="peer-probe")
        self._tls_warned: set[tuple[str, str]] = set()

    def _stub(self, addr: str):
        ch = self._channels.get(addr)
        if ch is None:
            ch = self._channels[addr] = _tls.channel(addr, self.tls, PEER_CHANNEL_OPTIONS)
        return farm_pb2_grpc.FarmStub(ch)

    def ask(self, node: str, addr: str):
        """One EtcdReachability call (the answer names the peer's node id and instance), or None."""
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

    def etcd_down_for_all(self, peers: list[Peer]) -> tuple[bool, str]:
        """Ask every peer at once whether it reaches etcd.

        True only if at least one peer exists and every peer answered, itself
        (the node id and instance of its member record, never this agent),
        as a registered agent, that it cannot reach etcd either. Anything
        else, including an answer from the wrong process (a wildcard or
        shared address that leads back here or elsewhere), counts as "not
        confirmed". The reason names who broke the consensus.
        """
        peers = [p for p in peers if p.id != self.me]
        if not peers:
            return False, "no peer to confirm an etcd outage"
        missing = sorted(p.id for p in peers if not p.addr)
        if missing:
            return False, f"no peer address for {','.join(missing)}"
        jobs = {p.id: self._pool.submit(self.ask, p.id, p.addr) for p in peers}
        return judge_answers(self.me, self.instance, peers, {n: j.result() for n, j in jobs.items()})

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
