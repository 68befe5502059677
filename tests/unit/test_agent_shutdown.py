"""Shutdown order: the lease goes last, and never while this node's fence element may still accept."""
import time

from nlbfarm.config import parse_config
from nlbfarm.coordinator.cluster import ClusterSettings
from nlbfarm.errors import DataPlaneError
from nlbfarm.node.agent import Agent
from nlbfarm.node.decide import LeaseView


class FenceThatWillNotClose:
    """The ruleset replace that closes the fence fails (nft refused it): the element lives on."""

    def __init__(self, left: float):
        self.current = "applied"
        self.fence_expires_at = time.monotonic() + left

    def apply(self, spec, fence_until=None):
        raise DataPlaneError("nftables refused ruleset replace: injected")

    def teardown(self, table=None):
        pass


class VipGone:
    def down(self):
        return True


class Revokes:
    """Records when each lease is revoked; everything else a shutdown touches does nothing."""

    def __init__(self):
        self.revoked = []

    def revoke(self, lease_id, deadline=None):
        self.revoked.append((lease_id, time.monotonic()))


def test_regression_shutdown_waits_for_an_element_it_could_not_close_before_revoking_the_lease():
    """Revoking deletes the records and peers take the buckets at once: an element that is
    still open must have expired by itself first."""
    cfg = parse_config({"node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100"]},
                        "etcd": {"endpoints": ["127.0.0.1:1"]}})
    dp = FenceThatWillNotClose(left=0.4)
    a = Agent(cfg, dataplane=dp, vip=VipGone())
    a.settings = ClusterSettings(seed=1, buckets=64)
    a.farm = Revokes()
    a.keeper._view = LeaseView(registered=True, lease_id=0x11, applied_lease=0x12, last_ok_sent=time.monotonic())
    a.shutdown()
    assert [lease for lease, _ in a.farm.revoked] == [0x11, 0x12]
    assert a.farm.revoked[0][1] >= dp.fence_expires_at, "a lease was revoked while the element could accept"
