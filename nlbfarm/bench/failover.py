"""Failover and convergence: how long new connections fail after a fault, next to keepalived.

One 3-node lab (prefix ``bnx``, Debian's nginx under the farm module, lab
timing: ``lease_ttl`` 3 s, ``fence_timeout`` 0.4 s, ``keepalive_interval``
0.25 s) is reused for every trial. A bounded load client in the client
namespace opens new HTTP connections to the VIP (4 workers, 10 ms pause, 1 s
timeout) from 1 s before the fault until the survivors serve every bucket
plus a margin; then the victim is restored and the farm waits until all three
nodes serve again. Faults, with the victim rotating over n1..n3:

* ``graceful``: SIGTERM to farmd (drain, hand-over, exit);
* ``health``: nginx stopped behind farmd's back (its checks fail);
* ``kill_agent``: kill -9 of farmd, nginx keeps running;
* ``pause``: farmd stopped with SIGSTOP (hung), resumed with SIGCONT after the survivors took over;
* ``node_dies``: the node's switch port goes down, then farmd and nginx are killed (a machine
  that dies: no socket of it answers again);
* ``link_down``: the node's switch port goes down.

Before the first trial, every agent's CPU is sampled over ``IDLE_S`` seconds
of steady state (no load, no change): the agent's own cost at these timings.

The peer is keepalived (VRRP, the Debian package) moving the same kind of VIP
between two nginx servers on a bridge of its own (namespaces ``bnx-k*``),
with the default ``advert_int 1`` (VRRPv2) and a tuned ``advert_int 0.1``
(VRRPv3, sub-second adverts); the master's switch port goes down.

An etcdctl watch inside the etcd namespace timestamps every key change, which
gives the time from a membership event (a member key deleted by lease
expiry, or a member's state changing) to the table write and to the moment
every member has published the new generation in ``applied/<id>``.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nlbfarm.errors import LabError
from nlbfarm.lab import CLUSTER_NAME, ETCD_PREFIX, VIP, Lab, LabTiming, build_switch, plug_host
from nlbfarm.node import iplib

TITLE = "Failover and convergence"

PREFIX = "bnx"
NODES = ["n1", "n2", "n3"]
FAULTS = ("graceful", "health", "kill_agent", "pause", "node_dies", "link_down")
FAULT_LABELS = {
    "graceful": "graceful stop (SIGTERM to farmd)",
    "health": "health-check failure (nginx stopped)",
    "kill_agent": "kill -9 of farmd (nginx keeps running)",
    "pause": "farmd hangs (SIGSTOP)",
    "node_dies": "the whole node dies (link down, agent and app killed)",
    "link_down": "node link down",
    "keepalived_default": "keepalived, advert_int 1 (default): master link down",
    "keepalived_tuned": "keepalived, advert_int 0.1 (VRRPv3): master link down",
}
TRIALS = 20
IDLE_S = 30.0        # steady-state CPU sample of every agent
PRE_S = 1.0          # load before the fault
MARGIN_S = 1.5       # load after the survivors serve every bucket
LOAD = {"rate": 200, "timeout": 1.0}

# keepalived's own small topology
K_SUBNET = "198.18.1"
K_VIP = f"{K_SUBNET}.100"
K_HOSTS = {"client": f"{K_SUBNET}.3", "k1": f"{K_SUBNET}.11", "k2": f"{K_SUBNET}.12"}
K_PRIORITY = 100
K_CONFIGS = {"keepalived_default": {"advert_int": 1.0, "version": 2},
             "keepalived_tuned": {"advert_int": 0.1, "version": 3}}


# ---- helpers ---------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def stats(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    return {"n": len(vals), "p50": _r(percentile(vals, 50)), "p99": _r(percentile(vals, 99)),
            "max": _r(max(vals)) if vals else None}


def _r(x, nd=3):
    return None if x is None else round(x, nd)


def cleanup_namespaces(progress=lambda m: None) -> list[str]:
    """Remove every ``bnx-*`` namespace and its processes (leftovers of a crashed run too)."""
    removed = Lab(prefix=PREFIX, state_root=Path(tempfile.gettempdir()) / "bnx-none").down()
    for ns in iplib.list_netns():
        if ns.startswith(f"{PREFIX}-"):
            _kill_netns_pids(ns)
            if iplib.delete_netns(ns):
                removed.append(ns)
    if removed:
        progress(f"removed namespaces {' '.join(sorted(removed))}")
    return removed


def _kill_netns_pids(ns: str) -> None:
    cp = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in (int(p) for p in cp.stdout.split() if p.isdigit()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        cp = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        if not cp.stdout.split():
            return
        time.sleep(0.05)


def read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return sorted(out, key=lambda r: r["t"])


def recovery(results: list[dict], t_fault: float) -> dict:
    """Time until every new connection succeeds again, from the client's record.

    R is the start of the first successful connection after the last failed
    one; every connection started at or after R succeeded. Recovery is
    ``max(0, R - t_fault)``, and 0 when no connection failed. Failures that
    ended before the fault are counted apart (noise, not the fault). When no
    connection succeeded after the last failure, the trial did not recover
    within its window and the value is the window's end (a lower bound).
    """
    failed = [r for r in results if r.get("error")]
    before = [r for r in failed if r["t"] + r["ms"] / 1000 < t_fault]
    hit = [r for r in failed if r["t"] + r["ms"] / 1000 >= t_fault]
    out = {"connections": len(results), "failed": len(hit), "failed_before_fault": len(before),
           "recovered": True, "last_failure_end_s": None}
    if not hit:
        out["recovery_s"] = 0.0
        return out
    last = max(r["t"] for r in hit)
    out["last_failure_end_s"] = _r(max(r["t"] + r["ms"] / 1000 for r in hit) - t_fault)
    after = [r["t"] for r in results if r["t"] > last and not r.get("error")]
    if after:
        out["recovery_s"] = _r(max(0.0, min(after) - t_fault))
    else:
        out["recovered"] = False
        out["recovery_s"] = _r(max(r["t"] + r["ms"] / 1000 for r in results) - t_fault)
    errors: dict[str, int] = {}
    for r in hit:
        kind = (r["error"] or "").split(":")[0]
        errors[kind] = errors.get(kind, 0) + 1
    out["errors"] = errors
    return out


class LoadRun:
    """One bounded open-loop probe run (count and duration bounded; stopped early with SIGTERM)."""

    def __init__(self, ns: str, vip: str, out: Path, duration: float):
        self.out = out
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "nlbfarm.bench.failover", "probe", "--vip", vip,
                "--rate", str(LOAD["rate"]), "--timeout", str(LOAD["timeout"]), "--duration", str(duration),
                "--count", str(int(LOAD["rate"] * duration) + 1), "--out", str(out)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 0):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the probe client exited with {self.proc.returncode} before its first "
                                   f"connection: {self.proc.stderr.read()[-300:]}")
            time.sleep(0.02)

    def stop(self) -> list[dict]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(LOAD["timeout"] + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return read_jsonl(self.out)


def probe(vip: str, port: int, rate: float, timeout: float, duration: float, count: int, out) -> int:
    """Open-loop HTTP client: a new connection every 1/rate s, whatever the earlier ones do.

    A closed-loop client (N workers, each waiting for its connection) stops
    starting connections while all its workers wait for timeouts, which hides
    when service came back. Here connections start on a fixed schedule and
    run concurrently (non-blocking sockets, one thread). Bounded by ``count``
    and ``duration``; SIGTERM stops new starts and lets running ones finish.
    Each connection is one JSON line like nlbfarm.loadclient's:
    ``{"t", "port", "node", "error", "ms"}``.
    """
    import errno as _errno
    import selectors
    import socket

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sel = selectors.DefaultSelector()
    request = f"GET / HTTP/1.1\r\nHost: {vip}\r\nConnection: close\r\n\r\n".encode()
    period = 1.0 / rate
    t_end = time.monotonic() + duration
    next_start = time.monotonic()
    issued = 0
    live: dict = {}

    def finish(s, st, error=None):
        try:
            sel.unregister(s)
        except (KeyError, ValueError):
            pass
        s.close()
        live.pop(s, None)
        rec = {"t": st["t"], "port": st["port"], "node": None, "error": error,
               "ms": round((time.monotonic() - st["m"]) * 1000, 2)}
        if error is None:
            head, _, body = bytes(st["buf"]).partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200"):
                rec["node"] = body.decode(errors="replace").strip()
            else:
                rec["error"] = "bad response: " + head[:40].decode(errors="replace")
        out.write(json.dumps(rec) + "\n")

    while True:
        now = time.monotonic()
        starting = not stop.is_set() and now < t_end and issued < count
        if not starting and not live:
            break
        while starting and next_start <= now and issued < count:
            issued += 1
            next_start += period
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            st = {"t": time.time(), "m": time.monotonic(), "port": 0, "buf": bytearray(), "sent": False}
            err = s.connect_ex((vip, port))
            try:
                st["port"] = s.getsockname()[1]
            except OSError:
                pass
            live[s] = st
            if err not in (0, _errno.EINPROGRESS):
                finish(s, st, type(OSError(err, os.strerror(err))).__name__ + f": {os.strerror(err)}")
                continue
            sel.register(s, selectors.EVENT_WRITE, st)
        if starting and now - next_start > 1.0:
            next_start = now  # far behind (the machine stalled): do not burst to catch up
        oldest = min((st["m"] for st in live.values()), default=None)
        wait = 0.05
        if starting:
            wait = min(wait, max(0.0, next_start - time.monotonic()))
        if oldest is not None:
            wait = min(wait, max(0.0, oldest + timeout - time.monotonic()))
        for key, _mask in sel.select(wait):
            s, st = key.fileobj, key.data
            if not st["sent"]:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(s, st, type(OSError(err, os.strerror(err))).__name__ + f": {os.strerror(err)}")
                    continue
                try:
                    s.send(request)
                except OSError as exc:
                    finish(s, st, type(exc).__name__ + (f": {exc.strerror}" if exc.strerror else ""))
                    continue
                st["sent"] = True
                sel.modify(s, selectors.EVENT_READ, st)
                continue
            try:
                chunk = s.recv(4096)
            except OSError as exc:
                finish(s, st, type(exc).__name__ + (f": {exc.strerror}" if exc.strerror else ""))
                continue
            if chunk:
                st["buf"] += chunk
            else:
                finish(s, st)
        now = time.monotonic()
        for s, st in list(live.items()):
            if now - st["m"] >= timeout:
                finish(s, st, "TimeoutError")
    out.flush()
    return 0


# ---- the etcd watcher: membership event -> table -> every node applied -----

class EtcdWatcher:
    """``etcdctl watch --prefix`` inside the etcd namespace; every event stamped on arrival.

    It starts from revision 1 (the lab's etcd never compacts), so the replay
    gives the state every later event changes.
    """

    def __init__(self, lab: Lab):
        self.prefix = f"{ETCD_PREFIX}/{CLUSTER_NAME}"
        self.events: list[tuple[float, str, str, bytes]] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns("etcd"), "etcdctl", "--endpoints", "127.0.0.1:2379", "watch",
             "--prefix", self.prefix + "/", "--rev", "1", "-w", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            t = time.time()
            try:
                resp = json.loads(line)
            except ValueError:
                continue
            batch = []
            for ev in resp.get("Events") or []:
                kv = ev.get("kv", {})
                key = base64.b64decode(kv.get("key", "")).decode(errors="replace")
                value = base64.b64decode(kv.get("value", "")) if kv.get("value") else b""
                batch.append((t, "delete" if ev.get("type") == 1 else "put", key, value))
            with self._lock:
                self.events.extend(batch)

    def snapshot(self) -> list:
        with self._lock:
            return list(self.events)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def membership_changes(events: list, prefix: str) -> list[dict]:
    """Replay the watch: for each new table generation, the membership event that caused it.

    The cause is the last change of the member keys since the previous table
    (a key created, deleted, or its ``state`` changed). ``applied_at`` is when
    every member present at that moment had published ``applied`` >= the
    new generation (members that vanish meanwhile no longer count).
    """
    members: dict[str, str | None] = {}
    applied: dict[str, int] = {}
    table_gen = 0
    cause = None
    out: list[dict] = []
    for t, kind, key, value in events:
        rel = key[len(prefix) + 1:] if key.startswith(prefix + "/") else ""
        if rel.startswith("members/"):
            nid = rel[len("members/"):]
            if kind == "delete":
                if nid in members:
                    old = members.pop(nid)
                    cause = {"t": t, "node": nid, "change": f"{old}->gone", "departure": True}
            else:
                try:
                    state = json.loads(value).get("state")
                except ValueError:
                    state = None
                old = members.get(nid, "absent")
                members[nid] = state
                if old != state:
                    cause = {"t": t, "node": nid, "change": f"{old}->{state}", "departure": state != "active"}
        elif rel.startswith("applied/"):
            nid = rel[len("applied/"):]
            if kind == "delete":
                applied.pop(nid, None)
            else:
                try:
                    applied[nid] = int(json.loads(value).get("generation", 0))
                except (ValueError, TypeError, AttributeError):
                    pass
        elif rel == "table" and kind == "put":
            try:
                g = int(json.loads(value)["generation"])
            except (ValueError, KeyError, TypeError):
                continue
            if g > table_gen:
                table_gen = g
                if cause is not None:
                    out.append({**cause, "generation": g, "table_s": t - cause["t"], "applied_at": None})
                cause = None
        for ch in out:
            if ch["applied_at"] is None and table_gen == ch["generation"] and members and \
                    all(applied.get(n, -1) >= ch["generation"] for n in members):
                ch["applied_at"] = t
    for ch in out:
        ch["applied_s"] = None if ch["applied_at"] is None else ch["applied_at"] - ch["t"]
    return out


def etcd_settings(lab: Lab) -> dict:
    """etcd's raft timing as the lab's etcd really runs (its command line; etcd defaults otherwise)."""
    out = {"election_timeout_ms": 1000, "heartbeat_interval_ms": 100, "from": "etcd defaults, not set by the lab"}
    pid = lab.etcd_pid()
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except (OSError, TypeError):
        return out
    for flag, key in (("--election-timeout", "election_timeout_ms"), ("--heartbeat-interval", "heartbeat_interval_ms")):
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                out[key] = int(argv[i + 1])
                out["from"] = "etcd command line"
            elif a.startswith(flag + "="):
                out[key] = int(a.split("=", 1)[1])
                out["from"] = "etcd command line"
    try:
        ver = subprocess.run(["etcd", "--version"], capture_output=True, text=True, timeout=10).stdout
        out["version"] = re.search(r"etcd Version: (\S+)", ver).group(1)
    except (OSError, subprocess.TimeoutExpired, AttributeError):
        pass
    # etcd grants a lease at least ceil(1.5 x election timeout).
    out["min_lease_ttl_s"] = math.ceil(1.5 * out["election_timeout_ms"] / 1000)
    return out


# ---- the farm's trials ---------------------------------------------------------

def _wait_dead(lab: Lab, node: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while lab.alive(node, "agent") and time.monotonic() < deadline:
        time.sleep(0.05)
    if lab.alive(node, "agent"):
        raise LabError(f"{node}'s farmd did not exit within {timeout:.0f}s")


def _wait_nginx_gone(lab: Lab, node: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while lab.nginx_pidfile(node).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def farm_trial(lab: Lab, kind: str, victim: str, out: Path) -> dict:
    ttl = lab.timing.lease_ttl
    survivors = [n for n in NODES if n != victim]
    load = LoadRun(lab.ns("client"), VIP, out, duration=ttl + 40)
    try:
        time.sleep(PRE_S)
        t_fault = time.time()
        if kind == "graceful":
            lab.kill(victim, "agent", sig=signal.SIGTERM, wait=0)
        elif kind == "health":
            lab.stop_nginx(victim)
        elif kind == "kill_agent":
            lab.kill(victim, "agent", sig=signal.SIGKILL)
        elif kind == "pause":
            lab.kill(victim, "agent", sig=signal.SIGSTOP, wait=0)
        elif kind == "node_dies":
            lab.cut_link(victim)
            lab.kill(victim, "agent", sig=signal.SIGKILL)
            lab.stop_nginx(victim)
        elif kind == "link_down":
            lab.cut_link(victim)
        else:
            raise ValueError(kind)
        lab.wait_converged(survivors, timeout=ttl + 15)
        t_taken = time.time()
        time.sleep(MARGIN_S)
    finally:
        results = load.stop()
    t_restore = time.time()
    if kind == "graceful":
        _wait_dead(lab, victim, lab.timing.stop_drain_timeout + 15)
        lab.start_agent(victim)
    elif kind == "health":
        lab.start_nginx(victim)
    elif kind == "kill_agent":
        # The old nginx still runs: stop it so the new farmd's module starts its own.
        lab.stop_nginx(victim)
        _wait_nginx_gone(lab, victim)
        lab.start_agent(victim)
    elif kind == "pause":
        lab.kill(victim, "agent", sig=signal.SIGCONT, wait=0)  # it finds its lease gone and registers anew
    elif kind == "node_dies":
        _wait_nginx_gone(lab, victim)
        lab.restore_link(victim)
        lab.start_agent(victim)
    elif kind == "link_down":
        lab.restore_link(victim)
    lab.wait_converged(NODES, timeout=40)
    t_restored = time.time()
    return {"kind": kind, "victim": victim, "t_fault": t_fault, "t_restore": t_restore, "t_restored": t_restored,
            "takeover_s": _r(t_taken - t_fault), "rejoin_s": _r(t_restored - t_restore),
            **recovery(results, t_fault)}


def thread_cpu_ns(pid: int) -> int:
    """CPU time of all of a process's threads, in ns (schedstat: exact, not in clock ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total


def idle_cpu(lab: Lab, seconds: float) -> dict:
    """Each agent's CPU over ``seconds`` of steady state, in % of one core (and the largest)."""
    lab.wait_converged(NODES, timeout=30)
    time.sleep(2.0)  # the last table's applies and publications are done
    pids = {n: lab.pid(n, "agent") for n in NODES}
    c0, t0 = {n: thread_cpu_ns(p) for n, p in pids.items()}, time.monotonic()
    time.sleep(seconds)
    c1, t1 = {n: thread_cpu_ns(p) for n, p in pids.items()}, time.monotonic()
    pct = {n: round(100 * (c1[n] - c0[n]) / 1e9 / (t1 - t0), 3) for n in NODES}
    return {"per_agent_pct": pct, "max_pct": max(pct.values()), "seconds": round(t1 - t0, 1)}


def run_farm(progress, tmp: Path, kinds: tuple, trials: int, notes: list) -> dict:
    timing = LabTiming()
    lab = Lab(prefix=PREFIX, state_root=tmp / "lab", timing=timing, app="nginx",
              progress=lambda m: progress(f"lab: {m}"))
    out = {"trials": [], "membership": [], "etcd": {}, "timing": {
        "lease_ttl_s": timing.lease_ttl, "fence_timeout_s": timing.fence_timeout,
        "keepalive_interval_s": timing.keepalive_interval, "check_interval_s": lab.check_interval,
        "check_fall": lab.check_fall, "check_rise": lab.check_rise}}
    watcher = None
    try:
        lab.up(nodes=3, wait=90)
        out["etcd"] = etcd_settings(lab)
        watcher = EtcdWatcher(lab)
        time.sleep(0.5)
        out["idle_cpu"] = idle_cpu(lab, IDLE_S if trials > 1 else 3.0)
        progress(f"idle agent CPU: {out['idle_cpu']}")
        i = 0
        for kind in kinds:
            for n in range(trials):
                victim = NODES[i % len(NODES)]
                i += 1
                progress(f"{kind} trial {n + 1}/{trials} on {victim}")
                try:
                    tr = farm_trial(lab, kind, victim, tmp / f"{kind}-{n}.jsonl")
                except (LabError, RuntimeError, subprocess.SubprocessError) as exc:
                    notes.append(f"farm trial {kind} #{n + 1} on {victim} failed: {exc}")
                    progress(f"{kind} trial {n + 1} failed: {exc}")
                    for fix in (lambda: lab.restore_link(victim), lambda: lab.start_nginx(victim)):
                        try:
                            fix()
                        except Exception:  # noqa: BLE001 - best effort
                            pass
                    if not lab.alive(victim, "agent"):
                        lab.start_agent(victim)
                    lab.wait_converged(NODES, timeout=40)  # if this fails, the farm part ends
                    continue
                out["trials"].append(tr)
                progress(f"  recovery {tr['recovery_s']} s, {tr['failed']} of {tr['connections']} failed")
                time.sleep(0.3)
        time.sleep(0.5)
        changes = membership_changes(watcher.snapshot(), f"{ETCD_PREFIX}/{CLUSTER_NAME}")
        for tr in out["trials"]:
            for ch in changes:
                if tr["t_fault"] <= ch["t"] < tr["t_restore"] and ch["departure"]:
                    ch["trial"] = tr["kind"]
                    ch["fault_to_event_s"] = ch["t"] - tr["t_fault"]
                    if ch["applied_at"] is not None and "fault_to_applied_s" not in tr:
                        # the survivors serve every bucket (from the watch, not the slower poll)
                        tr["takeover_s"] = _r(ch["applied_at"] - tr["t_fault"])
                        tr["fault_to_applied_s"] = tr["takeover_s"]
                elif tr["t_restore"] <= ch["t"] <= tr["t_restored"] and not ch["departure"]:
                    ch["trial"] = f"rejoin after {tr['kind']}"
        out["membership"] = [{k: (_r(v) if isinstance(v, float) else v) for k, v in ch.items()
                              if k not in ("t", "applied_at")} for ch in changes if "trial" in ch]
    finally:
        if watcher is not None:
            watcher.stop()
        lab.down()
    return out


# ---- keepalived -------------------------------------------------------------

K_NS = {"lan": f"{PREFIX}-klan", "client": f"{PREFIX}-kc", "k1": f"{PREFIX}-k1", "k2": f"{PREFIX}-k2"}


def k_build(tmp: Path) -> None:
    lan = K_NS["lan"]
    build_switch(lan)
    for host, addr in K_HOSTS.items():
        plug_host(lan, K_NS[host], f"p-{host}", [f"{addr}/24"])
    for host in ("k1", "k2"):
        d = tmp / host
        d.mkdir(parents=True, exist_ok=True)
        temps = "\n".join(f"  {k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (d / "nginx.conf").write_text(f"""daemon on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx.error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
{temps}
  server {{
    listen 80;
    location / {{ default_type text/plain; return 200 "{host}\\n"; }}
  }}
}}
""")
        subprocess.run(["ip", "netns", "exec", K_NS[host], "nginx", "-c", str(d / "nginx.conf")], check=True,
                       capture_output=True, timeout=20)


def k_conf(host: str, advert_int: float, version: int) -> str:
    return f"""global_defs {{
  router_id {host}
  vrrp_version {version}
  enable_script_security
  script_user root
}}
vrrp_instance VI_1 {{
  state BACKUP
  nopreempt
  interface eth0
  virtual_router_id 51
  priority {K_PRIORITY}
  advert_int {advert_int:g}
  virtual_ipaddress {{
    {K_VIP}/24 dev eth0
  }}
}}
"""


class Keepalived:
    def __init__(self, tmp: Path, name: str, advert_int: float, version: int):
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        for host in ("k1", "k2"):
            d = tmp / host / name
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "keepalived.conf"
            conf.write_text(k_conf(host, advert_int, version))
            self.logs[host] = d / "keepalived.log"
            with open(self.logs[host], "ab") as logf:
                self.procs[host] = subprocess.Popen(
                    ["ip", "netns", "exec", K_NS[host], "keepalived", "-n", "-l", "-D", "-P", "-f", str(conf),
                     "-p", str(d / "keepalived.pid"), "-r", str(d / "vrrp.pid"), "-c", str(d / "checkers.pid")],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        for host, p in self.procs.items():
            if p.poll() is not None:
                tail = self.logs[host].read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"keepalived on {host} exited with {p.returncode}: {' / '.join(tail)}")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def k_holders() -> list[str]:
    return [h for h in ("k1", "k2") if any(a.startswith(K_VIP + "/") for a in iplib.addresses("eth0", K_NS[h]))]


def k_wait_single_master(ka: Keepalived, stable: float, timeout: float) -> str:
    """Wait until exactly one node holds the VIP, unchanged for ``stable`` seconds."""
    deadline = time.monotonic() + timeout
    held, since = None, time.monotonic()
    while time.monotonic() < deadline:
        ka.check_alive()
        h = k_holders()
        cur = h[0] if len(h) == 1 else None
        if cur != held:
            held, since = cur, time.monotonic()
        elif cur is not None and time.monotonic() - since >= stable:
            return cur
        time.sleep(0.05)
    raise RuntimeError(f"keepalived: no single stable master within {timeout:.0f}s (VIP on {k_holders()})")


def keepalived_trial(ka: Keepalived, advert_int: float, out: Path) -> dict:
    master = k_wait_single_master(ka, stable=max(1.0, 3 * advert_int), timeout=30)
    other = "k2" if master == "k1" else "k1"
    load = LoadRun(K_NS["client"], K_VIP, out, duration=40)
    try:
        time.sleep(PRE_S)
        t_fault = time.time()
        iplib.set_link_down(f"p-{master}", K_NS["lan"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and other not in k_holders():
            time.sleep(0.01)
        t_taken = time.time()
        if other not in k_holders():
            raise RuntimeError(f"keepalived: {other} did not take the VIP within 20s")
        time.sleep(MARGIN_S + 0.5)
    finally:
        results = load.stop()
        iplib.set_link_up(f"p-{master}", K_NS["lan"])
    return {"master": master, "t_fault": t_fault, "takeover_s": _r(t_taken - t_fault), **recovery(results, t_fault)}


def run_keepalived(progress, tmp: Path, names: tuple, trials: int, notes: list) -> dict:
    out: dict = {}
    if shutil.which("keepalived") is None or shutil.which("nginx") is None:
        notes.append("keepalived peer not run: keepalived or nginx is not installed "
                     "(Debian packages keepalived, nginx-light)")
        return out
    try:
        k_build(tmp / "k")
    except Exception as exc:  # noqa: BLE001 - the farm's figures still count
        notes.append(f"keepalived peer not run: building its namespaces failed: {type(exc).__name__}: {exc}")
        return out
    for name in names:
        cfg = K_CONFIGS[name]
        progress(f"{name}: advert_int {cfg['advert_int']:g}, VRRPv{cfg['version']}")
        ka = Keepalived(tmp / "k", name, cfg["advert_int"], cfg["version"])
        res = {"advert_int_s": cfg["advert_int"], "vrrp_version": cfg["version"], "priority": K_PRIORITY,
               "master_down_interval_s": _r(3 * cfg["advert_int"] + (256 - K_PRIORITY) / 256 * cfg["advert_int"]),
               "trials": []}
        try:
            for n in range(trials):
                tr = keepalived_trial(ka, cfg["advert_int"], tmp / f"{name}-{n}.jsonl")
                res["trials"].append(tr)
                progress(f"  {name} trial {n + 1}/{trials}: recovery {tr['recovery_s']} s, "
                         f"{tr['failed']} of {tr['connections']} failed")
        except Exception as exc:  # noqa: BLE001 - report what ran
            notes.append(f"keepalived {name}: stopped after {len(res['trials'])} trials: {type(exc).__name__}: {exc}")
        finally:
            ka.stop()
        log = "\n".join(p.read_text(errors="replace") for p in ka.logs.values())
        warn = [ln.strip() for ln in log.splitlines() if re.search(r"advert|interval", ln, re.I)
                and re.search(r"warn|invalid|round|truncat|must", ln, re.I)]
        if warn:
            notes.append(f"keepalived {name} said: {warn[0][-200:]}")
        out[name] = res
    return out


# ---- run / report / plot -------------------------------------------------------

def run(progress, quick: bool = False) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("the failover benchmark needs root (network namespaces, nftables)")
    kinds = ("health", "kill_agent", "pause", "node_dies") if quick else FAULTS
    trials = 1 if quick else TRIALS
    k_names = ("keepalived_tuned",) if quick else ("keepalived_default", "keepalived_tuned")
    notes: list[str] = []
    cleanup_namespaces(progress)
    tmp = Path(tempfile.mkdtemp(prefix="bnx-"))
    t0 = time.monotonic()
    try:
        farm = run_farm(progress, tmp, kinds, trials, notes)
        t_farm = time.monotonic() - t0
        peers = run_keepalived(progress, tmp, k_names, trials, notes)
    finally:
        cleanup_namespaces()
        shutil.rmtree(tmp, ignore_errors=True)
    result = summarize(farm, peers, kinds, k_names, trials, notes)
    result["params"]["farm_seconds"] = round(t_farm, 1)
    return result


def summarize(farm: dict, peers: dict, kinds, k_names, trials: int, notes: list) -> dict:
    figures: dict = {}
    for kind in kinds:
        trs = [t for t in farm.get("trials", []) if t["kind"] == kind]
        figures[kind] = _figure(trs)
        mem = [m for m in farm.get("membership", []) if m.get("trial") == kind]
        figures[kind]["event_to_applied_s"] = stats([m["applied_s"] for m in mem])
        figures[kind]["event_to_table_s"] = stats([m["table_s"] for m in mem])
        figures[kind]["fault_to_event_s"] = stats([m.get("fault_to_event_s") for m in mem])
    joins = [m for m in farm.get("membership", []) if str(m.get("trial", "")).startswith("rejoin")]
    membership = {"departures": stats([m["applied_s"] for m in farm.get("membership", []) if m.get("departure")
                                       and m.get("trial") in kinds]),
                  "joins": stats([m["applied_s"] for m in joins]),
                  "departures_table": stats([m["table_s"] for m in farm.get("membership", []) if m.get("departure")
                                             and m.get("trial") in kinds]),
                  "joins_table": stats([m["table_s"] for m in joins])}
    for name in k_names:
        if name in peers:
            figures[name] = {**_figure(peers[name]["trials"]),
                             **{k: v for k, v in peers[name].items() if k != "trials"}}
    for name, f in figures.items():
        if f.get("not_recovered"):
            notes.append(f"{FAULT_LABELS[name]}: {f['not_recovered']} trial(s) had no successful connection after "
                         "their last failure within the window; their recovery is a lower bound")
        if f.get("failed_before_fault"):
            notes.append(f"{FAULT_LABELS[name]}: {f['failed_before_fault']} connection(s) failed before the fault "
                         "(noise on a busy machine or a late client ARP update); they do not count")
    t = farm.get("timing", {})
    e = farm.get("etcd", {})
    lease = (f"lease TTL {t.get('lease_ttl_s')} s, fence {t.get('fence_timeout_s')} s, keepalive "
             f"{t.get('keepalive_interval_s')} s; etcd election {e.get('election_timeout_ms')} ms, "
             f"heartbeat {e.get('heartbeat_interval_ms')} ms")
    summary = _summary_rows(figures, membership, lease, kinds, k_names)
    idle = farm.get("idle_cpu")
    if idle:
        summary.append({"benchmark": TITLE, "metric": f"one agent's CPU at steady state, 3 nodes ({lease}; "
                        f"{idle['seconds']:g} s sample)",
                        "value": f"{idle['max_pct']:.2f} % of a core at most (target: at most 0.3 %; "
                                 + ", ".join(f"{n} {v:.2f} %" for n, v in sorted(idle["per_agent_pct"].items()))
                                 + ")",
                        "compared_with": "one core"})
    return {"params": {"nodes": 3, "app": "nginx (farm module)", "trials_per_fault": trials, "faults": list(kinds),
                       "peers": list(k_names), "load": {**LOAD, "pre_fault_s": PRE_S, "margin_s": MARGIN_S},
                       "timing": t, "etcd": e, "idle_cpu": farm.get("idle_cpu"), "keepalived": {n: {k: v for k, v in peers[n].items() if k != "trials"}
                                                              for n in k_names if n in peers},
                       "recovery_definition": RECOVERY_DEFINITION},
            "figures": figures, "membership": membership, "summary": summary, "notes": notes,
            "raw": {"farm_trials": [{k: v for k, v in tr.items() if not k.startswith("t_")}
                                    for tr in farm.get("trials", [])],
                    "keepalived_trials": {n: [{k: v for k, v in tr.items() if not k.startswith("t_")}
                                              for tr in peers[n]["trials"]] for n in k_names if n in peers},
                    "membership": farm.get("membership", [])}}


RECOVERY_DEFINITION = ("R = start of the first successful new connection after the last failed one (every "
                       "connection started at or after R succeeded); recovery = max(0, R - fault time), 0 when "
                       "no connection failed")


def _figure(trs: list[dict]) -> dict:
    errors: dict[str, int] = {}
    for t in trs:
        for k, v in (t.get("errors") or {}).items():
            errors[k] = errors.get(k, 0) + v
    return {"recovery_s": stats([t["recovery_s"] for t in trs]), "errors": errors,
            "takeover_s": stats([t.get("takeover_s") for t in trs]),
            "failed": sum(t["failed"] for t in trs), "connections": sum(t["connections"] for t in trs),
            "failed_before_fault": sum(t["failed_before_fault"] for t in trs),
            "not_recovered": sum(1 for t in trs if not t["recovered"]), "trials": len(trs)}


def _fmt(x, unit=" s"):
    return "-" if x is None else f"{x:.2f}{unit}"


def _ratio(a, b):
    if a is None or b is None:
        return None
    if b == 0:
        return None
    return a / b


def _summary_rows(fig, membership, lease, kinds, k_names) -> list[dict]:
    rows = []
    peer = next((n for n in ("keepalived_default", "keepalived_tuned") if n in fig and n in k_names), None)
    tuned = fig.get("keepalived_tuned")
    for kind in kinds:
        f = fig.get(kind)
        if not f or not f["recovery_s"]["n"]:
            continue
        r = f["recovery_s"]
        if peer:
            p = fig[peer]["recovery_s"]
            ratio = _ratio(r["p50"], p["p50"])
            lead = (f"{ratio:.2f}x keepalived's p50" if ratio is not None else "n/a vs keepalived")
            comp = f"{FAULT_LABELS[peer]}: p50 {_fmt(p['p50'])}, p99 {_fmt(p['p99'])}"
            if tuned and peer != "keepalived_tuned" and tuned["recovery_s"]["n"]:
                comp += f"; advert_int 0.1: p50 {_fmt(tuned['recovery_s']['p50'])}"
        else:
            lead, comp = "no peer measured", "-"
        rows.append({"benchmark": TITLE, "metric": f"new connections fail after: {FAULT_LABELS[kind]} (p50/p99, "
                     f"{r['n']} trials; {lease})",
                     "value": f"{lead}: p50 {_fmt(r['p50'])}, p99 {_fmt(r['p99'])}, {f['failed']} of "
                              f"{f['connections']} connections failed",
                     "compared_with": comp})
    d, j = membership["departures"], membership["joins"]
    if d["n"] or j["n"]:
        ttl = lease.split(",")[0]
        rows.append({"benchmark": TITLE, "metric": f"etcd membership event -> every node applied the new table "
                     f"(p50/p99; {lease})",
                     "value": f"departures p50 {_fmt(d['p50'])}, p99 {_fmt(d['p99'])} ({d['n']} events); joins p50 "
                              f"{_fmt(j['p50'])}, p99 {_fmt(j['p99'])} ({j['n']})",
                     "compared_with": f"{ttl} (the wait before a dead node's departure event)"})
    return rows


def report(result: dict, plots: list[str]) -> str:
    p = result["params"]
    fig = result["figures"]
    t, e = p.get("timing", {}), p.get("etcd", {})
    lease = (f"lease TTL {t.get('lease_ttl_s')} s, fence {t.get('fence_timeout_s')} s, keepalive "
             f"{t.get('keepalive_interval_s')} s")
    raft = (f"etcd {e.get('version', '')} election timeout {e.get('election_timeout_ms')} ms, heartbeat "
            f"{e.get('heartbeat_interval_ms')} ms ({e.get('from', '')})")
    lines = [
        f"3 nodes in network namespaces, Debian's nginx under the farm module (checks every "
        f"{t.get('check_interval_s')} s, fall {t.get('check_fall')}, rise {t.get('check_rise')}), {lease}; {raft}. "
        f"{p['trials_per_fault']} trials per fault, victim rotating over n1..n3, one lab for all trials.",
        "",
        f"Load: one bounded open-loop client per trial in the client namespace, starting a new HTTP connection to "
        f"the VIP every {1000 / p['load']['rate']:.0f} ms whatever earlier ones do ({p['load']['timeout']:g} s "
        f"timeout), from {p['load']['pre_fault_s']:g} s before the fault until {p['load']['margin_s']:g} s after "
        "the survivors serve every bucket (keepalived: after the backup holds the VIP, +0.5 s).",
        "",
        f"**Recovery** (time until every new connection succeeds again): {p['recovery_definition']}. "
        f"Its resolution is the gap between connection starts ({1000 / p['load']['rate']:.0f} ms; about three "
        "times that for one node's buckets out of three). With 20 trials, p99 is close to the maximum.",
        "",
        "| fault | recovery p50 | recovery p99 | failed / connections (by error) | takeover p50 | settings |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in fig.items():
        r = f["recovery_s"]
        if name.startswith("keepalived"):
            setting = (f"advert_int {f['advert_int_s']:g} s (VRRPv{f['vrrp_version']}), priority {f['priority']}, "
                       f"master down interval {f['master_down_interval_s']:g} s")
        else:
            setting = f"{lease}; etcd election {e.get('election_timeout_ms')} ms / heartbeat " \
                      f"{e.get('heartbeat_interval_ms')} ms"
        errs = ", ".join(f"{k} {v}" for k, v in sorted((f.get("errors") or {}).items(), key=lambda kv: -kv[1]))
        lines.append(f"| {FAULT_LABELS[name]} | {_fmt(r['p50'])} | {_fmt(r['p99'])} | {f['failed']} / "
                     f"{f['connections']}{f' ({errs})' if errs else ''} | {_fmt(f['takeover_s']['p50'])} | "
                     f"{setting} |")
    lines += ["", "Takeover: for the farm, from the fault until every member applied the table without the victim "
              "(etcd watch); for keepalived, until the backup holds the VIP (polled every 10 ms).",
              "", "Membership event -> every node applied the new table (from the etcd watch: the member key "
              "deleted by lease expiry or its state changed, to the last `applied/<id>` reaching the new "
              f"generation among the members present). {lease}; {raft}.", "",
              "| fault | fault -> membership event p50 | event -> table written p50 | event -> all applied p50 | "
              "p99 | events |", "|---|---|---|---|---|---|"]
    for name, f in fig.items():
        if name.startswith("keepalived") or "event_to_applied_s" not in f:
            continue
        a = f["event_to_applied_s"]
        lines.append(f"| {FAULT_LABELS[name]} | {_fmt(f['fault_to_event_s']['p50'])} | "
                     f"{_fmt(f['event_to_table_s']['p50'])} | {_fmt(a['p50'])} | {_fmt(a['p99'])} | {a['n']} |")
    m = result["membership"]
    lines.append(f"| rejoins (restores between trials) | - | {_fmt(m['joins_table']['p50'])} | "
                 f"{_fmt(m['joins']['p50'])} | {_fmt(m['joins']['p99'])} | {m['joins']['n']} |")
    lines += ["", "Graceful stop is a drain: farmd leaves the table before it stops serving; the figure is what "
              "was measured. A connection that fails there is a SYN that arrived in the instant between the leaving "
              "node dropping a bucket's new connections and its new owner taking them (the owner waits until every "
              "node applied the table): it times out at this client's 1 s, the moment the kernel retransmits a SYN, "
              "by which time the new owner accepts it (the fault tests, whose client waits 3 s, count no failure "
              "in planned changes). "
              "Timeouts are dropped SYNs (a fenced node or nobody owns the bucket yet); refused connections come "
              "from a node whose application is down while it still holds its buckets. A health-check failure is detected within "
              "interval x fall and needs no lease expiry; kill -9 and link down wait for the lease TTL. "
              "keepalived's peer fault is the master's link going down (a kill -9 of keepalived leaves the VIP "
              "configured on the old master, which then keeps serving: no failover to time).", ""]
    for pl in plots:
        lines.append(f"![{Path(pl).stem}]({pl})")
    return "\n".join(lines) + "\n"


def plot(result: dict, outdir) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_data = result["figures"]
    names = [n for n in fig_data if fig_data[n]["recovery_s"]["n"]]
    if not names:
        return []
    short = {"graceful": "graceful\nstop", "health": "health\ncheck", "kill_agent": "kill -9\nfarmd",
             "link_down": "link\ndown", "keepalived_default": "keepalived\nadvert 1 s",
             "keepalived_tuned": "keepalived\nadvert 0.1 s"}
    p50 = [fig_data[n]["recovery_s"]["p50"] or 0 for n in names]
    p99 = [fig_data[n]["recovery_s"]["p99"] or 0 for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
    ax.bar([i + 0.2 for i in x], p99, width=0.4, label="p99")
    ax.set_xticks(list(x))
    ax.set_xticklabels([short.get(n, n) for n in names], fontsize=8)
    ax.set_ylabel("s until every new\nconnection succeeds")
    ttl = result["params"].get("timing", {}).get("lease_ttl_s")
    if ttl:
        ax.axhline(ttl, color="grey", linestyle=":", linewidth=1, label=f"lease TTL {ttl} s")
    ax.legend(fontsize=8)
    ax.set_title("Failover: nlbfarm faults vs keepalived (master link down)", fontsize=9)
    fig.tight_layout()
    name = "failover_recovery.png"
    fig.savefig(Path(outdir) / name)
    plt.close(fig)
    return [name]


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m nlbfarm.bench.failover",
                                 description="helpers of the failover benchmark (run it with python -m nlbfarm.bench)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="open-loop HTTP client (bounded)")
    p.add_argument("--vip", required=True)
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--rate", type=float, default=200.0, help="new connections per second")
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not (0 < args.rate <= 2000 and 0 < args.duration <= 600 and 0 < args.count <= 1_000_000):
        ap.error("--rate must be 0..2000, --duration 0..600 s, --count 1..1000000")
    with open(args.out, "a", buffering=1) as out:
        return probe(args.vip, args.port, args.rate, args.timeout, args.duration, args.count, out)


if __name__ == "__main__":
    sys.exit(main())
