"""The gRPC handlers with a stand-in agent: status codes and messages for bad requests,
credentials for changes, the event stream, standard health checking and reflection."""
import os
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from nlbfarm.errors import ConfigError
from nlbfarm.node.events import Event, EventBus
from nlbfarm.node.status import (MAX_STREAMS, PEER_MAX_RPCS, PEER_MAX_STREAMS, READY_SERVICE, ReadyTracker,
                                 read_token, serve_status)
from nlbfarm.proto import farm_pb2, farm_pb2_grpc

TOKEN = "s3cret-token-0123456789abcdef"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


class FakeAgent:
    me = "n1"
    instance = "0123abcd"

    def __init__(self):
        self.drains = {}
        self.events = EventBus()
        self.counter_reads = []  # with_counters of each node_view call

    def node_view(self, with_counters=True):
        self.counter_reads.append(with_counters)
        return {"node_id": "n1", "state": "failed", "state_reason": "check http failing: HTTP 503",
                "generation": 3, "applied_generation": 3, "owned_buckets": 0, "accepting_buckets": 0,
                "draining_buckets": 2, "draining_connections": 5, "accepting_ranges": [(0, 3), (9, 9)],
                "fence_open": True, "etcd_state": "connected", "last_keepalive_age_s": 0.2, "lease_id": "abc",
                "counters": ([{"vip": "198.18.0.100", "rule": "accepted", "packets": 10, "bytes": 600}]
                             if with_counters else []),
                "checks": [{"name": "http", "type": "http", "state": "failing", "last_ok": False,
                            "detail": "HTTP 503", "consecutive": 3, "checked_age_s": 0.1, "transitions": 2,
                            "since_s": 1.5},
                           {"name": "pid", "type": "process", "state": "unknown", "last_ok": None,
                            "detail": "", "consecutive": 0, "checked_age_s": -1.0, "transitions": 0,
                            "since_s": 0.0}],
                "module": "nginx", "restarts_in_window": 1, "last_cycle": "state failed",
                "vips": ["198.18.0.100"], "version": "0.1.0"}

    def status(self):
        return {"node_id": "n1", "cluster": "/nlbfarm/t", "generation": 3, "bucket_count": 64, "members": [],
                "applied_generation": 3, "owned_buckets": 0, "accepting_buckets": 0, "draining_buckets": 0,
                "fence_open": True, "etcd_state": "connected", "last_cycle": "ok", "vips": ["198.18.0.100"]}

    def which(self, ip, port, vip, vip_port=0, protocol=""):
        if vip not in (None, "198.18.0.100"):
            raise ValueError(f"vip {vip} is not one of this farm's VIPs")
        return {"bucket": 7, "node_id": "n2", "generation": 3, "draining_on": ["n1"]}

    def etcd_reachability(self):
        return True, False, 7.5

    def request_drain(self, node, timeout):
        if node != "n2":
            raise KeyError(f"no member named {node!r}")
        self.drains[node] = timeout
        return f"{node} is draining"

    def request_undrain(self, node):
        if node not in self.drains:
            raise KeyError(f"no member named {node!r}")
        return f"{node} takes buckets again"


def _ports(n):
    import socket
    ports = []
    for _ in range(n):
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            ports.append(sk.getsockname()[1])
    return ports


@pytest.fixture
def served():
    """Start a server for a FakeAgent; returns (agent, main stub, peer stub, main channel)."""
    started = []

    def start(token=TOKEN, ready=None, agent=None):
        agent = agent or FakeAgent()
        ports = _ports(2)
        started.extend(serve_status(agent, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", token, ready))
        ch = grpc.insecure_channel(f"127.0.0.1:{ports[0]}")
        return (agent, farm_pb2_grpc.FarmStub(ch),
                farm_pb2_grpc.FarmStub(grpc.insecure_channel(f"127.0.0.1:{ports[1]}")), ch)
    yield start
    for s in started:
        s.stop(None)


class AuthedStub:
    """The main stub with the right token on every call."""

    def __init__(self, stub):
        self._stub = stub

    def __getattr__(self, name):
        fn = getattr(self._stub, name)
        return lambda req, **kw: fn(req, metadata=AUTH, **kw)


@pytest.fixture
def api(served):
    agent, main, peer, _ = served()
    return agent, AuthedStub(main), peer


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
    # Who answers, so the asker can tell its own (or another process's) answer from the peer's.
    assert r.instance == "0123abcd" and r.voting is True


def test_which(api):
    _, main, _ = api
    r = main.Which(farm_pb2.WhichRequest(client_ip="198.18.0.3", client_port=40000), timeout=5)
    assert (r.bucket, r.node_id, list(r.draining_on)) == (7, "n2", ["n1"])
    got, details = code_of(lambda: main.Which(farm_pb2.WhichRequest(client_ip="198.18.0.3", client_port=1,
                                                                    vip="10.1.1.1"), timeout=5))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "not one of this farm's VIPs" in details


# ---- credentials for changes -------------------------------------------------

def test_change_without_a_token_is_unauthenticated(served):
    agent, main, _, _ = served()
    got, details = code_of(lambda: main.Drain(farm_pb2.DrainRequest(node_id="n2"), timeout=5))
    assert got == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in details
    got, details = code_of(lambda: main.Undrain(farm_pb2.UndrainRequest(node_id="n2"), timeout=5,
                                                metadata=(("authorization", "Basic xyz"),)))
    assert got == grpc.StatusCode.UNAUTHENTICATED
    assert agent.drains == {}


def test_change_with_a_wrong_token_is_unauthenticated(served):
    agent, main, _, _ = served()
    got, details = code_of(lambda: main.Drain(farm_pb2.DrainRequest(node_id="n2"), timeout=5,
                                              metadata=(("authorization", "Bearer " + "x" * 28),)))
    assert got == grpc.StatusCode.UNAUTHENTICATED and "wrong token" in details
    assert agent.drains == {}


def test_changes_refused_when_no_token_is_configured(served):
    agent, main, _, _ = served(token=None)
    got, details = code_of(lambda: main.Drain(farm_pb2.DrainRequest(node_id="n2"), timeout=5, metadata=AUTH))
    assert got == grpc.StatusCode.PERMISSION_DENIED and "status.token_file is not configured" in details
    assert agent.drains == {}
    # read-only calls stay open
    assert main.GetStatus(farm_pb2.GetStatusRequest(), timeout=5).node_id == "n1"


def test_peer_address_refuses_changes_even_with_the_token(served):
    agent, _, peer, _ = served()
    got, _ = code_of(lambda: peer.Drain(farm_pb2.DrainRequest(node_id="n2"), timeout=5, metadata=AUTH))
    assert got == grpc.StatusCode.PERMISSION_DENIED and agent.drains == {}


@pytest.mark.parametrize("content, words", [
    ("short\n", "at least 16 characters"),
    ("two words-0123456789\n", "without spaces"),
    ("", "at least 16"),
])
def test_read_token_rejects_bad_files(tmp_path, content, words):
    p = tmp_path / "token"
    p.write_text(content)
    with pytest.raises(ConfigError, match=words):
        read_token(str(p))


def test_read_token(tmp_path):
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    os.chmod(p, 0o600)
    assert read_token(str(p)) == TOKEN
    with pytest.raises(ConfigError, match="status.token_file: cannot read"):
        read_token(str(tmp_path / "missing"))


# ---- node view and events ------------------------------------------------------

def test_get_node(api):
    _, main, _ = api
    v = main.GetNode(farm_pb2.GetNodeRequest(), timeout=5)
    assert (v.state, v.state_reason) == ("failed", "check http failing: HTTP 503")
    assert [(r.first, r.last) for r in v.accepting_ranges] == [(0, 3), (9, 9)]
    assert [(c.vip, c.rule, c.packets, c.bytes) for c in v.counters] == [("198.18.0.100", "accepted", 10, 600)]
    assert [(c.name, c.state, c.last_ok) for c in v.checks] == [("http", "failing", False),
                                                                 ("pid", "unknown", False)]
    assert v.module == "nginx" and v.restarts_in_window == 1 and v.draining_connections == 5


def test_events_replay_then_end(api):
    agent, main, _ = api
    agent.events.publish("member_joined", "n2", "n2 joined as active", state="active")
    agent.events.publish("table_changed", "", "table generation 4: n1=32, n2=32", generation=4)
    got = list(main.WatchEvents(farm_pb2.WatchEventsRequest(replay=True, follow=False), timeout=5))
    assert [(e.seq, e.kind, e.node_id) for e in got] == [(1, "member_joined", "n2"), (2, "table_changed", "")]
    assert got[1].fields["generation"] == "4"


def test_events_follow_sees_new_events(api):
    agent, main, _ = api
    agent.events.publish("member_joined", "n2", "old news")
    call = main.WatchEvents(farm_pb2.WatchEventsRequest(replay=False, follow=True), timeout=10)

    def later():
        time.sleep(0.3)
        agent.events.publish("check_transition", "n1", "check http passing -> failing: HTTP 503",
                             check="http", old="passing", new="failing")
    threading.Thread(target=later, daemon=True).start()
    first = next(iter(call))
    call.cancel()
    assert (first.kind, first.fields["new"]) == ("check_transition", "failing")


def test_event_bus_reports_what_a_slow_follower_missed():
    bus = EventBus(capacity=3)
    for i in range(5):
        bus.publish("table_changed", "", f"generation {i}")
    got = bus.since(0)
    assert got[0].kind == "missed" and got[0].fields["count"] == "2"
    assert [e.message for e in got[1:]] == ["generation 2", "generation 3", "generation 4"]
    assert bus.since(5) == []
    with pytest.raises(ValueError, match="unknown event kind"):
        bus.publish("nonsense", "", "x")


# ---- standard health checking and reflection -------------------------------------

def test_health_service_and_readiness(served):
    ready = ReadyTracker()
    _, _, _, ch = served(ready=ready)
    health = health_pb2_grpc.HealthStub(ch)
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="nlbfarm.v1.Farm"), timeout=5).status == SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service=READY_SERVICE), timeout=5).status == NOT_SERVING
    ready.set_ready(True)
    assert health.Check(health_pb2.HealthCheckRequest(service=READY_SERVICE), timeout=5).status == SERVING
    got, _ = code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5))
    assert got == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_api(served):
    _, _, _, ch = served()
    db = ProtoReflectionDescriptorDatabase(ch)
    services = set(db.get_services())
    assert {"nlbfarm.v1.Farm", "grpc.health.v1.Health"} <= services
    fd = db.FindFileContainingSymbol("nlbfarm.v1.Farm")
    methods = {m.name for m in fd.service[0].method}
    assert {"GetStatus", "GetNode", "WatchEvents", "Drain", "Undrain", "Which", "GetTable"} <= methods


# ---- the peer listener: limits, no kernel counters ---------------------------------

class SlowAgent(FakeAgent):
    """GetStatus blocks until released: a call the agent is slow to answer."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.inside = threading.Semaphore(0)

    def status(self):
        self.inside.release()
        self.release.wait(10)
        return super().status()


def _wait_until(cond, seconds):
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_regression_peer_listener_flood_is_refused_instead_of_queueing(served):
    agent = SlowAgent()
    _, main, peer, main_ch = served(agent=agent)
    extra = 4
    calls = [peer.GetStatus.future(farm_pb2.GetStatusRequest(), timeout=10) for _ in range(PEER_MAX_RPCS + extra)]
    try:
        for _ in range(PEER_MAX_RPCS):
            assert agent.inside.acquire(timeout=5), "the peer listener ran fewer calls at once than its limit"
        # The extra calls are refused at once, while the admitted ones are still inside the agent.
        assert _wait_until(lambda: sum(c.done() for c in calls) >= extra, 3)
        refused = [c for c in calls if c.done()]
        assert len(refused) == extra and not agent.release.is_set()
        assert {c.code() for c in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert not agent.inside.acquire(timeout=0.1), "a call beyond the limit reached the agent"
        # The main listener has its own threads: it still answers.
        assert main.GetNode(farm_pb2.GetNodeRequest(), timeout=5).node_id == "n1"
        health = health_pb2_grpc.HealthStub(main_ch)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        agent.release.set()
    assert [c.result(timeout=5).node_id for c in calls if c not in refused] == ["n1"] * PEER_MAX_RPCS

    def answers():
        try:
            return peer.EtcdReachability(farm_pb2.EtcdReachabilityRequest(asking_node="n2"), timeout=5).node_id
        except grpc.RpcError:  # the server may not have counted the finished calls out yet
            return None
    assert _wait_until(lambda: answers() == "n1", 3), "the peer listener did not recover after the flood"


def test_regression_peer_event_streams_cannot_use_up_the_operators_streams(served):
    agent, main, peer, _ = served()
    agent.events.publish("member_joined", "n2", "n2 joined")
    opened = []

    def follow(stub):
        call = stub.WatchEvents(farm_pb2.WatchEventsRequest(replay=True, follow=True), timeout=30)
        opened.append(call)
        next(call)  # the replayed event: the server counts this stream now
        return call

    try:
        for _ in range(PEER_MAX_STREAMS):
            follow(peer)
        got, details = code_of(lambda: follow(peer))
        assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and f"at most {PEER_MAX_STREAMS} event streams" in details
        # Followers on the peer address leave threads to the peers' own calls ...
        r = peer.EtcdReachability(farm_pb2.EtcdReachabilityRequest(asking_node="n2"), timeout=5)
        assert r.node_id == "n1"
        # ... and take none of the operator's streams on the main listener.
        for _ in range(MAX_STREAMS):
            follow(main)
    finally:
        for c in opened:
            c.cancel()


def test_regression_peer_get_node_does_not_read_kernel_counters(api):
    agent, main, peer = api
    v = peer.GetNode(farm_pb2.GetNodeRequest(), timeout=5)
    assert agent.counter_reads == [False]
    assert list(v.counters) == [] and v.state == "failed" and v.draining_connections == 5
    assert len(main.GetNode(farm_pb2.GetNodeRequest(), timeout=5).counters) == 1
    assert agent.counter_reads == [False, True]


# ---- integer fields out of range -------------------------------------------------

HUGE = 2**70
U32, U64 = 2**32 - 1, 2**64 - 1


class OneEventBus:
    """A bus holding one event whose sequence number no uint64 holds."""
    closed = True
    last_seq = 0

    def since(self, _seq):
        return [Event(HUGE, 0.0, "table_changed", "", "generation 2**70")]


class HugeAgent(FakeAgent):
    """Numbers no uint32/uint64 holds, as a corrupt etcd value or a bookkeeping bug would give."""

    def __init__(self):
        super().__init__()
        self.events = OneEventBus()

    def status(self):
        st = super().status()
        st.update(generation=HUGE, bucket_count=-1, applied_generation=-5, owned_buckets=2**32,
                  members=[{"id": "n2", "weight": 2**40, "state": "active", "applied_generation": -1,
                            "buckets": HUGE, "draining_connections": -3}])
        return st

    def node_view(self, with_counters=True):
        v = super().node_view(with_counters)
        v.update(generation=HUGE, applied_generation=-1, draining_connections=2**32,
                 accepting_ranges=[(-1, 2**33)],
                 counters=[{"vip": "198.18.0.100", "rule": "accepted", "packets": HUGE, "bytes": -1}])
        v["checks"][0].update(consecutive=-1, transitions=HUGE)
        return v

    def table_view(self):
        return {"generation": HUGE, "bucket_count": 2**32, "unowned": -1,
                "nodes": [{"node_id": "n1", "buckets": -1, "ranges": [(0, HUGE)]}]}

    def which(self, *args):
        return {"bucket": -7, "node_id": "n2", "generation": HUGE, "draining_on": [], "rule": "r"}


def test_regression_out_of_range_integers_are_clamped_not_an_unknown_error(served):
    _, main, _, _ = served(agent=HugeAgent())
    st = main.GetStatus(farm_pb2.GetStatusRequest(), timeout=5)
    assert (st.generation, st.bucket_count, st.applied_generation, st.owned_buckets) == (U64, 0, 0, U32)
    m = st.members[0]
    assert (m.weight, m.applied_generation, m.buckets, m.draining_connections) == (U32, 0, U32, 0)
    v = main.GetNode(farm_pb2.GetNodeRequest(), timeout=5)
    assert (v.generation, v.applied_generation, v.draining_connections) == (U64, 0, U32)
    assert [(r.first, r.last) for r in v.accepting_ranges] == [(0, U32)]
    assert [(c.packets, c.bytes) for c in v.counters] == [(U64, 0)]
    assert (v.checks[0].consecutive, v.checks[0].transitions) == (0, U64)
    t = main.GetTable(farm_pb2.GetTableRequest(), timeout=5)
    assert (t.generation, t.bucket_count, t.unowned, t.nodes[0].buckets) == (U64, U32, 0, 0)
    assert [(r.first, r.last) for r in t.nodes[0].ranges] == [(0, U32)]
    w = main.Which(farm_pb2.WhichRequest(client_ip="198.18.0.3", client_port=1), timeout=5)
    assert (w.bucket, w.generation, w.node_id) == (0, U64, "n2")
    events = list(main.WatchEvents(farm_pb2.WatchEventsRequest(replay=True, follow=False), timeout=5))
    assert [e.seq for e in events] == [U64]


def test_farmctl_version_shows_client_and_agent(capsys):
    import json

    from nlbfarm import __version__, cli
    port, peer_port = _ports(2)
    servers = serve_status(FakeAgent(), f"127.0.0.1:{port}", f"127.0.0.1:{peer_port}", TOKEN, None)
    try:
        assert cli.main(["version", "--target", f"127.0.0.1:{port}"]) == cli.EXIT_OK
        assert capsys.readouterr().out == f"farmctl {__version__}\nfarmd 0.1.0 on n1 (127.0.0.1:{port})\n"
        assert cli.main(["version", "--target", f"127.0.0.1:{port}", "--json"]) == cli.EXIT_OK
        assert json.loads(capsys.readouterr().out) == {
            "client": __version__, "agent": {"node_id": "n1", "version": "0.1.0", "target": f"127.0.0.1:{port}"}}
    finally:
        for s in servers:
            s.stop(None)


def test_farmctl_version_without_an_agent_names_the_target(capsys):
    from nlbfarm import cli
    (port,) = _ports(1)
    assert cli.main(["version", "--target", f"127.0.0.1:{port}", "--rpc-timeout", "1"]) == cli.EXIT_UNREACHABLE
    out, err = capsys.readouterr()
    assert out.startswith("farmctl ") and f"127.0.0.1:{port}" in err and "Traceback" not in err
