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

    def apply(self, spec):
        if spec == self.current:
            return False
        self.current = spec
        self.history.append(spec)
        return True

    def refresh_fence(self, still_ok):
        return False

    def fence_is_open(self):
        return bool(self.current and self.current.fence_open)

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
