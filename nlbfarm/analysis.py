"""Reading what a lab run recorded: the client's connections and every node's accept log.

Used by the demo and the lab tests to prove "each connection was accepted by
exactly one node" from the two independent records.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

# Ports are reused, sometimes within milliseconds (the server closes first, so
# the client's port is free at once). A record spans [t, t + ms]: t is read
# before the socket is bound, the end after it is closed, and two sockets never
# hold one port at once. So an accept belongs to the attempt on that port whose
# span covers it and that ends first: an attempt that read its clock earlier
# but bound the port only after the first had closed it ends later.
# Client and nodes read the same clock in a lab; the slack only absorbs the
# rounding of ``ms``. An accept the application made only after the client had
# given up (``gone``: it waited in a slow accept queue until the client closed)
# belongs to the attempt on that port that had just ended, not to a later
# attempt that reused the port while the connection sat in the queue.
CLOCK_SLACK_S = 0.005


@dataclass(frozen=True)
class Accept:
    t: float
    ip: str
    port: int
    node: str
    peer_gone: bool = False


def read_jsonl(path: str | Path) -> list[dict]:
    """The complete records of a JSON-lines file a client wrote ([] if there is none)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill: not a completed record
    return out


def read_results(path: str | Path) -> list[dict]:
    return sorted(read_jsonl(path), key=lambda r: r.get("t", r.get("t0", 0.0)))


def read_accepts(paths: dict[str, Path], client_ip: str) -> list[Accept]:
    out = []
    for node, path in paths.items():
        if not Path(path).exists():
            continue
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) in (3, 4) and parts[1] == client_ip:
                out.append(Accept(float(parts[0]), parts[1], int(parts[2]), node, parts[3:] == ["gone"]))
    return out


class AttemptIndex:
    """Finds the connection attempt that a packet or accept on a client port belongs to."""

    def __init__(self, results: list[dict]):
        self.results = results
        self._by_port: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(results):
            self._by_port[r["port"]].append(i)

    def attempt(self, port: int, t: float, taken: frozenset | set = frozenset()) -> int | None:
        """Index of the attempt on ``port`` that held it at time ``t``, or None.

        ``taken``: attempts already matched to an accept. The client's kernel
        may hand the same port to the next connection within a millisecond
        (the first one closed): an accept then belongs to the attempt not yet
        accepted, not to the earlier one whose end it still falls within.
        """
        candidates = [i for i in self._by_port.get(port, ())
                      if self.results[i]["t"] <= t <= _end(self.results[i]) + CLOCK_SLACK_S]
        if not candidates:
            return None
        fresh = [i for i in candidates if i not in taken]
        return min(fresh or candidates, key=lambda i: (_end(self.results[i]) < t, _end(self.results[i])))

    def ended_attempt(self, port: int, t: float) -> int | None:
        """Index of the attempt on ``port`` that had last ended by time ``t``, or None."""
        candidates = [i for i in self._by_port.get(port, ())
                      if self.results[i]["t"] <= t and _end(self.results[i]) <= t + CLOCK_SLACK_S]
        if not candidates:
            return None

        def key(i: int) -> tuple[bool, float]:
            end = _end(self.results[i])
            return (end > t, -end if end <= t else end)
        return min(candidates, key=key)


def match_accepts(results: list[dict], accepts: list[Accept]) -> list[list[str]]:
    """For each client result (in order), the nodes whose accept log shows that connection."""
    index = AttemptIndex(results)
    matched: list[list[str]] = [[] for _ in results]
    taken: set[int] = set()
    for a in sorted(accepts, key=lambda a: a.t):
        i = index.ended_attempt(a.port, a.t) if a.peer_gone else index.attempt(a.port, a.t, taken)
        if i is not None:
            matched[i].append(a.node)
            taken.add(i)
    return matched


def match_syns(results: list[dict], syns: dict[tuple, list[float]]) -> dict[int, list[tuple]]:
    """Which captured SYNs each client result sent: result index -> SYN keys.

    ``syns`` maps a SYN (client address, client port, initial sequence number)
    to the times it was seen (retransmits keep the ISN). A SYN belongs to the
    attempt that held its port when it was first sent; when the client's kernel
    hands the port to the next attempt within a millisecond, the first attempt's
    span still covers the second SYN, which then goes to the attempt that has
    none yet (as ``match_accepts`` does for accepts).
    """
    index = AttemptIndex(results)
    own: dict[int, list[tuple]] = {}
    for key, times in sorted(syns.items(), key=lambda kv: min(kv[1])):
        i = index.attempt(key[1], min(times), own.keys())
        if i is not None:
            own.setdefault(i, []).append(key)
    return own


def _end(result: dict) -> float:
    return result["t"] + result["ms"] / 1000


def shares(results: list[dict], t0: float = 0.0, t1: float = float("inf")) -> dict[str, int]:
    return dict(Counter(r["node"] for r in results if r["node"] and t0 <= r["t"] < t1))


def failures(results: list[dict], t0: float = 0.0, t1: float = float("inf")) -> list[dict]:
    return [r for r in results if r["error"] and t0 <= r["t"] < t1]
