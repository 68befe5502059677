"""The fence invariant where the kernel gets it: no element outlives its deadline.

``DataPlane`` runs against a fake libnftables that records every fence
element it is given and lets the clock run while a transaction is "in the
kernel" (a slow nft, a paused process). Whatever the delay between the
decision and the commit, the element's expiry must not pass the deadline,
which itself never passes ``last_ok_sent + lease_ttl - margin`` outside rule E.
"""
import math
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from nlbfarm.errors import DataPlaneError

from nlbfarm.node.dataplane import DataPlane, DataPlaneSpec, build_fence_write, fence_ms, fence_seconds
from nlbfarm.node.decide import LeaseView, Timing, fence_deadline

SPEC = DataPlaneSpec(interface="lan0", vips=("198.18.0.100",), cluster_mac="03:bf:c6:12:00:64", buckets=64,
                     seed=7, accepting=((0, 63),), fence_open=True, fence_timeout=2)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class FakeNft:
    """Takes JSON transactions; models the fence element's expiry from where the kernel inserts it."""

    def __init__(self, clock, delays):
        self.clock, self.delays = clock, list(delays)
        self.expires = None  # absolute time the element goes, None: no element

    def json_cmd(self, doc):
        d = self.delays.pop(0) if self.delays else 0.0
        inserted = self.clock.t + d / 2      # somewhere inside the transaction
        self.clock.t += d
        for cmd in doc["nftables"]:
            for verb, body in cmd.items():
                el = body.get("element") if isinstance(body, dict) else None
                if el is None or el.get("name") != "fence":
                    continue
                if verb == "delete":
                    self.expires = None
                elif verb == "add":
                    self.expires = inserted + el["elem"][0]["elem"]["timeout"]
        return 0, {"nftables": []}, ""

    def cmd(self, text):
        """The text fence write (``build_fence_write``): its last add sets the expiry."""
        d = self.delays.pop(0) if self.delays else 0.0
        inserted = self.clock.t + d / 2
        self.clock.t += d
        m = re.search(r"add element inet \S+ fence \{ \"[^\"]+\" timeout (\d+)ms \}$", text)
        assert m, text
        self.expires = inserted + int(m.group(1)) / 1000
        return 0, "", ""


def plane(delays):
    clock = Clock()
    dp = DataPlane(clock=clock)
    dp._nft = FakeNft(clock, delays)
    return dp, clock


@settings(max_examples=300, deadline=None)
@given(left=st.floats(0.0, 5.0), delays=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=6))
def test_no_fence_element_outlives_its_deadline(left, delays):
    dp, clock = plane(delays)
    until = clock.t + left
    dp.apply(SPEC, until)
    for _ in range(3):
        dp.refresh_fence(until)
    nft = dp._nft
    assert nft.expires is None or nft.expires <= until + 1e-9


@settings(max_examples=300, deadline=None)
@given(age=st.floats(0.0, 6.0), k=st.sampled_from([0.1, 0.25, 0.5]), ttl=st.integers(3, 10),
       ft=st.sampled_from([0.3, 0.5, 1, 2]), delay=st.floats(0.0, 2.0))
def test_fence_never_outlives_the_lease_outside_rule_e(age, k, ttl, ft, delay):
    timing = Timing(ttl, ft, k, 1.0)
    clock = Clock()
    sent = clock.t - age
    until, _ = fence_deadline(LeaseView(registered=True, lease_id=1, last_ok_sent=sent), timing, True)
    dp = DataPlane(clock=clock)
    dp._nft = FakeNft(clock, [delay, delay])
    dp.apply(SPEC, until)
    dp.refresh_fence(until)
    if dp._nft.expires is not None:
        # etcd counts the lease from when it received the keepalive, after ``sent``.
        assert dp._nft.expires <= sent + ttl - timing.margin + 1e-9


def test_fence_length_rounds_down_to_milliseconds_and_closes_below_the_minimum():
    assert fence_ms(None, 0.0, 2) == 0
    assert fence_ms(10.0, 9.2, 2) == 799 or fence_ms(10.0, 9.2, 2) == 800  # float rounding of 0.8 s
    assert fence_ms(10.0, 8.5, 2) == 1500
    assert fence_ms(10.0, 5.0, 2) == 2000
    assert fence_ms(10.0, 5.0, 0.3) == 300
    assert fence_ms(10.0, 9.99, 2) == 0  # under MIN_FENCE_MS: close rather than write 10 ms
    assert fence_ms(math.inf, 5.0, 0.25) == 250
    assert fence_seconds(10.0, 8.5, 2) == 1.5


def test_fence_write_is_text_with_milliseconds_and_refuses_odd_names():
    spec = replace(SPEC, fence_open=True)
    text = build_fence_write(spec, 300)
    assert text.endswith(f'add element inet {spec.table} fence {{ "{spec.interface}" timeout 300ms }}')
    assert "delete element" in text
    for bad in (replace(spec, interface='eth0" }; flush ruleset; #'), replace(spec, table="t; flush ruleset")):
        with pytest.raises(DataPlaneError):
            build_fence_write(bad, 300)
    with pytest.raises(DataPlaneError):
        build_fence_write(spec, 0)


def test_regression_slow_commit_cannot_stretch_the_fence():
    # Found in review: the cycle decided "fence open", then a conntrack scan,
    # the data-plane lock and a long ruleset commit passed, and the element
    # got a full fence_timeout from the commit, past the lease's expiry.
    dp, clock = plane([1.5])
    until = clock.t + 2.2
    dp.apply(SPEC, until)
    assert dp._nft.expires is None  # 2 s decided at the send, 1.5 s inside: closed on return
    assert not dp.fence_held()
    # A sub-second element, written in text after the rules: the same for a slow text write.
    dp, clock = plane([0.0, 0.4])
    until = clock.t + 0.6
    dp.apply(replace(SPEC, fence_timeout=0.5), until)
    assert dp._nft.expires is None  # 500 ms decided at the send, 400 ms inside: closed on return
    assert not dp.fence_held()
