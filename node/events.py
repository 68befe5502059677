"""What happened on and around this node, for `farmctl events` and the API's event stream.

The reconcile loop and the checker threads publish; gRPC stream handlers
wait. Events are kept in a bounded ring so a slow or vanished follower costs
nothing: a follower that falls more than ``capacity`` events behind is told
how many it missed instead of holding memory for it.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

EVENT_KINDS = ("member_joined", "member_left", "member_state", "table_changed", "check_transition",
               "node_state", "drain_requested", "undrain_requested", "module_action", "adopted",
               "handoff_refused", "peer_retired", "missed")


@dataclass(frozen=True)
class Event:
    seq: int
    time: float  # unix time
    kind: str
    node_id: str
    message: str
    fields: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"seq": self.seq, "time": self.time, "kind": self.kind, "node_id": self.node_id,
                "message": self.message, "fields": dict(self.fields)}


class EventBus:
    def __init__(self, capacity: int = 1000, clock=time.time):
        self._ring: deque[Event] = deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._seq = 0
        self._clock = clock
        self._closed = False

    def publish(self, kind: str, node_id: str, message: str, **fields) -> Event:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        with self._cond:
            self._seq += 1
            ev = Event(self._seq, self._clock(), kind, node_id, message,
                       {k: str(v) for k, v in fields.items()})
            self._ring.append(ev)
            self._cond.notify_all()
        return ev

    @property
    def last_seq(self) -> int:
        return self._seq

    def since(self, after_seq: int) -> list[Event]:
        """Events with seq > after_seq still in memory; a gap becomes one 'missed' event."""
        with self._cond:
            return self._since_locked(after_seq)

    def _since_locked(self, after_seq: int) -> list[Event]:
        out = [e for e in self._ring if e.seq > after_seq]
        first = out[0].seq if out else self._seq + 1
        if first > after_seq + 1 and after_seq < self._seq:
            gap = first - after_seq - 1
            out.insert(0, Event(first - 1, self._clock(), "missed", "",
                                f"{gap} events were dropped before this follower read them",
                                {"count": str(gap)}))
        return out

    def wait(self, after_seq: int, timeout: float) -> list[Event]:
        """Block until there are events after after_seq, the timeout passes, or the bus closes."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > after_seq or self._closed, timeout)
            return self._since_locked(after_seq)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
