"""The agent's cluster cache: a lagging watch must never roll a fresh read back."""
import threading

from nlbfarm.coordinator.store import KV, WatchEvent
from nlbfarm.node.agent import ClusterCache

P = "/nlbfarm/t"


def put(key, rev, value=b"{}"):
    return WatchEvent("put", key, value, rev)


def test_events_older_than_a_full_read_are_ignored():
    c = ClusterCache(P, threading.Event())
    c.reset({f"{P}/a": (b"new", 10)}, 10)
    c.on_event(put(f"{P}/a", 7, b"old"))          # delivered late by a reconnecting watch
    c.on_event(WatchEvent("delete", f"{P}/a", b"", 9))
    assert c._items[f"{P}/a"] == (b"new", 10)
    c.on_event(put(f"{P}/b", 11))
    assert f"{P}/b" in c._items and c.revision == 11


def test_two_keys_of_one_transaction_both_apply():
    c = ClusterCache(P, threading.Event())
    c.reset({}, 5)
    c.on_event(put(f"{P}/x", 6))
    c.on_event(put(f"{P}/y", 6))
    assert {f"{P}/x", f"{P}/y"} <= set(c._items)


def test_older_resync_does_not_replace_a_newer_read():
    c = ClusterCache(P, threading.Event())
    c.reset({f"{P}/a": (b"new", 10)}, 10)
    c.on_event(WatchEvent("resync", P, b"", 8, snapshot={f"{P}/a": KV(f"{P}/a", b"old", 8)}))
    assert c._items[f"{P}/a"] == (b"new", 10)
    c.on_event(WatchEvent("resync", P, b"", 12, snapshot={}))
    assert c._items == {} and c.revision == 12


def test_reset_wakes_the_loop():
    wake = threading.Event()
    ClusterCache(P, wake).reset({}, 1)
    assert wake.is_set()
