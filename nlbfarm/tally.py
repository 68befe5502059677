"""Event counts that the agent's metrics export: one owner increments, the collector reads."""
from __future__ import annotations

import threading
from collections import Counter


class Tally:
    """Counts by label values, safe from any thread. The owner of each count (the data plane for
    fence closures, the VIP for announcements, the store for etcd errors, the loop for state
    changes and table writes) increments it where the event happens; /metrics reads a copy."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def add(self, *labels: str, n: int = 1) -> None:
        with self._lock:
            self._counts[labels] += n

    def get(self, *labels: str) -> int:
        with self._lock:
            return self._counts[labels]

    def items(self) -> list[tuple[tuple[str, ...], int]]:
        with self._lock:
            return sorted(self._counts.items())
