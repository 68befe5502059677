"""A data plane and a VIP that touch no kernel, for agents that do only the etcd work.

Integration tests run the real Agent against a real etcd with them, and the
control-plane benchmark hosts many such agents in one process.
"""
from __future__ import annotations


class RecordingDataPlane:
    """Takes every ruleset the agent would program: ``current`` is the last, ``history`` all changes."""

    def __init__(self):
        self.current = None
        self.history = []
        self.fence_expires_at = 0.0   # no kernel element: nothing outlives a close

    def apply(self, spec, fence_until=None):
        if spec == self.current:
            return False
        self.current = spec
        self.history.append(spec)
        return True

    def refresh_fence(self, until):
        return False

    def close_fence(self):
        pass

    def fence_held(self):
        return bool(self.current and self.current.fence_open)

    def fence_is_open(self):
        return self.fence_held()

    def counters(self):
        return []

    def teardown(self, table=None):
        self.current = None


class NoVip:
    def up(self):
        pass

    def link_up(self):
        return True

    def announce(self):
        pass

    def down(self):
        return True
