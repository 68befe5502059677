"""Control-plane scale: farms of 64 and 128 members against one real etcd.

Everything runs inside one network namespace of its own (``bnc-cp``): a
single-member etcd (the Debian binary, default raft timing, data in a
temporary directory) on that namespace's loopback, a few real agents, each
a :class:`nlbfarm.node.agent.Agent` in a process of its own as farmd runs it
(lease and keepalives, member record, prefix watch, table compare-and-swap,
``applied`` record, drain bookkeeping; only the kernel data plane and the VIP
are stand-ins that do nothing), and light simulated members for the rest.

Why simulated members: on this 2-core machine, 64 or 128 real agents sharing
the CPU starve each other during every change (each digests every watch
event in pure-Python protobuf and re-plans 4096 buckets), keepalives come
late, leases expire and the farm churns; what would be measured is the
machine, not the protocol. A simulated member still holds its own lease
(refreshed every keepalive interval), member record and watch stream and
publishes ``applied`` in the handover's two steps, so etcd serves exactly the
traffic of a farm of that size.

Per size: the farm starts and converges; once the agents are idle, a steady
window measures CPU, RSS and etcd's background traffic; then, repeated, one
member joins (a new process with one real agent) and, once every member
applied the new table and the agents are idle again, that process is killed
with SIGKILL (its lease expires). Convergence is timed from an etcd watch in
the driver: join = the new member key appearing -> every member applied the
new generation and accepts exactly its share; failure = the member key's
deletion by lease expiry (and, apart, the kill) -> every survivor applied
the table without it and accepts its share.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from nlbfarm.bench.netns import proc_cpu_s

TITLE = "Control-plane scale"

NS = "bnc-cp"
ETCD_PORT = 2379
ENDPOINT = f"127.0.0.1:{ETCD_PORT}"
SIZES = (64, 128)
REPS = 5
STEADY_S = 10.0
REAL_AGENTS = 4      # real agents per size, one process each (as farmd); the other members are simulated
SIM_PROCESSES = 2
BUCKETS = 4096
VIP = "198.18.0.100"  # only configured, never added anywhere (the VIP is a stand-in)


# ---- small helpers -------------------------------------------------------------

def percentile(values, q):
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def _r(x, nd=3):
    return None if x is None else round(x, nd)


def stats(values) -> dict:
    vals = [v for v in values if v is not None]
    return {"n": len(vals), "p50": _r(percentile(vals, 50)), "p99": _r(percentile(vals, 99)),
            "min": _r(min(vals)) if vals else None, "max": _r(max(vals)) if vals else None}


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def scrape_metrics() -> dict:
    """etcd's own /metrics: started gRPC calls per method, raft proposals, watch events sent."""
    text = urllib.request.urlopen(f"http://{ENDPOINT}/metrics", timeout=5).read().decode()
    out = {"grpc": {}, "proposals": 0.0, "watch_events": 0.0}
    for line in text.splitlines():
        if line.startswith("grpc_server_started_total{"):
            labels = line[line.index("{") + 1:line.index("}")]
            method = dict(kv.split("=", 1) for kv in labels.split(","))["grpc_method"].strip('"')
            out["grpc"][method] = out["grpc"].get(method, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("etcd_server_proposals_committed_total "):
            out["proposals"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("etcd_debugging_mvcc_events_total "):
            out["watch_events"] = float(line.rsplit(" ", 1)[1])
    return out


def metrics_delta(a: dict, b: dict) -> dict:
    grpc = {m: b["grpc"].get(m, 0) - a["grpc"].get(m, 0) for m in set(a["grpc"]) | set(b["grpc"])}
    grpc = {m: v for m, v in grpc.items() if v}
    return {"grpc": grpc, "requests": sum(v for m, v in grpc.items() if m != "LeaseKeepAlive"),
            "keepalives": grpc.get("LeaseKeepAlive", 0), "proposals": b["proposals"] - a["proposals"],
            "watch_events": b["watch_events"] - a["watch_events"]}


# ---- worker: a process hosting agents as threads ---------------------------------

def worker_main(endpoint: str, cluster: str, ids: list[str]) -> int:
    from nlbfarm.config import parse_config
    from nlbfarm.logs import setup_logging
    from nlbfarm.node.agent import Agent
    from nlbfarm.node.standins import NoVip, RecordingDataPlane

    setup_logging(os.environ.get("NLBFARM_BENCH_LOG_LEVEL", "warning"), "kv")
    print(json.dumps({"rss_kb": proc_rss_kb(os.getpid())}), flush=True)
    agents = []
    for nid in ids:
        cfg = parse_config({"node": {"id": nid, "weight": 1},
                            "cluster": {"name": cluster, "vips": [VIP], "buckets": BUCKETS},
                            "etcd": {"endpoints": [endpoint]}})
        agents.append(Agent(cfg, dataplane=RecordingDataPlane(), vip=NoVip()))
    started, errors = [], []
    lock = threading.Lock()

    def run(a):
        try:
            a.start()
            with lock:
                started.append(a.me)
            a.run_loop()
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            with lock:
                errors.append(f"{a.me}: {type(exc).__name__}: {exc}")

    for a in agents:
        threading.Thread(target=run, args=(a,), daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(started) + len(errors) < len(agents):
        time.sleep(0.05)
    print(json.dumps({"started": len(started), "errors": errors, "rss_kb": proc_rss_kb(os.getpid())}), flush=True)
    sys.stdin.read()  # the driver closes stdin (or dies): exit without a goodbye
    os._exit(0)


def sim_main(endpoint: str, cluster: str, ids: list[str]) -> int:
    """Light simulated members: the etcd side of an agent, without its reconcile loop.

    Each member holds its own lease (refreshed every keepalive interval, one
    call each, as farmd does), its own member record and its own prefix watch
    stream (so etcd fans every event out to it), and follows the handover
    protocol in ``applied/<id>``: on a new table it publishes the generation
    at once with the buckets it kept, and its whole share once every live
    member has published that generation. It never writes the table (the
    real agents do). All members of this process share one view of the
    cluster, fed by the first member's watch; the other members' watch
    streams are received raw (etcd's work is the same, the process's is not).
    """
    import secrets
    from concurrent.futures import ThreadPoolExecutor

    from nlbfarm import __version__
    from nlbfarm.config import parse_config
    from nlbfarm.coordinator.cluster import Applied, Member, TableRecord, applied_key, member_key
    from nlbfarm.coordinator.rules import digest as rules_digest, resolve as resolve_rules
    from nlbfarm.coordinator.etcd import EtcdStore
    from nlbfarm.logs import setup_logging

    setup_logging(os.environ.get("NLBFARM_BENCH_LOG_LEVEL", "warning"), "kv")
    print(json.dumps({"rss_kb": proc_rss_kb(os.getpid())}), flush=True)
    cfg = parse_config({"node": {"id": ids[0], "weight": 1},
                        "cluster": {"name": cluster, "vips": [VIP], "buckets": BUCKETS},
                        "etcd": {"endpoints": [endpoint]}})
    prefix, t = cfg.key_prefix, cfg.timing
    digest = rules_digest(resolve_rules(cfg.cluster.vips, cfg.cluster.effective_rules), cfg.cluster.unmatched)
    store = EtcdStore([endpoint], timeout=cfg.etcd.timeout, retry_deadline=cfg.etcd.retry_deadline)
    lock = threading.Lock()
    wake = threading.Event()
    view = {"rev": 0, "keys": set(), "members": set(), "applied": {}, "table": None, "owned": {},
            "digest": ""}
    leases: dict[str, int] = {}
    accepting: dict[str, frozenset] = {m: frozenset() for m in ids}
    published: dict[str, tuple[int, int]] = {}
    errors: list[str] = []

    def on_event(ev):
        with lock:
            # Every watch of this process delivers each event: apply it once. One
            # revision may hold several events (a lease expiry deletes two keys).
            if ev.kind == "resync" or ev.mod_revision < view["rev"]:
                return
            if ev.mod_revision > view["rev"]:
                view["rev"], view["keys"] = ev.mod_revision, set()
            if ev.key in view["keys"]:
                return
            view["keys"].add(ev.key)
            rel = ev.key[len(prefix) + 1:]
            if rel.startswith("members/"):
                (view["members"].discard if ev.kind == "delete" else view["members"].add)(rel[8:])
            elif rel.startswith("applied/"):
                if ev.kind == "delete":
                    view["applied"].pop(rel[8:], None)
                else:
                    try:
                        view["applied"][rel[8:]] = Applied.decode(ev.value).generation
                    except ValueError:
                        pass
            elif rel == "table" and ev.kind == "put":
                try:
                    tab = TableRecord.decode(ev.value, ev.mod_revision, None)
                except ValueError:
                    return
                owned: dict[str, set] = {}
                for b, o in enumerate(tab.owners):
                    if o in accepting:
                        owned.setdefault(o, set()).add(b)
                view["table"], view["owned"] = tab.generation, {m: frozenset(v) for m, v in owned.items()}
                view["digest"] = tab.digest
        wake.set()

    def keepalive():
        kpool = ThreadPoolExecutor(max_workers=8)

        def one(m, lease):
            try:
                store.refresh_lease(lease, deadline=t.keepalive_interval)
            except Exception as exc:  # noqa: BLE001 - a lost lease shows as a vanished member
                print(f"sim keepalive failed member={m}: {exc}", file=sys.stderr, flush=True)

        while True:
            t0 = time.monotonic()
            for f in [kpool.submit(one, m, lease) for m, lease in list(leases.items())]:
                f.result()
            time.sleep(max(0.0, t.keepalive_interval - (time.monotonic() - t0)))

    threading.Thread(target=keepalive, daemon=True).start()
    items, rev = store.get_prefix(prefix)
    view["rev"] = rev
    for k in items:
        rel = k[len(prefix) + 1:]
        if rel.startswith("members/"):
            view["members"].add(rel[8:])
    pool = ThreadPoolExecutor(max_workers=8)

    # One watch per process is decoded (it feeds the shared view); every other
    # member's watch is a raw stream whose events are received, not parsed.
    # etcd serves each the same, and the process spends no CPU on protobuf.
    import grpc
    from etcd3 import etcdrpc
    channel = grpc.insecure_channel(endpoint)
    raw_watch = channel.stream_stream("/etcdserverpb.Watch/Watch", request_serializer=None,
                                      response_deserializer=None)
    end = bytearray(prefix.encode())
    end[-1] += 1
    watch_req = etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
        key=prefix.encode(), range_end=bytes(end), start_revision=rev + 1)).SerializeToString()
    forever = threading.Event()

    def drain_watch():
        def reqs():
            yield watch_req
            forever.wait()
        try:
            for _msg in raw_watch(reqs()):
                pass
        except grpc.RpcError as exc:
            print(f"sim raw watch ended: {exc}", file=sys.stderr, flush=True)

    def register(m):
        lease = store.grant_lease(t.lease_ttl).id
        store.put(member_key(prefix, m), Member(m, 1, "active", (), __version__, secrets.token_hex(8), "",
                                                  "simulated member", digest).encode(), lease_id=lease)
        leases[m] = lease
        if m == ids[0]:
            store.watch_prefix(prefix, on_event, start_revision=rev + 1)
        else:
            threading.Thread(target=drain_watch, daemon=True).start()

    for fut in [pool.submit(register, m) for m in ids]:
        try:
            fut.result()
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            errors.append(f"{type(exc).__name__}: {exc}")

    def publish(m, g, acc, digest):
        # (generation, digest) names the table applied, as the agents' rule R requires.
        store.put(applied_key(prefix, m), Applied(g, len(acc), table=digest).encode(), lease_id=leases[m])
        published[m] = (g, len(acc))
        accepting[m] = acc

    print(json.dumps({"started": len(leases), "errors": errors, "rss_kb": proc_rss_kb(os.getpid())}), flush=True)

    def react():
        while True:
            wake.wait(t.keepalive_interval)
            wake.clear()
            with lock:
                g, owned, digest = view["table"], dict(view["owned"]), view["digest"]
                others_done = g is not None and all(view["applied"].get(n, -1) >= g for n in view["members"]
                                                    if n not in accepting)
            if g is None:
                continue
            jobs = []
            for m in ids:
                mine = owned.get(m, frozenset())
                if published.get(m, (0, 0))[0] < g:
                    # Applied g: nothing of what g gives others is accepted any more.
                    jobs.append(pool.submit(publish, m, g, accepting[m] & mine, digest))
            for j in jobs:
                j.result()
            with lock:
                ready = g == view["table"] and others_done and all(
                    view["applied"].get(n, -1) >= g for n in view["members"])
            if ready:
                jobs = [pool.submit(publish, m, g, owned.get(m, frozenset()), digest) for m in ids
                        if accepting[m] != owned.get(m, frozenset())]
                for j in jobs:
                    j.result()

    threading.Thread(target=react, daemon=True).start()
    sys.stdin.read()
    os._exit(0)


class Worker:
    def __init__(self, cluster: str, ids: list[str], logdir: Path, kind: str = "worker"):
        self.ids = ids
        self.log = open(logdir / f"{kind}-{ids[0]}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "nlbfarm.bench.control_plane", kind, "--endpoint",
                                      ENDPOINT, "--cluster", cluster, "--ids", ",".join(ids)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.pid = self.proc.pid
        self.rss_base_kb = None
        self.started = None

    def read_line(self, timeout: float) -> dict:
        out = {}

        def rd():
            line = self.proc.stdout.readline()
            if line:
                out["v"] = json.loads(line)

        t = threading.Thread(target=rd, daemon=True)
        t.start()
        t.join(timeout)
        if "v" not in out:
            raise RuntimeError(f"worker {self.ids[0]}.. said nothing within {timeout:.0f}s "
                               f"(exit code {self.proc.poll()})")
        return out["v"]

    def wait_started(self, timeout: float) -> None:
        self.rss_base_kb = self.read_line(timeout)["rss_kb"]
        self.started = self.read_line(timeout)
        if self.started["errors"]:
            raise RuntimeError(f"agents failed to start: {self.started['errors'][:3]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


# ---- the driver's view of the cluster, from its own watch ------------------------

class Tracker:
    """Members, table and applied records, updated by the watch; predicates timed on arrival."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.cond = threading.Condition()
        self.members: set[str] = set()
        self.applied: dict[str, tuple[int, int]] = {}
        self.table_gen = 0
        self.counts: dict[str, int] = {}
        self._waiters: list[dict] = []
        self.table_times: list[tuple[float, int]] = []  # (arrival, generation) of each new table
        # per member: arrival of its first applied record of each generation, and of the one accepting its share
        self.applied_times: dict[tuple[str, int], float] = {}
        self.accepting_times: dict[tuple[str, int], float] = {}

    def reset(self, items: dict) -> None:
        with self.cond:
            self.members, self.applied, self.table_gen, self.counts = set(), {}, 0, {}
            for key, (value, rev) in items.items():
                self._apply("put", key, value, rev)
            self._check(time.monotonic())

    def on_event(self, ev) -> None:
        t = time.monotonic()
        with self.cond:
            if ev.kind == "resync":
                self.members, self.applied, self.table_gen, self.counts = set(), {}, 0, {}
                for key, kv in ev.snapshot.items():
                    self._apply("put", key, kv.value, kv.mod_revision)
            else:
                self._apply(ev.kind, ev.key, ev.value, ev.mod_revision)
            self._check(t)

    def _apply(self, kind: str, key: str, value: bytes, rev: int) -> None:
        from nlbfarm.coordinator.cluster import Applied, TableRecord
        rel = key[len(self.prefix) + 1:]
        if rel.startswith("members/"):
            nid = rel[len("members/"):]
            if kind == "delete":
                self.members.discard(nid)
            else:
                self.members.add(nid)
        elif rel.startswith("applied/"):
            nid = rel[len("applied/"):]
            if kind == "delete":
                self.applied.pop(nid, None)
            else:
                try:
                    a = Applied.decode(value)
                    self.applied[nid] = (a.generation, a.accepting)
                    now = time.monotonic()
                    self.applied_times.setdefault((nid, a.generation), now)
                    if a.generation == self.table_gen and a.accepting == self.counts.get(nid):
                        self.accepting_times.setdefault((nid, a.generation), now)
                except ValueError:
                    pass
        elif rel == "table" and kind == "put":
            try:
                t = TableRecord.decode(value, rev, None)
            except ValueError:
                return
            counts: dict[str, int] = {}
            for o in t.owners:
                if o is not None:
                    counts[o] = counts.get(o, 0) + 1
            if t.generation > self.table_gen:
                self.table_times.append((time.monotonic(), t.generation))
            self.table_gen, self.counts = t.generation, counts

    def spread(self, gen: int, t0: float) -> dict:
        """When the members published generation ``gen`` and accepted their share, from ``t0``."""
        with self.cond:
            ap = [t - t0 for (n, g), t in self.applied_times.items() if g == gen]
            ac = {n: t - t0 for (n, g), t in self.accepting_times.items() if g == gen}
        last = max(ac, key=ac.get) if ac else None
        return {"applied_p50_s": _r(percentile(ap, 50)), "applied_last_s": _r(max(ap)) if ap else None,
                "accepting_p50_s": _r(percentile(list(ac.values()), 50)),
                "accepting_last_s": _r(ac[last]) if last else None, "last_member": last}

    def table_after(self, t0: float) -> float | None:
        """Arrival of the first new table after ``t0``."""
        with self.cond:
            return next((t for t, _g in self.table_times if t >= t0), None)

    def converged(self, ids: set[str]) -> bool:
        """The table gives buckets to exactly ``ids``, and each applied it and accepts its whole share."""
        return (self.table_gen > 0 and set(self.counts) == ids and self.members == ids
                and all(self.applied.get(n) == (self.table_gen, self.counts[n]) for n in ids))

    def _check(self, t: float) -> None:
        for w in self._waiters:
            if w["t"] is None and w["pred"](self):
                w["t"] = t
                w["generation"] = self.table_gen
        self.cond.notify_all()

    def expect(self, pred) -> dict:
        """Register before causing the change, so its time is taken from the event itself."""
        w = {"pred": pred, "t": None}
        with self.cond:
            self._waiters.append(w)
        return w

    def wait(self, w: dict, timeout: float, what: str) -> float:
        with self.cond:
            ok = self.cond.wait_for(lambda: w["t"] is not None, timeout)
            self._waiters.remove(w)
        if not ok:
            with self.cond:
                behind = sorted(f"{m}={self.applied.get(m)}/{self.counts.get(m, 0)}" for m in self.members
                                if self.applied.get(m) != (self.table_gen, self.counts.get(m, 0)))
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s (table generation {self.table_gen}, "
                               f"{len(self.members)} members, {len(self.applied)} applied records; behind "
                               f"(applied/share): {' '.join(behind[:8])})")
        return w["t"]


# ---- the driver ------------------------------------------------------------------

def progress(msg: str) -> None:
    print(f"progress: {msg}", file=sys.stderr, flush=True)


def start_etcd(datadir: Path) -> subprocess.Popen:
    logf = open(datadir.parent / f"{datadir.name}.log", "ab")
    p = subprocess.Popen(["etcd", "--name", "bnc", "--data-dir", str(datadir),
                          "--listen-client-urls", f"http://{ENDPOINT}", "--advertise-client-urls", f"http://{ENDPOINT}",
                          "--listen-peer-urls", "http://127.0.0.1:2380",
                          "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                          "--initial-cluster", "bnc=http://127.0.0.1:2380", "--log-level", "warn"],
                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    logf.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"etcd exited with {p.returncode}; see {datadir}.log")
        try:
            urllib.request.urlopen(f"http://{ENDPOINT}/health", timeout=1).read()
            return p
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise RuntimeError("etcd did not become healthy within 20 s")


def settle(cpu_fn, least: float = 3.0, most: float = 20.0) -> float:
    """Wait until the agents are idle: two 1-s CPU samples in a row within 30 % (or 10 ms) of each other.

    After a change the agents still digest the watch backlog for a few
    seconds (longer with more members); a steady window must not include it.
    """
    t0 = time.monotonic()
    prev = None
    while True:
        c = cpu_fn()
        time.sleep(1.0)
        rate = cpu_fn() - c
        if prev is not None and time.monotonic() - t0 >= least and (
                abs(rate - prev) <= max(0.3 * max(rate, prev), 0.01)):
            break
        if time.monotonic() - t0 >= most:
            break
        prev = rate
    return _r(time.monotonic() - t0, 1)


def run_size(n: int, reps: int, steady_s: float, workdir: Path) -> dict:
    from nlbfarm.config import parse_config
    from nlbfarm.coordinator.etcd import EtcdStore

    cluster = f"cp{n}"
    defaults = parse_config({"node": {"id": "x"}, "cluster": {"name": cluster, "vips": [VIP]},
                             "etcd": {"endpoints": [ENDPOINT]}})
    prefix = defaults.key_prefix
    store = EtcdStore([ENDPOINT], timeout=2.0, retry_deadline=10.0)
    tracker = Tracker(prefix)
    items, rev = store.get_prefix(prefix)
    tracker.reset({k: (kv.value, kv.mod_revision) for k, kv in items.items()})
    watch = store.watch_prefix(prefix, tracker.on_event, start_revision=rev + 1)
    ids = [f"m{i:03d}" for i in range(1, n + 1)]
    n_real = min(REAL_AGENTS, max(1, n // 2))
    real_ids, sim_ids = ids[:n_real], ids[n_real:]
    s_count = min(SIM_PROCESSES, len(sim_ids))
    sim_chunks = [sim_ids[i::s_count] for i in range(s_count)]
    workers: list[Worker] = []
    sims: list[Worker] = []
    res: dict = {"members": n, "real_agents": n_real, "simulated": len(sim_ids), "sim_processes": s_count,
                 "joins": [], "failures": []}
    try:
        progress(f"{n} members: {n_real} real agents (one process each), {len(sim_ids)} simulated in {s_count}")
        t0 = time.monotonic()
        up = tracker.expect(lambda s: s.converged(set(ids)))
        workers = [Worker(cluster, [i], workdir) for i in real_ids]
        for w in workers:
            w.wait_started(timeout=60)
        sims = [Worker(cluster, c, workdir, kind="sim") for c in sim_chunks]
        for w in sims:
            w.wait_started(timeout=120)
        t_up = tracker.wait(up, 120, f"{n} members converging")
        res["startup_s"] = _r(t_up - t0)
        res["startup_generation"] = tracker.table_gen
        progress(f"{n} members converged after {res['startup_s']} s (table generation {tracker.table_gen})")
        etcd_pid = int(os.environ["BNC_ETCD_PID"])
        real_pids = [w.pid for w in workers]
        sim_pids = [w.pid for w in sims]

        def agents_cpu() -> float:
            return sum(proc_cpu_s(p) for p in real_pids)

        res["settle_s"] = settle(agents_cpu)
        # steady state

        def cpu_now():
            return (agents_cpu(), sum(proc_cpu_s(p) for p in sim_pids), proc_cpu_s(etcd_pid))

        m0, c0, t_s0 = scrape_metrics(), cpu_now(), time.monotonic()
        time.sleep(steady_s)
        m1, c1, t_s1 = scrape_metrics(), cpu_now(), time.monotonic()
        win = t_s1 - t_s0
        cpu = c1[0] - c0[0]
        bg = metrics_delta(m0, m1)
        rss = [proc_rss_kb(p) for p in real_pids]
        res["steady"] = {
            "window_s": _r(win, 2),
            "agent_cpu_pct_of_core": _r(100 * cpu / win / n_real, 3),
            "sim_member_cpu_pct_of_core": _r(100 * (c1[1] - c0[1]) / win / max(1, len(sim_ids)), 3),
            "etcd_cpu_pct_of_core": _r(100 * (c1[2] - c0[2]) / win, 1),
            "etcd_rss_mb": _r(proc_rss_kb(etcd_pid) / 1024, 1),
            "agent_rss_mb": _r(sum(rss) / len(rss) / 1024, 1),
            "agent_base_rss_mb": _r(sum(w.rss_base_kb for w in workers) / len(workers) / 1024, 1),
            "marginal_rss_per_agent_mb": _r((sum(rss) - sum(w.rss_base_kb for w in workers)) / n_real / 1024, 2),
            "keepalives_per_s": _r(bg["keepalives"] / win, 1),
            "other_requests_per_s": _r(bg["requests"] / win, 2),
            "proposals_per_s": _r(bg["proposals"] / win, 2),
            "watch_events_per_s": _r(bg["watch_events"] / win, 2),
        }
        progress(f"{n} members steady: {res['steady']}")
        bg_rate = {"requests": bg["requests"] / win, "proposals": bg["proposals"] / win,
                   "watch_events": bg["watch_events"] / win, "cpu": cpu / win}

        all_ids = set(ids)
        for r in range(reps):
            jid = f"j{r + 1}"
            # join: a new process with one agent
            ma, ta, ca = scrape_metrics(), time.monotonic(), agents_cpu()
            gen_before = tracker.table_gen
            seen = tracker.expect(lambda s, j=jid: j in s.members)
            done = tracker.expect(lambda s, j=jid: s.converged(all_ids | {j}))
            joiner = Worker(cluster, [jid], workdir)
            try:
                joiner.wait_started(timeout=60)
                t_seen = tracker.wait(seen, 60, f"{jid}'s member key")
                t_done = tracker.wait(done, 60, f"convergence after {jid} joined")
                gen = done["generation"]
                settle(agents_cpu, least=2.0)
                mb, tb, cb = scrape_metrics(), time.monotonic(), agents_cpu()
                d = metrics_delta(ma, mb)
                t_tab = tracker.table_after(t_seen)
                join = {"member": jid, "converge_s": _r(t_done - t_seen), "generation": gen,
                        "table_s": _r(t_tab - t_seen) if t_tab else None,
                        "generations": gen - gen_before,
                        "lease_grants": d["grpc"].get("LeaseGrant", 0) - 1,
                        "cpu_per_agent_s": _r((cb - ca - bg_rate["cpu"] * (tb - ta)) / n_real, 4),
                        "requests": _r(d["requests"] - bg_rate["requests"] * (tb - ta), 1),
                        "proposals": _r(d["proposals"] - bg_rate["proposals"] * (tb - ta), 1),
                        "watch_events": _r(d["watch_events"] - bg_rate["watch_events"] * (tb - ta), 1),
                        **tracker.spread(gen, t_seen),
                        "by_method": d["grpc"], "joiner_rss_mb": _r(proc_rss_kb(joiner.pid) / 1024, 1)}
                res["joins"].append(join)
                # failure: SIGKILL; the lease expires after its TTL
                mc, tc, cc = scrape_metrics(), time.monotonic(), agents_cpu()
                gone = tracker.expect(lambda s, j=jid: j not in s.members)
                back = tracker.expect(lambda s: s.converged(all_ids))
                t_kill = time.monotonic()
                joiner.proc.kill()
                t_gone = tracker.wait(gone, 30, f"{jid}'s lease expiring")
                t_back = tracker.wait(back, 60, f"convergence after {jid} failed")
                settle(agents_cpu, least=2.0)
                md, td, cd = scrape_metrics(), time.monotonic(), agents_cpu()
                d = metrics_delta(mc, md)
                t_tab = tracker.table_after(t_gone)
                fail = {"member": jid, "kill_to_converged_s": _r(t_back - t_kill),
                        "table_s": _r(t_tab - t_gone) if t_tab else None,
                        "kill_to_expiry_s": _r(t_gone - t_kill), "converge_s": _r(t_back - t_gone),
                        "generation": back["generation"], **tracker.spread(back["generation"], t_gone),
                        "generations": back["generation"] - gen,
                        "lease_grants": d["grpc"].get("LeaseGrant", 0),
                        "cpu_per_agent_s": _r((cd - cc - bg_rate["cpu"] * (td - tc)) / n_real, 4),
                        "requests": _r(d["requests"] - bg_rate["requests"] * (td - tc), 1),
                        "proposals": _r(d["proposals"] - bg_rate["proposals"] * (td - tc), 1),
                        "watch_events": _r(d["watch_events"] - bg_rate["watch_events"] * (td - tc), 1),
                        "by_method": d["grpc"]}
                res["failures"].append(fail)
                progress(f"{n} members, rep {r + 1}/{reps}: join: table {join['table_s']} s, converged "
                         f"{join['converge_s']} s ({join['requests']:.0f} requests); failure: table "
                         f"{fail['table_s']} s, converged {fail['converge_s']} s after expiry "
                         f"({fail['kill_to_converged_s']} s after the kill)")
            finally:
                joiner.kill()
    finally:
        for w in workers + sims:
            try:
                w.kill()
            except Exception:  # noqa: BLE001
                pass
        watch.cancel()
        store.close()
    return res


def driver_main(sizes: list[int], reps: int, steady_s: float, workdir: Path, out: Path) -> int:
    from nlbfarm.config import parse_config
    cfg = parse_config({"node": {"id": "x"}, "cluster": {"name": "x", "vips": [VIP]},
                        "etcd": {"endpoints": [ENDPOINT]}})
    t = cfg.timing
    result = {"sizes": {}, "errors": [],
              "timing": {"lease_ttl_s": t.lease_ttl, "fence_timeout_s": t.fence_timeout,
                         "keepalive_interval_s": t.keepalive_interval, "etcd_timeout_s": cfg.etcd.timeout},
              "etcd": {"election_timeout_ms": 1000, "heartbeat_interval_ms": 100,
                       "from": "etcd defaults, not set"}}
    try:
        ver = subprocess.run(["etcd", "--version"], capture_output=True, text=True, timeout=10).stdout.split("\n")[0]
        result["etcd"]["version"] = ver.split(":", 1)[1].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        pass
    for n in sizes:
        etcd = start_etcd(workdir / f"etcd-{n}")
        os.environ["BNC_ETCD_PID"] = str(etcd.pid)
        try:
            result["sizes"][str(n)] = run_size(n, reps, steady_s, workdir)
        except Exception as exc:  # noqa: BLE001 - the other size still runs
            result["errors"].append(f"{n} members: {type(exc).__name__}: {exc}")
            progress(f"{n} members failed: {exc}")
        finally:
            etcd.terminate()
            try:
                etcd.wait(10)
            except subprocess.TimeoutExpired:
                etcd.kill()
                etcd.wait(5)
            shutil.rmtree(workdir / f"etcd-{n}", ignore_errors=True)
        out.write_text(json.dumps(result))
    out.write_text(json.dumps(result))
    return 0


# ---- the benchmark (root namespace side) -------------------------------------------

def cleanup_namespaces(progress_fn=lambda m: None) -> list[str]:
    from nlbfarm.node import iplib
    removed = []
    for ns in iplib.list_netns():
        if ns.startswith("bnc-"):
            cp = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in (int(p) for p in cp.stdout.split() if p.isdigit()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and subprocess.run(
                    ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                time.sleep(0.05)
            if iplib.delete_netns(ns):
                removed.append(ns)
    if removed:
        progress_fn(f"removed namespaces {' '.join(removed)}")
    return removed


def run(progress, quick: bool = False) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("the control-plane benchmark needs root (a network namespace of its own)")
    if shutil.which("etcd") is None:
        raise RuntimeError("etcd is not installed (Debian package etcd-server)")
    from nlbfarm.node import iplib
    sizes = (8,) if quick else SIZES
    reps = 1 if quick else REPS
    steady = 3.0 if quick else STEADY_S
    cleanup_namespaces(progress)
    tmp = Path(tempfile.mkdtemp(prefix="bnc-"))
    out = tmp / "result.json"
    t0 = time.monotonic()
    try:
        iplib.ensure_netns(NS)
        iplib.set_link_up("lo", NS)
        p = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-m", "nlbfarm.bench.control_plane",
                              "driver", "--sizes", ",".join(map(str, sizes)), "--reps", str(reps),
                              "--steady", str(steady), "--workdir", str(tmp), "--out", str(out)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        tail: list[str] = []

        def pump():
            for line in p.stderr:
                line = line.rstrip()
                if line.startswith("progress: "):
                    progress(line[len("progress: "):])
                elif line:
                    tail.append(line)
                    del tail[:-20]

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        try:
            rc = p.wait(timeout=900)
        except subprocess.TimeoutExpired:
            p.kill()
            raise RuntimeError("the control-plane driver did not finish within 15 minutes")
        th.join(5)
        if not out.exists():
            raise RuntimeError(f"the control-plane driver exited with {rc} and wrote nothing: {' / '.join(tail[-5:])}")
        raw = json.loads(out.read_text())
    finally:
        cleanup_namespaces()
        shutil.rmtree(tmp, ignore_errors=True)
    return summarize(raw, sizes, reps, steady, round(time.monotonic() - t0, 1))


def summarize(raw: dict, sizes, reps: int, steady: float, seconds: float) -> dict:
    notes = [f"not measured: {e}" for e in raw.get("errors", [])]
    figures = {}
    cores = os.cpu_count() or 1
    for n in sizes:
        s = raw["sizes"].get(str(n))
        if not s:
            continue
        j, f = s["joins"], s["failures"]
        real = {f"m{i:03d}" for i in range(1, s["real_agents"] + 1)}

        def st(rows, key):
            return stats([x.get(key) for x in rows])

        figures[str(n)] = {
            "members": n, "real_agents": s["real_agents"], "simulated": s["simulated"],
            "startup_s": s.get("startup_s"), "steady": s.get("steady", {}),
            "join_converge_s": st(j, "converge_s"), "join_table_s": st(j, "table_s"),
            "failure_converge_s": st(f, "converge_s"), "failure_table_s": st(f, "table_s"),
            "failure_kill_to_converged_s": st(f, "kill_to_converged_s"),
            "failure_kill_to_expiry_s": st(f, "kill_to_expiry_s"),
            "join_requests": st(j, "requests"), "failure_requests": st(f, "requests"),
            "join_proposals": st(j, "proposals"), "failure_proposals": st(f, "proposals"),
            "join_watch_events": st(j, "watch_events"), "failure_watch_events": st(f, "watch_events"),
            "join_cpu_per_agent_s": st(j, "cpu_per_agent_s"), "failure_cpu_per_agent_s": st(f, "cpu_per_agent_s"),
            "joiner_rss_mb": st(j, "joiner_rss_mb"),
            "extra_generations": sum(max(0, (x.get("generations") or 1) - 1) for x in j + f),
            "lease_regrants": sum(max(0, x.get("lease_grants") or 0) for x in j + f),
            "slowest": {what: _kinds(rows, real) for what, rows in (("join", j), ("failure", f))},
            "changes": len(j) + len(f), "reps": len(j),
        }
        fig = figures[str(n)]
        if len(j) < reps or len(f) < reps:
            notes.append(f"{n} members: only {len(j)} joins and {len(f)} failures of {reps} completed")
        if fig["extra_generations"] or fig["lease_regrants"]:
            notes.append(f"{n} members: {fig['extra_generations']} extra table generation(s) and "
                         f"{fig['lease_regrants']} lease re-grant(s) during the measured changes (agents starved "
                         "of CPU lose their lease and register again)")
        c = fig["failure_cpu_per_agent_s"]["p50"]
        if c:
            notes.append(f"{n} members: a real agent spends {c * 1000:.0f} ms of CPU on one failure (p50). Were "
                         f"all {n} members real agents on this {cores}-core machine, one failure would need "
                         f"{c * n / cores:.1f} s of every core, which is why most members here are simulated; on a "
                         "real farm each agent has its own machine")
    timing, etcd = raw.get("timing", {}), raw.get("etcd", {})
    if steady < 10:
        notes.append(f"steady-state window {steady:g} s (quick run)")
    result = {"params": {"sizes": list(sizes), "reps": reps, "steady_window_s": steady, "buckets": BUCKETS,
                         "real_agents": REAL_AGENTS, "sim_processes": SIM_PROCESSES, "timing": timing, "etcd": etcd,
                         "seconds": seconds, "cores": cores,
                         "agents": "real nlbfarm Agent objects, one process each (lease, member record, watch, "
                                   "table CAS, applied record; data plane and VIP are no-op stand-ins), the other "
                                   "members light simulated ones (own lease, keepalives, member record, watch stream "
                                   "and two-step applied records; no table writes)"},
              "figures": figures, "summary": [], "notes": notes, "raw": raw.get("sizes", {})}
    result["summary"] = _summary(result)
    return result


def _kinds(rows, real) -> dict:
    """Which kind of member published last in each change."""
    out = {"joining agent": 0, "real agent": 0, "simulated member": 0}
    for x in rows:
        m = str(x.get("last_member") or "")
        out["joining agent" if m.startswith("j") else "real agent" if m in real else "simulated member"] += 1
    return {k: v for k, v in out.items() if v}


def _fmt(x, unit=" s", nd=2):
    return "-" if x is None else f"{x:.{nd}f}{unit}"


def _lead(fig, sizes, key, what="p50"):
    if len(sizes) < 2:
        return None
    b, s = fig[sizes[-1]][key][what], fig[sizes[0]][key][what]
    if b is None or not s:
        return None
    return f"{b / s:.2f}x at {sizes[-1]} vs {sizes[0]} members"


def _summary(result: dict) -> list[dict]:
    fig, t = result["figures"], result["params"]["timing"]
    ttl = t.get("lease_ttl_s")
    sizes = sorted(fig, key=int)
    if not sizes:
        return []
    big = fig[sizes[-1]]
    base = f"lease TTL {ttl} s, keepalive {t.get('keepalive_interval_s')} s"
    rows = []
    for what, key in (("one join (new member key -> all applied)", "join_converge_s"),
                      ("one failure (lease expiry -> all applied)", "failure_converge_s")):
        b = big[key]["p50"]
        lead = _lead(fig, sizes, key) or f"{sizes[-1]} members"
        vs_ttl = f", {b / ttl:.2f}x the lease TTL" if b is not None and ttl else ""
        rows.append({"benchmark": TITLE, "metric": f"convergence after {what}, p50",
                     "value": f"{lead}{vs_ttl}: " + ", ".join(
                         f"{n}: {_fmt(fig[n][key]['p50'])} (p99 {_fmt(fig[n][key]['p99'])})" for n in sizes),
                     "compared_with": f"{sizes[0]} members and the lease TTL ({base}; kill -> all applied at "
                                      f"{sizes[-1]}: {_fmt(big['failure_kill_to_converged_s']['p50'])})"})
    per = "; ".join(f"{n}: join {_fmt(fig[n]['join_requests']['p50'], '', 0)}, failure "
                    f"{_fmt(fig[n]['failure_requests']['p50'], '', 0)} requests, "
                    f"{_fmt(fig[n]['join_watch_events']['p50'], '', 0)} / "
                    f"{_fmt(fig[n]['failure_watch_events']['p50'], '', 0)} watch events" for n in sizes)
    rows.append({"benchmark": TITLE, "metric": "etcd requests per membership change (gRPC calls, keepalives apart)",
                 "value": f"{_lead(fig, sizes, 'failure_requests') or 'per change'} (failure): {per}",
                 "compared_with": f"{sizes[0]} members; background: {big['steady'].get('keepalives_per_s')} "
                                  f"keepalives/s at {sizes[-1]} members, nothing else"})
    cpu = "; ".join(f"{n}: {_fmt(fig[n]['steady'].get('agent_cpu_pct_of_core'), ' %', 2)} of a core, RSS "
                    f"{_fmt(fig[n]['steady'].get('agent_rss_mb'), ' MB', 1)}" for n in sizes)
    rows.append({"benchmark": TITLE, "metric": "agent CPU and RSS at steady state (one agent process)",
                 "value": f"{_steady_ratio(fig, sizes)}: {cpu}",
                 "compared_with": f"{sizes[0]} members; the interpreter and imports alone: "
                                  f"{_fmt(big['steady'].get('agent_base_rss_mb'), ' MB', 1)}"})
    return rows


def _steady_ratio(fig, sizes) -> str:
    if len(sizes) < 2:
        return "per agent"
    b = fig[sizes[-1]]["steady"].get("agent_cpu_pct_of_core")
    s = fig[sizes[0]]["steady"].get("agent_cpu_pct_of_core")
    if not b or not s:
        return "per agent"
    return f"{b / s:.2f}x CPU at {sizes[-1]} vs {sizes[0]} members"


def report(result: dict, plots: list[str]) -> str:
    p, fig = result["params"], result["figures"]
    t, e = p["timing"], p["etcd"]
    settings = (f"lease TTL {t.get('lease_ttl_s')} s, fence {t.get('fence_timeout_s')} s, keepalive "
                f"{t.get('keepalive_interval_s')} s, etcd call timeout {t.get('etcd_timeout_s')} s (farmd's "
                f"defaults); etcd {e.get('version', '')}, one member, election timeout "
                f"{e.get('election_timeout_ms')} ms, heartbeat {e.get('heartbeat_interval_ms')} ms ({e.get('from')})")
    lines = [
        f"Members: {p['real_agents']} {p['agents']}. Everything runs in one network namespace with etcd on its "
        f"loopback, on this machine's {p['cores']} cores; B = {p['buckets']} buckets. {settings}. "
        f"{p['reps']} join(s) and {p['reps']} failure(s) per size: the joining member is a new process with one real "
        "agent, and the failure is that process killed with SIGKILL.",
        "",
        "Convergence: from the event in the driver's own etcd watch (the new member key; for a failure, the "
        "member key deleted when the lease expired) until every member has published the new generation in "
        "`applied/<id>` and accepts exactly its share. Requests per change: the growth of etcd's "
        "`grpc_server_started_total` (all methods but LeaseKeepAlive) from before the change until the agents "
        "are idle again, minus the steady-state rate over that time (zero here); raft writes: "
        "`etcd_server_proposals_committed_total`; watch events: `etcd_debugging_mvcc_events_total` (events sent "
        "to watchers: every write reaches every member's watch). Agent CPU per change: utime + stime of the real "
        "agents' processes over the same window, per agent.",
        "",
        "| members | join: converge p50 / p99 | failure: expiry -> converged p50 / p99 | failure: kill -> "
        "converged p50 | requests per join / failure | raft writes per join / failure | watch events per join "
        "/ failure | agent CPU per join / failure | startup to converged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted(fig, key=int):
        f = fig[n]
        lines.append(
            f"| {n} | {_fmt(f['join_converge_s']['p50'])} / {_fmt(f['join_converge_s']['p99'])} | "
            f"{_fmt(f['failure_converge_s']['p50'])} / {_fmt(f['failure_converge_s']['p99'])} | "
            f"{_fmt(f['failure_kill_to_converged_s']['p50'])} | {_fmt(f['join_requests']['p50'], '', 0)} / "
            f"{_fmt(f['failure_requests']['p50'], '', 0)} | {_fmt(f['join_proposals']['p50'], '', 0)} / "
            f"{_fmt(f['failure_proposals']['p50'], '', 0)} | {_fmt(f['join_watch_events']['p50'], '', 0)} / "
            f"{_fmt(f['failure_watch_events']['p50'], '', 0)} | "
            f"{_fmt(_ms(f['join_cpu_per_agent_s']['p50']), ' ms', 0)} / "
            f"{_fmt(_ms(f['failure_cpu_per_agent_s']['p50']), ' ms', 0)} | {_fmt(f['startup_s'])} |")
    lines += ["", "The table write itself follows the membership event within "
              + ", ".join(f"{_fmt(fig[n]['failure_table_s']['p50'])} ({n})" for n in sorted(fig, key=int))
              + " (p50, failure); the rest is every member applying it, and for a failure every survivor waiting "
              "until all others published the generation before taking the dead member's buckets. The last member "
              "to accept its share was: "
              + "; ".join(f"{n} members: joins {_kinds_text(fig[n]['slowest'].get('join', {}))}, failures "
                          f"{_kinds_text(fig[n]['slowest'].get('failure', {}))}" for n in sorted(fig, key=int))
              + ". A joining agent is last by design (it takes its buckets once every other member applied the "
              "table); a simulated member last means its process (some 60 members publishing one after another) "
              "was the bottleneck, so that figure is an upper bound for real agents on machines of their own.",
              "", f"Steady state ({p['steady_window_s']:g} s window once the agents are idle; CPU = utime + stime "
              "from /proc; RSS = VmRSS of one agent's process):", "",
              "| members | CPU per agent (% of a core) | agent RSS (interpreter and imports alone) | etcd CPU | "
              "etcd RSS | keepalives/s | other requests/s | simulated member CPU |",
              "|---|---|---|---|---|---|---|---|"]
    for n in sorted(fig, key=int):
        s = fig[n]["steady"]
        lines.append(
            f"| {n} | {_fmt(s.get('agent_cpu_pct_of_core'), ' %', 2)} | {_fmt(s.get('agent_rss_mb'), ' MB', 1)} "
            f"({_fmt(s.get('agent_base_rss_mb'), ' MB', 1)}) | {_fmt(s.get('etcd_cpu_pct_of_core'), ' %', 1)} | "
            f"{_fmt(s.get('etcd_rss_mb'), ' MB', 1)} | {s.get('keepalives_per_s')} | "
            f"{s.get('other_requests_per_s')} | {_fmt(s.get('sim_member_cpu_pct_of_core'), ' %', 2)} |")
    lines += ["", "farmd itself adds its gRPC API, metrics endpoint and the nftables binding to the agent's RSS. "
              "Simulated members' etcd traffic (leases, keepalives, watch streams, applied records) has the real "
              "agents' shape, so etcd's figures are those of a farm of that size."]
    for pl in plots:
        lines += ["", f"![{Path(pl).stem}]({pl})"]
    return "\n".join(lines) + "\n"


def _kinds_text(d: dict) -> str:
    return ", ".join(f"{k} {v}x" for k, v in d.items()) or "-"


def _ms(x):
    return None if x is None else x * 1000


def plot(result: dict, outdir) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_data = result["figures"]
    sizes = sorted(fig_data, key=int)
    if not sizes:
        return []
    xs = [int(n) for n in sizes]
    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=100)
    for key, label in (("join_converge_s", "join"), ("failure_converge_s", "failure, from lease expiry"),
                       ("failure_kill_to_converged_s", "failure, from the kill")):
        p50 = [fig_data[n][key]["p50"] for n in sizes]
        p99 = [fig_data[n][key]["p99"] for n in sizes]
        if any(v is None for v in p50):
            continue
        line, = ax.plot(xs, p50, marker="o", label=f"{label} p50")
        ax.plot(xs, p99, marker="x", linestyle="--", linewidth=0.8, color=line.get_color(), label=f"{label} p99")
    ttl = result["params"]["timing"].get("lease_ttl_s")
    if ttl:
        ax.axhline(ttl, color="grey", linestyle=":", linewidth=1, label=f"lease TTL {ttl} s")
    ax.set_xticks(xs)
    ax.set_xlabel("members")
    ax.set_ylabel("s until every member applied")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Control plane: convergence vs members", fontsize=9)
    fig.tight_layout()
    name = "control_plane_convergence.png"
    fig.savefig(Path(outdir) / name)
    plt.close(fig)
    return [name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nlbfarm.bench.control_plane",
                                 description="helpers of the control-plane benchmark (run it with python -m nlbfarm.bench)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for kind, doc in (("worker", "host real agents as threads"), ("sim", "host light simulated members")):
        w = sub.add_parser(kind, help=f"{doc} (inside the benchmark's namespace)")
        w.add_argument("--endpoint", required=True)
        w.add_argument("--cluster", required=True)
        w.add_argument("--ids", required=True)
    d = sub.add_parser("driver", help="run the measurements (inside the benchmark's namespace)")
    d.add_argument("--sizes", required=True)
    d.add_argument("--reps", type=int, default=REPS)
    d.add_argument("--steady", type=float, default=STEADY_S)
    d.add_argument("--workdir", required=True)
    d.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "worker":
        return worker_main(args.endpoint, args.cluster, args.ids.split(","))
    if args.cmd == "sim":
        return sim_main(args.endpoint, args.cluster, args.ids.split(","))
    return driver_main([int(x) for x in args.sizes.split(",")], args.reps, args.steady, Path(args.workdir),
                       Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
