"""Hitless restarts' pure rules and the state file (node/handoff.py)."""
import json
import os
from dataclasses import replace
from types import MappingProxyType

import pytest

from nlbfarm.coordinator.cluster import Member
from nlbfarm.node.dataplane import fence_left_s
from nlbfarm.node.decide import LeaseView, Timing
from nlbfarm.node.handoff import (
    MAX_STATE_BYTES, AdoptRefusal, HandoffRefusal, HandoffState, adoption_refusal, continuity_refusal,
    handoff_refusal, predecessor_alive, process_start,
    handoff_until, local_after_adoption, read_state, state_path, write_state)

T = Timing(3, 1, 0.5, 1.0)
STATE = HandoffState(node_id="n1", prefix="/nlbfarm/web", boot_id="b1", instance="i1", pid=42, pid_start=4242, lease_id=7,
                     revision=55, applied_lease=8, table="nlbfarm", interface="eth0", accepting=((0, 9), (20, 20)),
                     draining=((30, 31),), guarded=((40, 40),),
                     drains=MappingProxyType({30: (100.0, 50.0), 31: (101.0, 50.0)}), acquire_after=12.5,
                     checks=MappingProxyType({"http": ("passing", "HTTP 200")}), handing_over_until=99.0)
RECORD = Member("n1", 1, "active", instance="i1")


def test_state_round_trips():
    assert HandoffState.decode(STATE.encode()) == STATE


@pytest.mark.parametrize("raw, problem", [
    (b"", "not JSON"),
    (b"[]", "not a version 1 state object"),
    (json.dumps({**json.loads(STATE.encode()), "version": 2}).encode(), "not a version 1"),
    (json.dumps({**json.loads(STATE.encode()), "lease_id": -1}).encode(), "lease_id must be an integer"),
    (json.dumps({**json.loads(STATE.encode()), "lease_id": True}).encode(), "lease_id must be an integer"),
    (json.dumps({**json.loads(STATE.encode()), "accepting": [[5, 2]]}).encode(), "accepting entries"),
    (json.dumps({**json.loads(STATE.encode()), "accepting": [[0, 70000]]}).encode(), "accepting entries"),
    (json.dumps({**json.loads(STATE.encode()), "drains": [[1, "x", 2]]}).encode(), "drains entries"),
    (json.dumps({**json.loads(STATE.encode()), "acquire_after": 1e300}).encode(), "acquire_after"),
    (json.dumps({**json.loads(STATE.encode()), "checks": {"a": ["passing"]}}).encode(), "checks entries"),
    (json.dumps({**json.loads(STATE.encode()), "node_id": "x" * 300}).encode(), "node_id must be a string"),
    (b" " * (MAX_STATE_BYTES + 1), "larger than"),
])
def test_a_bad_state_file_is_refused_by_name(raw, problem):
    with pytest.raises(ValueError, match=problem):
        HandoffState.decode(raw)


def test_the_file_is_written_atomically_for_root_only(tmp_path):
    path = state_path(str(tmp_path / "run"), "web", "n1")
    write_state(path, STATE)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "run").st_mode & 0o777) == "0o700"
    assert read_state(path) == (STATE, "")
    assert os.listdir(tmp_path / "run") == [os.path.basename(path)]


def test_a_missing_garbled_or_linked_file_is_no_state(tmp_path):
    path = str(tmp_path / "s.json")
    assert read_state(path) == (None, AdoptRefusal.NO_STATE.value)
    (tmp_path / "s.json").write_bytes(b"{garbled")
    state, why = read_state(path)
    assert state is None and why.startswith("state file unreadable: not JSON")
    os.unlink(path)
    (tmp_path / "real.json").write_bytes(STATE.encode())
    os.symlink(tmp_path / "real.json", path)
    state, why = read_state(path)
    assert state is None and "unreadable" in why


# Adoption: table-driven, each row one reason a successor must start from nothing.
ADOPT_CASES = [
    ("adopts", STATE, "n1", "/nlbfarm/web", "b1", 7, RECORD, None),
    ("no file", None, "n1", "/nlbfarm/web", "b1", 7, RECORD, AdoptRefusal.NO_STATE),
    ("another node", STATE, "n2", "/nlbfarm/web", "b1", 7, RECORD, AdoptRefusal.OTHER_NODE),
    ("another cluster", STATE, "n1", "/nlbfarm/web2", "b1", 7, RECORD, AdoptRefusal.OTHER_NODE),
    ("rebooted", STATE, "n1", "/nlbfarm/web", "b2", 7, RECORD, AdoptRefusal.OTHER_BOOT),
    ("record gone", STATE, "n1", "/nlbfarm/web", "b1", None, None, AdoptRefusal.NO_RECORD),
    ("record garbled", STATE, "n1", "/nlbfarm/web", "b1", 7, None, AdoptRefusal.OTHER_INSTANCE),
    ("another process registered", STATE, "n1", "/nlbfarm/web", "b1", 7, replace(RECORD, instance="i2"),
     AdoptRefusal.OTHER_INSTANCE),
    ("re-registered with a new lease", STATE, "n1", "/nlbfarm/web", "b1", 9, RECORD, AdoptRefusal.OTHER_LEASE),
]


@pytest.mark.parametrize("name, state, me, prefix, boot, lease, record, expected", ADOPT_CASES,
                         ids=[c[0] for c in ADOPT_CASES])
def test_adoption_refusal(name, state, me, prefix, boot, lease, record, expected):
    assert adoption_refusal(state, me, prefix, boot, lease, record) is expected


FRESH = LeaseView(registered=True, lease_id=7, applied_lease=8, last_ok_sent=100.0)
HANDOFF_CASES = [
    ("fresh", FRESH, 100.2, {}, None),
    ("not registered", LeaseView(), 100.2, {}, HandoffRefusal.NOT_REGISTERED),
    ("lease lost", replace(FRESH, lost=True), 100.2, {}, HandoffRefusal.NOT_REGISTERED),
    ("leaving", FRESH, 100.2, {"leaving": True}, HandoffRefusal.LEAVING),
    ("no ruleset", FRESH, 100.2, {"ruleset": False}, HandoffRefusal.NO_RULESET),
    ("keepalive late", FRESH, 101.1, {}, HandoffRefusal.KEEPALIVE_LATE),
    ("link down", FRESH, 100.2, {"link_up": False}, HandoffRefusal.FENCE_CLOSED),
    ("own record gone", FRESH, 100.2, {"member_present": False}, HandoffRefusal.FENCE_CLOSED),
    ("loop stuck", replace(FRESH, loop_stuck=True), 100.2, {}, HandoffRefusal.FENCE_CLOSED),
]


@pytest.mark.parametrize("name, view, now, kw, expected", HANDOFF_CASES, ids=[c[0] for c in HANDOFF_CASES])
def test_handoff_refusal(name, view, now, kw, expected):
    args = {"leaving": False, "ruleset": True, "link_up": True, "member_present": True, **kw}
    assert handoff_refusal(view, T, now, **args) is expected


def test_the_held_element_ends_with_the_lease_deadline_never_rule_e():
    assert handoff_until(FRESH, T, True, True) == pytest.approx(100.0 + 3 - 0.2)
    # Under rule E the deadline is the peers' consensus: no successor can adopt without etcd.
    assert handoff_until(replace(FRESH, consensus_at=101.0), T, True, True) is None
    assert handoff_until(FRESH, T, False, True) is None


def test_the_successor_starts_with_the_kernel_and_drains_but_nothing_published():
    local = local_after_adoption(STATE, "active", "no checks configured")
    assert local.accepting == frozenset(range(0, 10)) | {20}
    assert dict(local.draining) == {30: (100.0, 50.0), 31: (101.0, 50.0)}
    assert local.published is None and local.node_state == "active"


def test_member_record_marks_a_handover_only_when_true():
    assert b"handing_over" not in RECORD.encode()
    marked = replace(RECORD, handing_over=True)
    assert Member.decode("n1", marked.encode()) == marked
    with pytest.raises(ValueError, match="handing_over must be true or false"):
        Member.decode("n1", json.dumps({"id": "n1", "weight": 1, "handing_over": "yes"}).encode())


@pytest.mark.parametrize("listing, left", [
    ('elements = { "eth0" timeout 2s500ms expires 2s176ms }', 2.177),
    ('elements = { "eth0" timeout 300ms expires 87ms }', 0.088),
    ('elements = { "eth0" timeout 1m expires 59s999ms }', 60.0),
    ('elements = { "eth1" timeout 1s expires 900ms }', 0.0),
    ('set fence { type ifname; flags timeout }', 0.0),
    ('elements = { "eth0" timeout 1s expires 9xs }', 0.0),
    ("", 0.0),
])
def test_fence_left_is_read_from_the_text_listing_rounded_up(listing, left):
    assert fence_left_s(listing, "eth0") == pytest.approx(left)


def test_continuity_needs_a_live_element_and_no_older_history():
    assert continuity_refusal(STATE, 0.5, 55) is None
    assert continuity_refusal(STATE, 0.5, 60) is None
    assert continuity_refusal(STATE, 0.0, 60) is AdoptRefusal.FENCE_LAPSED
    assert continuity_refusal(STATE, 0.5, 54) is AdoptRefusal.REWOUND


def test_a_predecessor_is_alive_only_with_its_own_start_time():
    me = os.getpid()
    assert process_start(me) is not None
    parent = os.getppid()
    assert predecessor_alive(replace(STATE, pid=parent, pid_start=process_start(parent)))
    assert not predecessor_alive(replace(STATE, pid=parent, pid_start=process_start(parent) + 1))  # reused pid
    assert not predecessor_alive(replace(STATE, pid=me, pid_start=process_start(me)))  # this very process
    assert not predecessor_alive(replace(STATE, pid=2 ** 22 + 7))
