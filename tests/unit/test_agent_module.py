"""The reconcile loop's farm-module decisions, with stand-ins for etcd, the kernel and the checks."""
import pytest

from nlbfarm.config import parse_config
from nlbfarm.coordinator.cluster import Member
from nlbfarm.node.agent import Agent
from nlbfarm.node.checks import CheckStatus


class Nothing:
    """Store, data plane and VIP stand-ins: the decisions tested here touch none of them."""

    def __getattr__(self, name):
        raise AssertionError(f"unexpected call {name}")


class FakeHealth:
    def __init__(self):
        self.state, self.detail, self.cause = "passing", "HTTP 200", "HTTP 200"

    def failing(self):
        return ["http"] if self.state == "failing" else []

    def healthy(self):
        return self.state == "passing"

    def statuses(self):
        return (CheckStatus("http", "http", self.state, self.state == "passing", self.detail, 1, 0.1, 1, 1.0,
                            self.cause),)

    def start(self):
        pass

    def stop(self):
        pass


class FakeModule:
    def __init__(self, limit):
        self.limit, self.restarts = limit, 0

    def may_restart(self):
        return self.restarts < self.limit

    def restarts_in_window(self):
        return self.restarts


def make_agent(on_failure="restart", limit=2):
    cfg = parse_config({
        "node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100"]}, "etcd": {"endpoints": ["127.0.0.1:2379"]},
        "timing": {"leave_timeout": 5},
        "module": {"start": "true", "stop": "true", "on_failure": on_failure, "restart_limit": limit,
                   "checks": [{"name": "http", "type": "http", "url": "http://127.0.0.1/",
                               "interval": 0.1, "timeout": 0.1, "rise": 1, "fall": 1}]}})
    a = Agent(cfg, store=Nothing(), dataplane=Nothing(), vip=Nothing())
    a.health = FakeHealth()
    a.module = FakeModule(limit)
    a._module_started = True
    a.ran = []

    def run(action):
        a.ran.append(action)
        if action == "restart":
            a.module.restarts += 1
        if action == "stop":
            pass
    a._run_module = run
    return a


def failed_member(reason="check http failing: connect refused"):
    return Member("n1", 1, "failed", reason=reason)


def test_reason_is_the_cause_not_the_latest_probe():
    a = make_agent()
    a.health.state, a.health.cause, a.health.detail = "failing", "connect refused", "HTTP 200"
    assert a._desired_state(None) == ("failed", "check http failing: connect refused")
    a.health.detail = "HTTP 503 (expected 2xx/3xx)"  # a later probe: the reason must not change
    assert a._desired_state(None) == ("failed", "check http failing: connect refused")


def test_states_from_checks():
    a = make_agent()
    assert a._desired_state(None) == ("active", "all checks passing")
    a.health.state = "unknown"
    assert a._desired_state(None) == ("starting", "waiting for checks to pass: http")
    a._module_started = False
    assert a._desired_state(None)[0] == "starting"


def test_restart_waits_until_withdrawn_then_respects_the_limit(monkeypatch):
    a = make_agent(limit=2)
    clock = [1000.0]
    monkeypatch.setattr("nlbfarm.node.agent.time.monotonic", lambda: clock[0])
    a._module_idle_since = 0.0
    a.health.state = "failing"
    a.state.accepting = frozenset({1, 2})
    a._module_action("failed", Member("n1", 1, "active"))  # not yet announced
    a._module_action("failed", failed_member())  # announced, but still accepting buckets
    assert a.ran == []
    a.state.accepting = frozenset()
    a._module_action("failed", failed_member())
    assert a.ran == ["restart"]
    a._module_idle_since = clock[0]
    a._module_action("failed", failed_member())  # a restarted app gets a check window first
    assert a.ran == ["restart"]
    clock[0] += 10
    a._module_action("failed", failed_member())
    assert a.ran == ["restart", "restart"]
    clock[0] += 10
    a._module_action("failed", failed_member())  # limit 2 reached: loop protection
    assert a.ran == ["restart", "restart"] and a._restarts_exhausted
    assert a._desired_state(None)[1].endswith("restart limit reached")
    a.module.restarts = 0  # the window slid by: still no restart until healthy again
    clock[0] += 1000
    a._module_action("failed", failed_member())
    assert a.ran == ["restart", "restart"]
    a._module_action("active", Member("n1", 1, "active"))
    assert not a._restarts_exhausted


def test_leave_timeout_bounds_the_wait_for_withdrawal(monkeypatch):
    a = make_agent()
    clock = [1000.0]
    monkeypatch.setattr("nlbfarm.node.agent.time.monotonic", lambda: clock[0])
    a._module_idle_since = 0.0
    a.state.accepting = frozenset({1})
    a._module_action("failed", failed_member())
    assert a.ran == []
    clock[0] += 6  # leave_timeout 5 s
    a._module_action("failed", failed_member())
    assert a.ran == ["restart"]


@pytest.mark.parametrize("on_failure, ran, state", [("stop", ["stop"], "stopped"), ("withdraw", [], "failed")])
def test_stop_and_withdraw_actions(on_failure, ran, state):
    a = make_agent(on_failure=on_failure)
    a.health.state = "failing"
    a._module_action("failed", failed_member())
    a._module_action("failed", failed_member())
    assert a.ran == ran
    assert a._desired_state(None)[0] == state


def test_failed_start_without_checks_is_a_failure():
    a = make_agent()
    a.cfg = a.cfg.model_copy(update={"module": a.cfg.module.model_copy(update={"checks": ()})})
    a._start_failed = "exit 1: nginx: [emerg] bind() to 0.0.0.0:80 failed"
    assert a._desired_state(None) == ("failed", "app failed to start: exit 1: nginx: [emerg] bind() to "
                                                "0.0.0.0:80 failed")


@pytest.mark.parametrize("client, vip, words", [
    ("2001:db8::3", "198.18.0.100", "are not of the same address family"),
    ("198.18.0.3", "2001:db8::100", "are not of the same address family"),
    ("2001:db8::zz", None, "is not an IP address"),
])
def test_which_refuses_a_client_of_the_other_family(client, vip, words):
    cfg = parse_config({"node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100", "2001:db8::100"]},
                        "etcd": {"endpoints": ["127.0.0.1:2379"]}})
    a = Agent(cfg, store=Nothing(), dataplane=Nothing(), vip=Nothing())
    with pytest.raises(ValueError, match=words):
        a.which(client, 40000, vip, 80, "tcp")


def test_which_without_a_vip_of_the_client_family():
    cfg = parse_config({"node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100"]},
                        "etcd": {"endpoints": ["127.0.0.1:2379"]}})
    a = Agent(cfg, store=Nothing(), dataplane=Nothing(), vip=Nothing())
    with pytest.raises(ValueError, match="has no IPv6 VIP"):
        a.which("2001:db8::3", 40000, None, 80, "tcp")
