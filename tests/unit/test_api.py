"""The gRPC handlers with a stand-in agent: status codes and messages for bad requests."""
import grpc
import pytest

from nlbfarm.node.status import serve_status
from nlbfarm.proto import farm_pb2, farm_pb2_grpc


class FakeAgent:
    me = "n1"

    def __init__(self):
        self.drains = {}

    def status(self):
        return {"node_id": "n1", "cluster": "/nlbfarm/t", "generation": 3, "bucket_count": 64, "members": [],
                "applied_generation": 3, "owned_buckets": 0, "accepting_buckets": 0, "draining_buckets": 0,
                "fence_open": True, "etcd_state": "connected", "last_cycle": "ok", "vips": ["198.18.0.100"]}

    def which(self, ip, port, vip):
        if vip not in (None, "198.18.0.100"):
            raise ValueError(f"vip {vip} is not one of this farm's VIPs")
        return {"bucket": 7, "node_id": "n2", "generation": 3, "draining_on": ["n1"]}

    def etcd_reachability(self):
        return False, 7.5

    def request_drain(self, node, timeout):
        if node != "n2":
            raise KeyError(f"no member named {node!r}")
        self.drains[node] = timeout
        return f"{node} is draining"

    def request_undrain(self, node):
        if node not in self.drains:
            raise KeyError(f"no member named {node!r}")
        return f"{node} takes buckets again"


@pytest.fixture
def api():
    import socket
    agent = FakeAgent()
    ports = []
    for _ in range(2):
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            ports.append(sk.getsockname()[1])
    servers = serve_status(agent, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}")
    main = farm_pb2_grpc.FarmStub(grpc.insecure_channel(f"127.0.0.1:{ports[0]}"))
    peer = farm_pb2_grpc.FarmStub(grpc.insecure_channel(f"127.0.0.1:{ports[1]}"))
    yield agent, main, peer
    for s in servers:
        s.stop(None)


def code_of(call):
    with pytest.raises(grpc.RpcError) as ei:
        call()
    return ei.value.code(), ei.value.details()


def test_drain_and_undrain(api):
    agent, main, _ = api
    r = main.Drain(farm_pb2.DrainRequest(node_id="n2", timeout_s=30), timeout=5)
    assert r.message == "n2 is draining" and agent.drains == {"n2": 30}
    assert main.Undrain(farm_pb2.UndrainRequest(node_id="n2"), timeout=5).message == "n2 takes buckets again"


@pytest.mark.parametrize("req, code, words", [
    (farm_pb2.DrainRequest(node_id="nx"), grpc.StatusCode.NOT_FOUND, "no member named 'nx'"),
    (farm_pb2.DrainRequest(node_id=""), grpc.StatusCode.INVALID_ARGUMENT, "node_id is required"),
    (farm_pb2.DrainRequest(node_id="n2", timeout_s=-1), grpc.StatusCode.INVALID_ARGUMENT,
     "timeout_s must be from 0 to 86400 seconds, got -1"),
    (farm_pb2.DrainRequest(node_id="n2", timeout_s=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "timeout_s"),
])
def test_bad_drain_requests(api, req, code, words):
    _, main, _ = api
    got, details = code_of(lambda: main.Drain(req, timeout=5))
    assert got == code and words in details


def test_peer_address_is_read_only(api):
    agent, _, peer = api
    got, details = code_of(lambda: peer.Drain(farm_pb2.DrainRequest(node_id="n2"), timeout=5))
    assert got == grpc.StatusCode.PERMISSION_DENIED and "peer address" in details
    assert agent.drains == {}
    assert peer.GetStatus(farm_pb2.GetStatusRequest(), timeout=5).node_id == "n1"
    r = peer.EtcdReachability(farm_pb2.EtcdReachabilityRequest(asking_node="n2"), timeout=5)
    assert r.node_id == "n1" and r.reachable is False and r.last_success_age_s == 7.5


def test_which(api):
    _, main, _ = api
    r = main.Which(farm_pb2.WhichRequest(client_ip="198.18.0.3", client_port=40000), timeout=5)
    assert (r.bucket, r.node_id, list(r.draining_on)) == (7, "n2", ["n1"])
    got, details = code_of(lambda: main.Which(farm_pb2.WhichRequest(client_ip="198.18.0.3", client_port=1,
                                                                    vip="10.1.1.1"), timeout=5))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "not one of this farm's VIPs" in details
