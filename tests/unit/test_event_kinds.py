"""Every event the agent publishes is a kind the bus knows (an unknown one raises in the caller)."""
import re
from pathlib import Path

from nlbfarm.node.events import EVENT_KINDS, EventBus

ROOT = Path(__file__).resolve().parents[2]


def test_regression_every_published_kind_is_known():
    # The certificate path published "peer_retired", which the bus refused: the
    # ValueError escaped the liveness watcher's step after every retirement.
    published = set()
    for path in (ROOT / "node").glob("*.py"):
        published |= set(re.findall(r'events\.publish\(\s*"([a-z_]+)"', path.read_text()))
    assert "peer_retired" in published
    assert published <= set(EVENT_KINDS), published - set(EVENT_KINDS)
    bus = EventBus()
    for kind in sorted(published):
        bus.publish(kind, "n1", "test")
