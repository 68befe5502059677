"""Membership and the bucket table through a real etcd."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from nlbfarm.config import parse_config
from nlbfarm.coordinator.cluster import build_snapshot, table_key
from nlbfarm.coordinator.handover import plan_table
from nlbfarm.coordinator.etcd import EtcdStore
from nlbfarm.coordinator.table import counts
from nlbfarm.errors import ConfigError, DuplicateMember
from nlbfarm.node.agent import Agent
from nlbfarm.node.standins import NoVip, RecordingDataPlane

pytestmark = pytest.mark.integration


def config(endpoint, cluster, node="n1", buckets=256, weight=1):
    return parse_config({
        "node": {"id": node, "weight": weight, "addresses": ["198.18.0.11"]},
        "cluster": {"name": cluster, "vips": ["198.18.0.100"], "buckets": buckets},
        "etcd": {"endpoints": [endpoint], "timeout": 1.0, "retry_deadline": 5.0},
    })


@pytest.fixture
def cluster():
    return f"c{uuid.uuid4().hex[:8]}"


@pytest.fixture
def agents():
    made = []
    yield made
    for a in made:
        if a.lease_id is not None:
            a.store.revoke_lease(a.lease_id)
        a.store.close()


def registered(agents, cfg):
    a = Agent(cfg)  # data plane and VIP stay untouched: only the etcd steps run here
    agents.append(a)
    a._wait_for_etcd()
    a.settings = a._ensure_settings()
    a._register()
    return a


def test_member_record_is_lease_bound_and_complete(etcd_server, cluster, agents):
    a = registered(agents, config(etcd_server.endpoint, cluster))
    kv = a.store.get(f"/nlbfarm/{cluster}/members/n1")
    assert kv.lease == a.lease_id
    assert json.loads(kv.value) == {"id": "n1", "weight": 1, "state": "active",
                                    "addresses": ["198.18.0.11"], "version": "0.1.0",
                                    "instance": a.instance, "peer": "", "reason": "no checks configured",
                                    "rules": a.rules_digest, "fence_ms": 400}


def test_duplicate_node_id_is_refused_and_first_is_undisturbed(etcd_server, cluster, agents):
    first = registered(agents, config(etcd_server.endpoint, cluster))
    key = f"/nlbfarm/{cluster}/members/n1"
    before = first.store.get(key)
    with pytest.raises(DuplicateMember, match=r"node id 'n1' is already registered .* refusing to start"):
        registered(agents, config(etcd_server.endpoint, cluster, weight=5))
    after = first.store.get(key)
    assert after == before  # same value, revision and lease
    first.store.refresh_lease(first.lease_id)  # the first node's lease is still fine


def test_node_id_is_free_again_after_the_lease_is_revoked(etcd_server, cluster, agents):
    first = registered(agents, config(etcd_server.endpoint, cluster))
    first.store.revoke_lease(first.lease_id)
    first.keeper.release()
    second = registered(agents, config(etcd_server.endpoint, cluster))
    assert second.store.get(f"/nlbfarm/{cluster}/members/n1").lease == second.lease_id


def test_bucket_count_must_match_the_cluster(etcd_server, cluster, agents):
    registered(agents, config(etcd_server.endpoint, cluster, node="n1", buckets=256))
    with pytest.raises(ConfigError, match="cluster.buckets is 512 but cluster .* uses 256"):
        registered(agents, config(etcd_server.endpoint, cluster, node="n2", buckets=512))


def test_seed_is_shared_cluster_wide(etcd_server, cluster, agents):
    a = registered(agents, config(etcd_server.endpoint, cluster, node="n1"))
    b = registered(agents, config(etcd_server.endpoint, cluster, node="n2"))
    assert a.settings == b.settings


def test_racing_table_writers_end_with_one_table(etcd_server, cluster):
    """Several writers compute rebalance() from what they read and CAS it; all agree at the end."""
    prefix = f"/nlbfarm/{cluster}"
    stores = [EtcdStore([etcd_server.endpoint]) for _ in range(4)]
    admin = stores[0]
    admin.put(f"{prefix}/cluster", json.dumps({"seed": 1, "buckets": 256}).encode())
    writes = {"ok": 0, "lost": 0}
    lock = threading.Lock()

    def writer(store, rounds):
        for _ in range(rounds):
            items, rev = store.get_prefix(prefix)
            snap = build_snapshot(prefix, {k: (kv.value, kv.mod_revision) for k, kv in items.items()}, rev)
            up = plan_table(snap)
            if up is None:
                continue
            from nlbfarm.coordinator.cluster import TableRecord
            ok = store.compare_and_swap(table_key(prefix), TableRecord.encode(up.generation, up.owners),
                                        up.expected_revision)
            with lock:
                writes["ok" if ok else "lost"] += 1

    try:
        for step, members in enumerate([["a", "b"], ["a", "b", "c"], ["b", "c"], ["b", "c", "d", "e"]]):
            for k in list(admin.get_prefix(f"{prefix}/members/")[0]):
                admin.delete(k)
            for m in members:
                admin.put(f"{prefix}/members/{m}", json.dumps({"id": m, "weight": 1}).encode())
            threads = [threading.Thread(target=writer, args=(s, 5)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            items, rev = admin.get_prefix(prefix)
            snap = build_snapshot(prefix, {k: (kv.value, kv.mod_revision) for k, kv in items.items()}, rev)
            assert plan_table(snap) is None, f"step {step}: writers left a table that is not final"
            assert set(counts(list(snap.table.owners))) == set(members)
            assert snap.table.generation == step + 1, "one table generation per membership change"
        assert writes["ok"] == 4
    finally:
        for s in stores:
            s.close()


def test_farmd_retries_with_backoff_while_etcd_is_unreachable(tmp_path):
    """farmd at start with no etcd: clear retry logs, nothing applied, clean exit on SIGTERM."""
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "farmd.yaml"
    cfg.write_text(f"node: {{id: n1}}\ncluster: {{vips: [198.18.0.100]}}\n"
                   f"etcd: {{endpoints: ['127.0.0.1:{port}'], timeout: 0.5, retry_deadline: 1}}\n")
    ns = f"farmd-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "nlbfarm.node.agent",
                              "--config", str(cfg)], stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        assert "etcd unreachable" in err and f"127.0.0.1:{port}" in err and "retry_in=" in err
        tables = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"], capture_output=True,
                                text=True).stdout
        assert "nlbfarm" not in tables
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def accepted(spec) -> int:
    return sum(hi - lo + 1 for lo, hi in spec.accepting)


def test_reregistration_after_lost_lease_uses_a_fresh_view(etcd_server, cluster, agents):
    """A node whose lease expired must not resume its old buckets from a stale cache."""
    from nlbfarm.coordinator.cluster import TableRecord
    cfg = config(etcd_server.endpoint, cluster, node="x", buckets=64)
    x = Agent(cfg, dataplane=RecordingDataPlane(), vip=NoVip())
    agents.append(x)
    x.start()
    x.keeper.stop()                  # drive keepalive and the loop by hand

    def tick():
        x.keeper.loop_alive()
        x.keeper.keepalive_once()
        return x.cycle()

    deadline = time.monotonic() + 10
    while accepted(x.dp.current) < 64 and time.monotonic() < deadline:
        x.last_sentence = tick()
        time.sleep(0.05)                 # the watch delivers x's own table write
    assert accepted(x.dp.current) == 64, x.last_sentence
    x._watch.cancel()                # the watch "lags": the cache keeps the old table
    prefix = f"/nlbfarm/{cluster}"
    # x's lease expires; a peer y takes over with a new table.
    x.store.revoke_lease(x.lease_id)
    y_lease = x.store.grant_lease(5).id
    x.store.put(f"{prefix}/members/y", json.dumps({"id": "y", "weight": 1}).encode(), lease_id=y_lease)
    x.store.put(f"{prefix}/applied/y", json.dumps({"generation": 2, "accepting": 64}).encode(),
                lease_id=y_lease)
    table = x.store.get(f"{prefix}/table")
    assert x.store.compare_and_swap(f"{prefix}/table", TableRecord.encode(2, ["y"] * 64), table.mod_revision)
    x.keeper.mark_lost()
    sentence = x.cycle()
    assert sentence == "lease lost: released every bucket and registered again"
    assert accepted(x.dp.current) == 0
    after_recovery = len(x.dp.history)
    x._watch = x.store.watch_prefix(prefix, x.cache.on_event, start_revision=x.cache.revision + 1)
    sentences = []
    for _ in range(20):
        sentences.append(tick())
        if "waiting for y" in sentences[-1]:
            break
        time.sleep(0.05)
    # The fresh view shows table 2, owned by y. x joins (table 3 gives it half)
    # but takes nothing until y has applied table 3.
    assert sentences[0] == "wrote table generation 3: moved 32 buckets (joined=x)", sentences
    assert "waiting for y to apply generation 3" in sentences[-1], sentences
    assert all(accepted(spec) == 0 for spec in x.dp.history[after_recovery:]), sentences
    x.store.revoke_lease(y_lease)


def test_regression_sigusr2_during_an_etcd_blip_refuses_the_restart_and_goes_on(etcd_server, cluster, agents):
    """A StoreError while the hand-off marks the member record used to escape the loop and stop
    the agent. Nothing is stopped before that mark, so the restart is refused and farmd goes on."""
    from nlbfarm.errors import StoreUnavailable
    x = Agent(config(etcd_server.endpoint, cluster, node="x", buckets=64), dataplane=RecordingDataPlane(),
              vip=NoVip())
    agents.append(x)
    x.start()
    deadline = time.monotonic() + 10
    while accepted(x.dp.current) < 64 and time.monotonic() < deadline:
        x.last_sentence = x.cycle()
        time.sleep(0.05)
    assert accepted(x.dp.current) == 64, x.last_sentence

    def blip(node_id):
        raise StoreUnavailable("etcd unreachable: op=get key=members/x (injected)")

    real, x.farm.member_record = x.farm.member_record, blip
    try:
        sentence = x._hand_off()
    finally:
        x.farm.member_record = real
    assert sentence.startswith("restart refused: etcd did not answer"), sentence
    assert not x.handed_off
    before = x.keeper.view().last_ok_sent
    time.sleep(2.5 * x.timing.keepalive_interval)
    assert x.keeper.view().last_ok_sent > before, "the keeper stopped"
    kv, record = x.farm.member_record("x")
    assert record.instance == x.instance and not record.handing_over
    x.keeper.stop()
    x.liveness.stop()
