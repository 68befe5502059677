"""The farm module's decisions (the supervisor the loop asks), with stand-ins for the checks."""
import threading

import pytest

from nlbfarm.config import parse_config
from nlbfarm.coordinator.cluster import Member
from nlbfarm.node.agent import Agent
from nlbfarm.node.checks import CheckStatus
from nlbfarm.node.events import EventBus
from nlbfarm.node.supervisor import ModuleSupervisor


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


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def make_supervisor(on_failure="restart", limit=2, checks=True, clock=None):
    cfg = parse_config({
        "node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100"]}, "etcd": {"endpoints": ["127.0.0.1:2379"]},
        "timing": {"leave_timeout": 5},
        "module": {"start": "true", "stop": "true", "on_failure": on_failure, "restart_limit": limit,
                   "checks": [{"name": "http", "type": "http", "url": "http://127.0.0.1/",
                               "interval": 0.1, "timeout": 0.1, "rise": 1, "fall": 1}] if checks else []}})
    s = ModuleSupervisor("n1", cfg.module, cfg.timing.leave_timeout, env={}, wake=threading.Event(),
                         events=EventBus(), stopping=threading.Event(), clock=clock or Clock())
    s.health = FakeHealth()
    s.module = FakeModule(limit)
    s.started = True
    s.ran = []

    def run(action):
        s.ran.append(action)
        if action == "restart":
            s.module.restarts += 1
    s.run = run
    return s


def failed_member(reason="check http failing: connect refused"):
    return Member("n1", 1, "failed", reason=reason)


def desired(s):
    return s.desired_state(leaving=False, drain_requested=False)


def test_reason_is_the_cause_not_the_latest_probe():
    s = make_supervisor()
    s.health.state, s.health.cause, s.health.detail = "failing", "connect refused", "HTTP 200"
    assert desired(s) == ("failed", "check http failing: connect refused")
    s.health.detail = "HTTP 503 (expected 2xx/3xx)"  # a later probe: the reason must not change
    assert desired(s) == ("failed", "check http failing: connect refused")


def test_states_from_checks():
    s = make_supervisor()
    assert desired(s) == ("active", "all checks passing")
    assert s.desired_state(leaving=False, drain_requested=True) == ("draining",
                                                                    "an operator asked this node to drain")
    assert s.desired_state(leaving=True, drain_requested=True)[0] == "leaving"
    s.health.state = "unknown"
    assert desired(s) == ("starting", "waiting for checks to pass: http")
    s.started = False
    assert desired(s)[0] == "starting"


def test_restart_waits_until_withdrawn_then_respects_the_limit():
    clock = Clock()
    s = make_supervisor(limit=2, clock=clock)
    s.idle_since = 0.0
    s.health.state = "failing"
    s.after_cycle("failed", Member("n1", 1, "active"), True)  # not yet announced
    s.after_cycle("failed", failed_member(), True)  # announced, but still accepting buckets
    assert s.ran == []
    s.after_cycle("failed", failed_member(), False)
    assert s.ran == ["restart"]
    s.idle_since = clock.t
    s.after_cycle("failed", failed_member(), False)  # a restarted app gets a check window first
    assert s.ran == ["restart"]
    clock.t += 10
    s.after_cycle("failed", failed_member(), False)
    assert s.ran == ["restart", "restart"]
    clock.t += 10
    s.after_cycle("failed", failed_member(), False)  # limit 2 reached: loop protection
    assert s.ran == ["restart", "restart"] and s.restarts_exhausted
    assert desired(s)[1].endswith("restart limit reached")
    s.module.restarts = 0  # the window slid by: still no restart until healthy again
    clock.t += 1000
    s.after_cycle("failed", failed_member(), False)
    assert s.ran == ["restart", "restart"]
    s.after_cycle("active", Member("n1", 1, "active"), False)
    assert not s.restarts_exhausted


def test_leave_timeout_bounds_the_wait_for_withdrawal():
    clock = Clock()
    s = make_supervisor(clock=clock)
    s.idle_since = 0.0
    s.after_cycle("failed", failed_member(), True)
    assert s.ran == []
    clock.t += 6  # leave_timeout 5 s
    s.after_cycle("failed", failed_member(), True)
    assert s.ran == ["restart"]


@pytest.mark.parametrize("on_failure, ran, state", [("stop", ["stop"], "stopped"), ("withdraw", [], "failed")])
def test_stop_and_withdraw_actions(on_failure, ran, state):
    s = make_supervisor(on_failure=on_failure)
    s.health.state = "failing"
    s.after_cycle("failed", failed_member(), False)
    s.after_cycle("failed", failed_member(), False)
    assert s.ran == ran
    assert desired(s)[0] == state


def test_failed_start_without_checks_is_a_failure():
    s = make_supervisor(checks=False)
    s.start_failed = "exit 1: nginx: [emerg] bind() to 0.0.0.0:80 failed"
    assert desired(s) == ("failed", "app failed to start: exit 1: nginx: [emerg] bind() to "
                                    "0.0.0.0:80 failed")


class LinkDown:
    def link_up(self):
        return False


def test_regression_link_down_withdraws_through_the_table():
    # The LAN link went down while etcd stayed reachable another way: the fence
    # closes, so the node must announce failed (peers take its buckets) rather
    # than stay active and black-hole its share.
    cfg = parse_config({"node": {"id": "n1", "interface": "lan0"}, "cluster": {"vips": ["198.18.0.100"]},
                        "etcd": {"endpoints": ["127.0.0.1:2379"]}})
    a = Agent(cfg, store=Nothing(), dataplane=Nothing(), vip=LinkDown())
    assert a._desired_state(None) == ("failed", "link lan0 is down")
    a.leave_started = 1.0
    assert a._desired_state(None)[0] == "leaving"


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
