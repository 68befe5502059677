"""The agent's cluster cache: a lagging watch must never roll a fresh read back."""
import threading

from nlbfarm.coordinator.store import KV, WatchEvent
from nlbfarm.coordinator.farm import ClusterCache

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


def test_regression_a_read_older_than_delivered_events_does_not_roll_the_cache_back():
    # Found by the simulation: the agent re-registers and reads the prefix at
    # revision 16 while its watch has already delivered the new table at 17;
    # replacing the cache with the read lost the table for good.
    c = ClusterCache(P, threading.Event())
    c.reset({f"{P}/a": (b"old", 5)}, 5)
    c.on_event(put(f"{P}/table", 17, b"new table"))
    c.reset({f"{P}/a": (b"old", 5)}, 16)
    assert c._items[f"{P}/table"][0] == b"new table" and c.revision == 17
    c.on_event(put(f"{P}/b", 16))  # at or below the read: already in it
    assert f"{P}/b" not in c._items


def test_a_resync_after_etcd_went_back_replaces_the_cache():
    c = ClusterCache(P, threading.Event())
    c.reset({f"{P}/a": (b"new", 50)}, 50)
    c.on_event(WatchEvent("resync", P, b"", 8, snapshot={f"{P}/b": KV(f"{P}/b", b"restored", 8)}, rewound=True))
    assert set(c._items) == {f"{P}/b"} and c.revision == 8
    c.on_event(put(f"{P}/c", 9))
    assert f"{P}/c" in c._items


def test_regression_a_resync_from_another_history_at_a_higher_revision_replaces_the_cache_as_a_rewind():
    """A second restore, of a backup taken before the first: its revision is higher than the
    cache's, so "the revision went back" misses it, but a key it says was last written at or
    below the cache's revision disagrees with what the cache saw. Treated as a rewind: nothing
    rolled back is trusted (trust_after) until rewritten."""
    c = ClusterCache(P, threading.Event())
    c.reset({f"{P}/table": (b"gen 7", 20, 0), f"{P}/applied/n1": (b"gen 7", 21, 5)}, 23)
    snap = {f"{P}/table": KV(f"{P}/table", b"gen 9", 20), f"{P}/applied/n1": KV(f"{P}/applied/n1", b"gen 9", 30, 5)}
    assert c.forked({k: (kv.value, kv.mod_revision, kv.lease) for k, kv in snap.items()}, 34) == f"{P}/table"
    c.on_event(WatchEvent("resync", P, b"", 34, snapshot=snap))
    assert c._items[f"{P}/table"][0] == b"gen 9" and c.trust_after == 34


def test_a_resync_that_continues_the_same_history_is_no_rewind():
    c = ClusterCache(P, threading.Event())
    c.reset({f"{P}/table": (b"gen 7", 20, 0), f"{P}/applied/n1": (b"gen 7", 21, 5)}, 23)
    # Written after the cache's revision, or deleted since: a watch that missed events.
    snap = {f"{P}/table": KV(f"{P}/table", b"gen 7", 20), f"{P}/applied/n2": KV(f"{P}/applied/n2", b"x", 30, 6)}
    c.on_event(WatchEvent("resync", P, b"", 34, snapshot=snap))
    assert c.trust_after == 0 and c.revision == 34
