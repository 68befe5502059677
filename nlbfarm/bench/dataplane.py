"""Data-plane cost: what the farm's filter costs a connection and a byte, against the no-filter path and the peers.

One lab (prefix ``bnd``: namespaces ``bnd-lan``, ``-etcd``, ``-client``,
``-n1..n3``, plus ``bnd-lb`` for HAProxy), Debian's nginx on every node, and
the same client and the same three nodes for every scenario. Each scenario
is measured once per round; rounds alternate their order (farm first, then
reversed, ...) so drift in the machine's other load hits them alike:

* ``no-filter``: the physical limit of this path. Farm agents stopped, no
  nftables or iptables rules on any node, the VIP only on n1, plain ARP (the
  client learns n1's own MAC), n1's nginx serves everything.
* ``farm``: nlbfarm's agents on all three nodes (the multicast cluster MAC,
  the jhash bucket filter before conntrack, the fence, the agents and etcd
  running). HTTP (port 80) uses the default affinity ``none``; the iperf3
  ports use affinity ``client``, because an iperf3 test is a control
  connection plus data connections that must reach the same server (NLB's
  "Single" affinity, as for FTP).
* ``farm-one``: the filter's own cost: farmd on n1 alone (it owns every
  bucket), n2 and n3 unplugged, and the lab switch forwarding the cluster MAC
  to n1's port only, as a switch with a static entry for it would. The path
  then carries exactly the frames of ``no-filter``; what differs is the
  multicast MAC, the bucket filter, the fence, the conntrack rules and the
  agent running beside nginx. This is the figure the 5% target is checked on.
* ``multicast-one`` (a diagnostic): farm-one's path and cluster MAC without
  the farm: n1 takes the VIP's frames with one nft rule before conntrack. The
  farm's own cost is farm-one against this; this against no-filter is the cost
  of receiving multicast frames through the lab's software bridge.
* ``flood`` (a diagnostic, not a peer): the cluster MAC without a filter:
  every node receives every frame, n2 and n3 drop it with one nft rule before
  conntrack, n1 serves everything. On one machine the bridge floods in
  software on the same CPUs; this row separates that cost from the filter's.
* ``xt_cluster``: the Linux peer, agents stopped, the recipe of
  ``iptables-extensions(8)`` (cluster): VIP and multicast MAC on every node,
  ``arptables`` rewriting the VIP's ARP to that MAC, conntrack with
  ``nf_conntrack_tcp_loose=0``, and in the mangle table ``-m cluster
  --cluster-total-nodes 3 --cluster-local-node i --cluster-hash-seed S -j MARK``
  then ``-m mark ! --mark ... -j DROP``. It runs through ``iptables-legacy``:
  Debian's default ``iptables`` (nft) translates ``-m cluster`` into native
  nftables (``jhash ct original saddr``), which would not run xt_cluster.
* ``haproxy``: a dedicated load-balancer host ``bnd-lb`` on the same bridge
  holds the VIP; HAProxy (mode tcp, one thread) balances port 80 round-robin
  to the three nginx and the iperf3 ports with ``stick on src``. Its switch
  port is down in every other scenario, so it receives nothing then.

xt_cluster hashes only the client address, so the client spreads its HTTP
connections over three source addresses (SNAT with ``numgen`` on the client,
the same in every scenario); the three addresses are picked so that the farm
sends them to three nodes, and the xt_cluster seed so that it does too.

CPU: the machine's first two CPUs are split the same way in every scenario:
the client programs (wrk, iperf3 clients) run pinned to the first, every
process of the serving side (nginx workers, iperf3 servers, farmd agents,
etcd, HAProxy) to the second, and each host's receive processing is steered
with RPS to its side's CPU (the client's to the first, every other host's
to the second). Transmit processing, including the bridge, runs on the
sending CPU.

Measurements per scenario and round: new-connection rate (wrk, one thread,
32 connections, ``Connection: close``: every request is a new TCP
connection), keep-alive request rate (wrk without the header), and bulk
throughput with iperf3, upload (client to VIP, the direction every node
receives and filters) and download (``-R``): three iperf3 clients at once,
each from its own client address to its own port, 2 streams each; every node
runs an iperf3 server on each of the three ports. Every figure is checked to
have gone where the scenario says: nginx's per-node counters (stub_status),
the iperf3 servers' logs (which node served which client address), the
filter's own counters, HAProxy's per-server counters and the client's ARP
entry for the VIP.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from nlbfarm.coordinator.hashing import bucket_of_address, jhash_bytes, reciprocal_scale
from nlbfarm.bench.netns import proc_cpu_s
from nlbfarm.errors import LabError
from nlbfarm.config import CheckSpec, TimingSection
from nlbfarm.lab import APP_PORT, SUBNET, VIP, Lab, LabTiming, node_addr, plug_host
from nlbfarm.node import iplib
from nlbfarm.node.dataplane import cluster_mac_for

TITLE = "Data-plane cost"

PREFIX = "bnd"
STATE_ROOT = Path(tempfile.gettempdir()) / "nlbfarm-bench"
NODES = ("n1", "n2", "n3")
LB_NS = f"{PREFIX}-lb"
LB_PORT = "p-lb"  # its port on the lab bridge
LB_ADDR = f"{SUBNET}.6"
STATUS_PORT = 8081  # nginx stub_status, on the node's loopback only
IPERF_PORTS = (5201, 5202, 5203)
IPERF_STREAMS = 2
SOURCE_CANDIDATES = [f"{SUBNET}.{i}" for i in range(30, 90)]
CLUSTER_MAC = cluster_mac_for(VIP)
XT_MARK = "0xffff"
WRK_CONNECTIONS = 32
# Port rules of the farm: HTTP with the default affinity, iperf3 with client affinity.
RULES = ({"protocol": "tcp", "ports": APP_PORT, "affinity": "none"},
         {"protocol": "tcp", "ports": f"{IPERF_PORTS[0]}-{IPERF_PORTS[-1]}", "affinity": "client"})

BASELINE = "no-filter"
# Order of the first round; the next round runs them in reverse, and so on.
SCENARIOS = ("farm", "farm-one", "multicast-one", "no-filter", "flood", "xt_cluster", "haproxy")
# The target is about the filter: it is checked on the farm whose path carries
# the same frames as no-filter (see the module docstring).
FILTER_COST = "farm-one"
SWITCH_TABLE = "bndswitch"     # the lab switch: flooded cluster-MAC frames are not for its own stack
ONE_PORT_TABLE = "bndoneport"  # farm-one and multicast-one: the cluster MAC goes to n1's port only
PEERS = ("xt_cluster", "haproxy")
PEER_NAMES = {"xt_cluster": "xt_cluster", "haproxy": "HAProxy"}
DIAGNOSTIC = ("flood", "multicast-one")
LABELS = {"no-filter": "no filter (one node)", "farm": "nlbfarm (3 nodes)",
          "farm-one": "nlbfarm, one node",
          "multicast-one": "cluster MAC to one node, no filter (diagnostic)",
          "flood": "flood only, n1 serves (diagnostic)",
          "xt_cluster": "xt_cluster (3 nodes)", "haproxy": "HAProxy LB + 3 nodes"}
METRICS = (("conn_rate", "new connections/s", "conn/s"), ("req_rate", "keep-alive requests/s", "req/s"),
           ("up_gbps", "upload Gbit/s", "Gbit/s"), ("down_gbps", "download Gbit/s", "Gbit/s"))
TARGET = 0.95  # the farm may cost a node at most 5% of its connection rate (farm-one vs multicast-one)
DEFAULT_TIMING = TimingSection()
DEFAULT_CHECK_INTERVAL = CheckSpec.model_fields["interval"].default
ONE_SERVER = ("no-filter", "farm-one", "multicast-one", "flood")  # n1 serves everything
# Counters that filter_counters() reads as running totals (the rest are rule counts).
PACKET_COUNTERS = frozenset({"accepted", "dropped_foreign", "dropped", "marked"})


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def xt_cluster_node(client: str, seed: int, total: int) -> int:
    """The node (1-based) whose ``-m cluster --cluster-local-node`` matches ``client``.

    xt_cluster hashes the connection's original source address:
    ``jhash_1word(addr, seed)`` (the address as the CPU loads it, i.e.
    little-endian bytes of the network-order address, which is what the
    kernel's byte-wise jhash of a 4-byte key also computes) and
    ``reciprocal_scale(hash, total)``; node i matches hash i - 1.
    """
    return reciprocal_scale(jhash_bytes(ipaddress.IPv4Address(client).packed, seed), total) + 1


def _median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _mask(cpu: int) -> str:
    return "1" + "0" * cpu


def _pin_pid(pid: int, cpu: int) -> None:
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError:
            pass


def _ns_pids(ns: str) -> list[int]:
    cp = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in cp.stdout.split() if p.isdigit()]


def parse_wrk(out: str) -> dict:
    def num(pat, default=0.0):
        m = re.search(pat, out)
        return float(m.group(1)) if m else default
    res = {"requests": int(num(r"(\d+) requests in")), "rate": num(r"Requests/sec:\s+([\d.]+)", None)}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    res["non_2xx"] = int(num(r"Non-2xx or 3xx responses: (\d+)"))
    return res


def parse_stub_status(text: str) -> tuple[int, int]:
    """(accepted connections, requests) from nginx's stub_status page."""
    m = re.search(r"server accepts handled requests\s+(\d+)\s+(\d+)\s+(\d+)", text)
    if not m:
        raise ValueError(f"not a stub_status page: {text[:200]!r}")
    return int(m.group(1)), int(m.group(3))


_ACCEPTED_RE = re.compile(r"Accepted connection from ([\d.]+), port")
_STREAM_RE = re.compile(r"local [\d.]+ port (\d+) connected to ([\d.]+) port")


def parse_iperf_log(text: str) -> dict:
    """Tests (control connections) and data streams per client address in an iperf3 server log."""
    tests, streams = {}, {}
    for a in _ACCEPTED_RE.findall(text):
        tests[a] = tests.get(a, 0) + 1
    for _port, a in _STREAM_RE.findall(text):
        streams[a] = streams.get(a, 0) + 1
    return {"tests": tests, "streams": streams}


class _BenchLab(Lab):
    """The lab, with nginx pinned to the serving CPU and a stub_status page on loopback."""

    server_cpu: int | None = None

    def write_nginx_conf(self, name: str) -> None:
        super().write_nginx_conf(name)
        path = self.nginx_conf(name)
        text = path.read_text()
        if "worker_processes 1;\n" not in text or not text.rstrip().endswith("}"):
            raise LabError(f"unexpected nginx config layout in {path}")
        if self.server_cpu is not None:
            text = text.replace("worker_processes 1;\n",
                                f"worker_processes 1;\nworker_cpu_affinity {_mask(self.server_cpu)};\n", 1)
        text = text.rstrip()[:-1] + (f"  server {{\n    listen 127.0.0.1:{STATUS_PORT};\n"
                                     "    location / { stub_status; }\n  }\n}\n")
        path.write_text(text)


# --------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------

class _Bench:
    def __init__(self, progress, quick: bool):
        self.progress = progress
        self.quick = quick
        self.trials = 1 if quick else 7
        self.t_close = 1 if quick else 3
        self.t_keep = 1 if quick else 2
        self.t_iperf = 1 if quick else 2
        self.load_start = _loadavg()
        cpus = sorted(os.sched_getaffinity(0))
        self.client_cpu, self.server_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
        # farmd's default timing (the tests' lab timing keeps agents busier):
        # what the agents cost the serving CPU is part of the farm's figure.
        self.lab = _BenchLab(prefix=PREFIX, state_root=STATE_ROOT, app="nginx", rules=RULES,
                             timing=LabTiming(keepalive_interval=DEFAULT_TIMING.keepalive_interval,
                                              lease_ttl=DEFAULT_TIMING.lease_ttl,
                                              fence_timeout=DEFAULT_TIMING.fence_timeout),
                             check_interval=DEFAULT_CHECK_INTERVAL, progress=lambda m: progress(f"lab: {m}"))
        self.lab.server_cpu = self.server_cpu
        self.haproxy: subprocess.Popen | None = None
        self.current: str | None = None
        self.agents_killed_at: float | None = None
        self.sources: list[str] = []
        self.xt_seed = 1
        self.farm_seed = self.farm_buckets = None
        self.farm_owners: tuple = ()
        self.notes: list[str] = []
        self.macs: dict[str, str] = {}
        self.results = {s: {"label": LABELS[s], "trials": [], "errors": []} for s in SCENARIOS}

    # ---- small tools ------------------------------------------------------

    def taskset(self, cpu: int | None) -> list[str]:
        return ["taskset", "-c", str(cpu)] if cpu is not None else []

    def run_ns(self, ns: str, argv: list[str], timeout: float = 30, check: bool = True, **kw):
        cp = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                            timeout=timeout, **kw)
        if check and cp.returncode != 0:
            raise LabError(f"{' '.join(argv)} in {ns} failed rc={cp.returncode}: "
                           f"{(cp.stderr or cp.stdout).strip()[-400:]}")
        return cp

    def node_ns(self, n: str) -> str:
        return self.lab.ns(n)

    def pin_serving_side(self) -> None:
        if self.server_cpu is None:
            return
        for ns in [self.lab.ns("etcd"), *[self.node_ns(n) for n in NODES], LB_NS]:
            if iplib.netns_exists(ns):
                for pid in _ns_pids(ns):
                    _pin_pid(pid, self.server_cpu)

    def http_get(self, ns: str, addr: str, port: int, timeout: float = 1.0) -> str:
        s = iplib.netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect((addr, port))
            s.sendall(f"GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data.decode(errors="replace")
        finally:
            s.close()

    def nginx_counts(self) -> dict:
        out = {}
        for n in NODES:
            try:
                out[n] = parse_stub_status(self.http_get(self.node_ns(n), "127.0.0.1", STATUS_PORT))
            except (OSError, ValueError) as exc:
                raise LabError(f"{n}: cannot read nginx stub_status: {exc}") from None
        return out

    def client_vip_mac(self) -> str | None:
        cp = self.run_ns(self.lab.ns("client"), ["ip", "-j", "neigh", "show", VIP], check=False)
        try:
            for e in json.loads(cp.stdout or "[]"):
                if e.get("lladdr"):
                    return e["lladdr"].lower()
        except ValueError:
            pass
        return None

    # ---- setup --------------------------------------------------------------

    def cleanup_lb(self) -> None:
        if self.haproxy is not None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(5)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait(5)
            self.haproxy = None
        if iplib.netns_exists(LB_NS):
            for pid in _ns_pids(LB_NS):  # a haproxy left by a crashed earlier run of this benchmark
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            iplib.delete_netns(LB_NS)

    def setup(self) -> None:
        lab, lan, client = self.lab, self.lab.ns("lan"), self.lab.ns("client")
        self.progress("adding the load-balancer host bnd-lb, client addresses, iperf3 servers")
        plug_host(lan, LB_NS, LB_PORT, [f"{LB_ADDR}/24"], port_up=False)  # plugged in only for HAProxy
        # A Linux bridge hands every multicast frame it floods to its own IP stack
        # as well, on the sending CPU; a hardware switch does not. In trial runs
        # that cost every multicast scenario several percent of its connection rate.
        # Declared and deleted first, so that a rerun of setup replaces the rule rather than adding a second.
        self.run_ns(lan, ["nft", "-f", "-"], input=(
            f"table bridge {SWITCH_TABLE}\ndelete table bridge {SWITCH_TABLE}\n"
            f"table bridge {SWITCH_TABLE} {{\n chain input {{\n  type filter hook input priority -300; "
            f"policy accept;\n  ether daddr {CLUSTER_MAC} drop\n }}\n}}\n"))
        # Client side (and the LB's, which is a client of the nodes): enough
        # ephemeral ports for tens of thousands of short connections.
        for ns in (client, LB_NS):
            iplib.set_sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65000")
            iplib.set_sysctl(ns, "net.ipv4.tcp_tw_reuse", 1)
        # Receive processing (softirq) of each host on its side's CPU (RPS):
        # the client's on the client CPU, every serving host's on the serving CPU.
        if self.server_cpu is not None:
            for ns, cpu in [(client, self.client_cpu), (lab.ns("etcd"), self.server_cpu), (LB_NS, self.server_cpu),
                            *[(self.node_ns(n), self.server_cpu) for n in NODES]]:
                self.run_ns(ns, ["sh", "-c", f"echo {1 << cpu:x} > /sys/class/net/eth0/queues/rx-0/rps_cpus"])
        self.macs = {n: iplib.link_mac("eth0", self.node_ns(n)).lower() for n in NODES}
        self.macs["lb"] = iplib.link_mac("eth0", LB_NS).lower()
        # The farm's table decides where a client address lands (client affinity, iperf3 ports).
        self.read_farm_table()
        self.sources = self.pick_sources()
        for a in self.sources:
            iplib.add_address("eth0", f"{a}/24", client)
        self.xt_seed = self.pick_xt_seed()
        # wrk has one source address, and xt_cluster hashes only that: the client
        # spreads its HTTP connections over the three source addresses (SNAT, the
        # same in every scenario), so every multi-node scenario serves from all nodes.
        smap = ", ".join(f"{i} : {a}" for i, a in enumerate(self.sources))
        self.run_ns(client, ["nft", "-f", "-"], input=(
            "table ip bndclient {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n"
            f"  ip daddr {VIP} tcp dport {APP_PORT} snat to numgen inc mod {len(self.sources)} map {{ {smap} }}\n"
            " }\n}\n"))
        iplib.set_sysctl(client, "net.netfilter.nf_conntrack_tcp_timeout_time_wait", 1)
        for n in NODES:
            ns = self.node_ns(n)
            # Every scenario carries the same empty legacy mangle table (xt_cluster
            # needs it, and the kernel keeps it once a namespace has used it).
            self.run_ns(ns, ["iptables-legacy", "-t", "mangle", "-L", "-n"])
            for port in IPERF_PORTS:
                log = lab.dir / f"{n}.iperf{port}.log"
                log.touch()
                lab.spawn(n, [*self.taskset(self.server_cpu), "iperf3", "-s", "-p", str(port), "--forceflush",
                              "--logfile", str(log)], f"{n}.iperf{port}.out")
        self.current = "farm"
        self.pin_serving_side()

    def read_farm_table(self) -> None:
        snap = self.lab.snapshot()
        if snap.settings is None or snap.table is None:
            raise LabError("the farm has no cluster settings or table in etcd")
        self.farm_seed, self.farm_buckets, self.farm_owners = (snap.settings.seed, snap.settings.buckets,
                                                               snap.table.owners)

    def farm_node(self, client: str) -> str | None:
        """Owner of ``client`` under affinity client (the iperf3 ports' rule)."""
        return self.farm_owners[bucket_of_address(client, self.farm_buckets, self.farm_seed)]

    def pick_sources(self) -> list[str]:
        """Three client addresses that the farm sends to three different nodes (iperf3)."""
        chosen, seen = [], set()
        for a in SOURCE_CANDIDATES:
            owner = self.farm_node(a)
            if owner not in seen:
                chosen.append(a)
                seen.add(owner)
            if len(chosen) == len(IPERF_PORTS):
                return chosen
        raise LabError(f"no three client addresses among {SOURCE_CANDIDATES[0]}.. land on three nodes")

    def pick_xt_seed(self) -> int:
        """A --cluster-hash-seed that spreads the three iperf3 client addresses too."""
        for seed in range(1, 10000):
            if len({xt_cluster_node(a, seed, len(NODES)) for a in self.sources}) == len(NODES):
                return seed
        return 1

    # ---- scenario switching -----------------------------------------------

    def leave(self) -> None:
        """Back to a bare lab: no agents, no rules, no VIP anywhere, no LB."""
        lab = self.lab
        if self.current in ("farm", "farm-one"):
            for n in NODES if self.current == "farm" else NODES[:1]:
                lab.kill(n, "agent", signal.SIGKILL)
            self.agents_killed_at = time.monotonic()
        self.run_ns(lab.ns("lan"), ["nft", "delete", "table", "bridge", ONE_PORT_TABLE], check=False)
        for n in NODES[1:]:
            lab.restore_link(n)
        if self.haproxy is not None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(5)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait(5)
            self.haproxy = None
        for n in NODES:
            ns = self.node_ns(n)
            self.run_ns(ns, ["iptables-legacy", "-t", "mangle", "-F"], check=False)
            self.run_ns(ns, ["nft", "flush", "ruleset"])
            self._del_addr(ns, f"{VIP}/32")
            try:
                iplib.delete_multicast_mac("eth0", CLUSTER_MAC, netns=ns)
            except iplib.NetError:
                pass
            self.run_ns(ns, ["conntrack", "-F"], check=False)
            # flood and xt_cluster set it; back to what a new link here starts with
            iplib.set_sysctl(ns, "net.ipv4.conf.eth0.arp_announce",
                             iplib.get_sysctl(ns, "net.ipv4.conf.default.arp_announce"))
            if not lab.alive(n, "app"):
                lab.start_nginx(n)
        self._del_addr(LB_NS, f"{VIP}/32")
        iplib.set_link_down(LB_PORT, lab.ns("lan"))
        self.run_ns(lab.ns("client"), ["ip", "neigh", "del", VIP, "dev", "eth0"], check=False)
        self.current = None

    @staticmethod
    def _del_addr(ns: str, cidr: str) -> None:
        try:
            iplib.delete_address("eth0", cidr, ns)
        except iplib.NotFound:
            pass

    def enter(self, sc: str) -> None:
        if self.current != sc:
            if self.current is not None:
                self.leave()
            self.current = sc  # from here on, leave() undoes whatever part of it was set up
            getattr(self, "_enter_" + sc.replace("-", "_"))()
        self.pin_serving_side()
        self.warm_up(sc)

    def _enter_no_filter(self) -> None:
        iplib.add_address("eth0", f"{VIP}/32", self.node_ns("n1"))

    def _start_farm(self, nodes: tuple[str, ...]) -> None:
        lab = self.lab
        # farmd's module starts nginx itself: hand it a stopped one.
        for n in nodes:
            if lab.alive(n, "app"):
                lab.stop_nginx(n)
        deadline = time.monotonic() + 10
        while any(lab.nginx_pidfile(n).exists() for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.agents_killed_at is not None:  # the old members' leases must be gone first
            wait = self.agents_killed_at + lab.timing.lease_ttl + 1.5 - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        for n in nodes:
            lab.start_agent(n)
        lab.wait_converged(list(nodes), timeout=30)

    def _enter_farm(self) -> None:
        self._start_farm(NODES)
        self.read_farm_table()

    def _one_port(self) -> None:
        """n2 and n3 unplugged, and the cluster MAC forwarded to n1's port only."""
        lab = self.lab
        for n in NODES[1:]:
            lab.cut_link(n)
        # The bridge would flood the multicast cluster MAC to the etcd host's port
        # too; forward it to n1's port only, as a switch with a static entry would.
        self.run_ns(lab.ns("lan"), ["nft", "-f", "-"], input=(
            f"table bridge {ONE_PORT_TABLE} {{\n chain forward {{\n  type filter hook forward priority 0; "
            f"policy accept;\n  ether daddr {CLUSTER_MAC} oifname != \"p-{NODES[0]}\" drop\n }}\n}}\n"))

    def _enter_farm_one(self) -> None:
        """farmd on n1 alone, on a path that carries the frames no-filter's does."""
        self._one_port()
        self._start_farm(NODES[:1])

    def _enter_multicast_one(self) -> None:
        """farm-one's path and cluster MAC without the farm: what the filter adds is farm-one minus this."""
        self._one_port()
        self._flood_rules(NODES[0], "meta pkttype set host counter accept")

    def _enter_flood(self) -> None:
        """The cluster MAC's flood without a filter: every node receives every packet, n1 takes them all."""
        for n in NODES:
            self._flood_rules(n, "meta pkttype set host counter accept" if n == "n1" else "counter drop")

    def _flood_rules(self, n: str, verdict: str) -> None:
        """The cluster MAC on node ``n`` with one rule for the VIP's packets before conntrack."""
        ns = self.node_ns(n)
        iplib.set_sysctl(ns, "net.ipv4.conf.eth0.arp_announce", 2)
        self.run_ns(ns, ["nft", "-f", "-"], input=(
            "table arp bndflood {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
            f"  arp saddr ip {VIP} arp saddr ether set {CLUSTER_MAC}\n }}\n}}\n"
            "table inet bndflood {\n chain pre {\n  type filter hook prerouting priority -300; policy accept;\n"
            f"  ip daddr {VIP} {verdict}\n }}\n}}\n"))
        iplib.add_multicast_mac("eth0", CLUSTER_MAC, netns=ns)
        iplib.add_address("eth0", f"{VIP}/32", ns)

    def _enter_xt_cluster(self) -> None:
        for i, n in enumerate(NODES, 1):
            ns = self.node_ns(n)
            iplib.set_sysctl(ns, "net.ipv4.conf.eth0.arp_announce", 2)
            # the arptables recipe of iptables-extensions(8), limited to the VIP
            self.run_ns(ns, ["arptables", "-A", "OUTPUT", "-o", "eth0", "-s", VIP, "--h-length", "6",
                             "-j", "mangle", "--mangle-mac-s", CLUSTER_MAC])
            iplib.add_multicast_mac("eth0", CLUSTER_MAC, netns=ns)
            iplib.set_sysctl(ns, "net.netfilter.nf_conntrack_tcp_loose", 0)
            self.run_ns(ns, ["iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-d", VIP, "-m", "cluster",
                             "--cluster-total-nodes", str(len(NODES)), "--cluster-local-node", str(i),
                             "--cluster-hash-seed", str(self.xt_seed), "-j", "MARK", "--set-mark", XT_MARK])
            self.run_ns(ns, ["iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-d", VIP, "-m", "mark",
                             "!", "--mark", XT_MARK, "-j", "DROP"])
            iplib.add_address("eth0", f"{VIP}/32", ns)

    def haproxy_cfg(self) -> Path:
        lab = self.lab
        servers = "\n".join(f"  server {n} {node_addr(i)}:{APP_PORT}" for i, n in enumerate(NODES, 1))
        iperf_servers = "\n".join(f"  server {n} {node_addr(i)}" for i, n in enumerate(NODES, 1))
        cfg = lab.dir / "haproxy.cfg"
        cfg.write_text(f"""# HAProxy on the dedicated load-balancer host {LB_NS}
global
  nbthread 1
  maxconn 4000
  stats socket {lab.dir}/haproxy.sock mode 600 level admin
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend web
  bind {VIP}:{APP_PORT}
  default_backend web
backend web
  balance roundrobin
{servers}
frontend iperf
  bind {VIP}:{IPERF_PORTS[0]}-{IPERF_PORTS[-1]}
  default_backend iperf
backend iperf
  # an iperf3 test's control and data connections must reach one server
  balance roundrobin
  stick-table type ip size 1k
  stick on src
{iperf_servers}
""")
        return cfg

    def _enter_haproxy(self) -> None:
        lab = self.lab
        if shutil.which("haproxy") is None:
            raise LabError("haproxy is not installed (Debian package haproxy)")
        cfg = self.haproxy_cfg()
        (lab.dir / "haproxy.sock").unlink(missing_ok=True)
        iplib.add_address("eth0", f"{VIP}/32", LB_NS)
        iplib.set_link_up(LB_PORT, lab.ns("lan"))
        self.run_ns(LB_NS, ["haproxy", "-c", "-q", "-f", str(cfg)])
        log = open(lab.dir / "haproxy.log", "ab")
        try:
            self.haproxy = subprocess.Popen(["ip", "netns", "exec", LB_NS, *self.taskset(self.server_cpu),
                                             "haproxy", "-f", str(cfg), "-db"], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + 10
        while not (lab.dir / "haproxy.sock").exists():
            if self.haproxy.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"haproxy did not start: {(lab.dir / 'haproxy.log').read_text()[-400:]}")
            time.sleep(0.05)

    def warm_up(self, sc: str) -> None:
        """One request through the VIP (which makes the client resolve it), then check who answered ARP."""
        deadline = time.monotonic() + 10
        last = None
        while time.monotonic() < deadline:
            try:
                if " 200 " in self.http_get(self.lab.ns("client"), VIP, APP_PORT).split("\r\n", 1)[0]:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise LabError(f"{sc}: no HTTP answer through the VIP within 10 s (last error: {last})")

    def expected_mac(self, sc: str) -> str:
        return {"no-filter": self.macs["n1"], "haproxy": self.macs["lb"]}.get(sc, CLUSTER_MAC)

    def cpu_times(self) -> dict:
        vals = {}
        with open("/proc/stat") as f:
            for ln in f:
                if ln.startswith("cpu") and ln[3].isdigit():
                    parts = ln.split()
                    vals[int(parts[0][3:])] = [int(x) for x in parts[1:8]]
        return vals

    def cpu_busy(self, a: dict, b: dict) -> dict:
        """Busy share of the client and the serving CPU between two cpu_times() readings."""
        out = {}
        for role, cpu in (("client", self.client_cpu), ("serving", self.server_cpu)):
            if cpu is None or cpu not in a or cpu not in b:
                continue
            d = [y - x for x, y in zip(a[cpu], b[cpu])]
            out[role] = round(1 - d[3] / sum(d), 2) if sum(d) else None
        return out

    def agent_cpu_seconds(self) -> float:
        """CPU time used so far by the running farmd agents (0.0 when none runs)."""
        total = 0.0
        for n in NODES:
            pid = self.lab.pid(n, "agent")
            if not pid or not self.lab.alive(n, "agent"):
                continue
            try:
                total += proc_cpu_s(pid)
            except (OSError, ValueError, IndexError):
                continue
        return total

    # ---- counters ----------------------------------------------------------

    def filter_counters(self, sc: str) -> dict:
        """Per node, what its filter let through and dropped (packets), or the rule count (none expected)."""
        out = {}
        for n in NODES:
            ns = self.node_ns(n)
            if sc == "farm" or (sc == "farm-one" and n == NODES[0]):
                cp = self.run_ns(ns, ["nft", "-j", "list", "counters", "table", "inet", "nlbfarm"])
                c = {"accepted": 0, "dropped_foreign": 0}
                for item in json.loads(cp.stdout)["nftables"]:
                    ctr = item.get("counter")
                    if ctr:
                        for k in c:
                            if ctr["name"].startswith(k + "_"):
                                c[k] += ctr["packets"]
                out[n] = c
            elif sc == "flood" or (sc == "multicast-one" and n == NODES[0]):
                cp = self.run_ns(ns, ["nft", "-j", "list", "table", "inet", "bndflood"])
                c = {"accepted": 0, "dropped": 0}
                for item in json.loads(cp.stdout)["nftables"]:
                    expr = item.get("rule", {}).get("expr", [])
                    pk = sum(e["counter"]["packets"] for e in expr if isinstance(e, dict) and "counter" in e)
                    if any(isinstance(e, dict) and "accept" in e for e in expr):
                        c["accepted"] += pk
                    elif any(isinstance(e, dict) and "drop" in e for e in expr):
                        c["dropped"] += pk
                out[n] = c
            elif sc == "xt_cluster":
                cp = self.run_ns(ns, ["iptables-legacy", "-t", "mangle", "-L", "PREROUTING", "-v", "-x", "-n"])
                rows = [ln.split() for ln in cp.stdout.splitlines()[2:] if ln.strip()]
                c = {"marked": 0, "dropped": 0}
                for r in rows:
                    if r[2] == "MARK":
                        c["marked"] += int(r[0])
                    elif r[2] == "DROP":
                        c["dropped"] += int(r[0])
                out[n] = c
            else:
                nft = self.run_ns(ns, ["nft", "list", "ruleset"]).stdout
                ipt = self.run_ns(ns, ["iptables-legacy", "-t", "mangle", "-S"]).stdout
                out[n] = {"nft_rules": sum(1 for ln in nft.splitlines()
                                           if ln.strip() and not ln.strip().startswith(("table", "chain", "}", "type"))),
                          "iptables_rules": sum(1 for ln in ipt.splitlines() if ln.startswith("-A"))}
        return out

    def haproxy_counts(self) -> dict:
        path = self.lab.dir / "haproxy.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(2)
            s.connect(str(path))
            s.sendall(b"show stat\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        lines = data.decode().splitlines()
        head = lines[0].lstrip("# ").split(",")
        out = {}
        for ln in lines[1:]:
            row = dict(zip(head, ln.split(",")))
            if row.get("svname") in NODES:
                out[f"{row['pxname']}/{row['svname']}"] = int(row.get("stot") or 0)
        return out

    def iperf_logs(self) -> dict:
        return {(n, p): (self.lab.dir / f"{n}.iperf{p}.log") for n in NODES for p in IPERF_PORTS}

    # ---- measurements ------------------------------------------------------

    def wrk(self, keepalive: bool, seconds: int) -> dict:
        argv = [*self.taskset(self.client_cpu), "wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s",
                "--timeout", "2s", *([] if keepalive else ["-H", "Connection: close"]), f"http://{VIP}/"]
        cp = self.run_ns(self.lab.ns("client"), argv, timeout=seconds + 30, check=False)
        if cp.returncode != 0:
            raise LabError(f"wrk failed rc={cp.returncode}: {(cp.stderr or cp.stdout).strip()[-300:]}")
        res = parse_wrk(cp.stdout)
        if res["rate"] is None:
            raise LabError(f"no rate in wrk's output: {cp.stdout[-300:]!r}")
        return res

    def iperf(self, reverse: bool, seconds: int) -> dict:
        offsets = {k: p.stat().st_size for k, p in self.iperf_logs().items()}
        procs = []
        for src, port in zip(self.sources, IPERF_PORTS):
            argv = self.lab.client_cmd([*self.taskset(self.client_cpu), "iperf3", "-c", VIP, "-p", str(port),
                                        "-B", src, "-P", str(IPERF_STREAMS), "-t", str(seconds), "-J",
                                        "--connect-timeout", "3000", *(["-R"] if reverse else [])])
            procs.append((src, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        bps, errors = 0.0, []
        for src, p in procs:
            try:
                out, err = p.communicate(timeout=seconds + 25)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                errors.append(f"{src}: iperf3 did not finish within {seconds + 25} s")
                continue
            try:
                d = json.loads(out)
            except ValueError:
                errors.append(f"{src}: rc={p.returncode} {(err or out).strip()[-200:]}")
                continue
            if d.get("error"):
                errors.append(f"{src}: {d['error']}")
                continue
            bps += d["end"]["sum_received"]["bits_per_second"]
        placed = {}
        for (n, port), path in self.iperf_logs().items():
            with open(path) as f:
                f.seek(offsets[(n, port)])
                got = parse_iperf_log(f.read())
            for a, k in got["tests"].items():
                placed.setdefault(a, []).append({"node": n, "port": port, "tests": k,
                                                 "streams": got["streams"].get(a, 0)})
        return {"gbps": None if errors else round(bps / 1e9, 3), "errors": errors, "placed": placed}

    def measure(self, sc: str, rnd: int) -> dict:
        t = {"round": rnd, "checks": []}
        check = lambda what, ok, detail="": t["checks"].append(  # noqa: E731
            {"what": what, "ok": bool(ok), "detail": detail})
        mac = self.client_vip_mac()
        check("client's ARP entry for the VIP", mac == self.expected_mac(sc),
              f"{mac} (expected {self.expected_mac(sc)})")
        hap = sc == "haproxy"
        f0 = self.filter_counters(sc)
        for kind, keep, secs in (("close", False, self.t_close), ("keepalive", True, self.t_keep)):
            n0, h0 = self.nginx_counts(), (self.haproxy_counts() if hap else {})
            c0, a0, m0 = self.cpu_times(), self.agent_cpu_seconds(), time.monotonic()
            w = self.wrk(keep, secs)
            t[f"cpu_busy_{kind}"] = self.cpu_busy(c0, self.cpu_times())
            if a0:  # farmd's own share of one CPU while the load ran
                t[f"agent_cpu_{kind}"] = round((self.agent_cpu_seconds() - a0) / (time.monotonic() - m0), 4)
            n1, h1 = self.nginx_counts(), (self.haproxy_counts() if hap else {})
            idx = 0 if kind == "close" else 1  # accepted connections for close, requests for keep-alive
            # minus 1: the second stub_status read counts itself
            per = {n: n1[n][idx] - n0[n][idx] - 1 for n in NODES}
            t["conn_rate" if kind == "close" else "req_rate"] = round(w["rate"], 1)
            t[f"wrk_{kind}"] = w
            t[f"per_node_{kind}"] = per
            total = sum(per.values())
            done = w["requests"]
            check(f"{kind}: nginx counted what wrk did", done > 0 and 0.98 * done <= total <= done * 1.05 + 2 * WRK_CONNECTIONS,
                  f"nginx {total}, wrk {done}")
            self.check_spread(sc, per, check, kind)
            if hap:
                hd = {k: h1.get(k, 0) - h0.get(k, 0) for k in h1 if k.startswith("web/")}
                t[f"haproxy_{kind}"] = hd
                if kind == "close":
                    check("close: every connection went through HAProxy", abs(sum(hd.values()) - total) <= 2 * WRK_CONNECTIONS,
                          f"haproxy sessions {sum(hd.values())}, nginx accepts {total}")
        for kind, rev in (("up", False), ("down", True)):
            r = self.iperf(rev, self.t_iperf)
            t[f"{kind}_gbps"] = r["gbps"]
            t[f"iperf_{kind}"] = r
            if r["errors"]:
                t.setdefault("errors", []).append(f"iperf3 {kind}: {'; '.join(r['errors'])}")
            self.check_iperf(sc, r, check, kind)
        f1 = self.filter_counters(sc)
        t["filter"] = {n: {k: f1[n][k] - f0[n].get(k, 0) if k in PACKET_COUNTERS else f1[n][k]
                           for k in f1[n]} for n in NODES}
        self.check_filter(sc, t["filter"], check)
        t["verified"] = all(c["ok"] for c in t["checks"])
        return t

    def http_target(self, sc: str) -> str | None:
        """The node that must serve all HTTP, or None when it must spread over all nodes."""
        return "n1" if sc in ONE_SERVER else None

    def check_spread(self, sc: str, per: dict, check, kind: str) -> None:
        total = sum(per.values()) or 1
        target = self.http_target(sc)
        shares = ", ".join(f"{n} {per[n] / total:.0%}" for n in NODES)
        if target:
            check(f"{kind}: all HTTP on {target}", all(per[n] == 0 for n in NODES if n != target) and per[target] > 0,
                  shares)
        elif kind == "close":  # thousands of connections: each node near its third
            check(f"{kind}: HTTP spread over all {len(NODES)} nodes", all(per[n] / total >= 0.2 for n in NODES), shares)
        else:  # 32 keep-alive connections: every node serves some
            check(f"{kind}: HTTP on all {len(NODES)} nodes", all(per[n] > 0 for n in NODES), shares)

    def iperf_target(self, sc: str, src: str) -> str | None:
        if sc in ONE_SERVER:
            return "n1"
        if sc == "farm":
            return self.farm_node(src)
        if sc == "xt_cluster":
            return f"n{xt_cluster_node(src, self.xt_seed, len(NODES))}"
        return None

    def check_iperf(self, sc: str, r: dict, check, kind: str) -> None:
        placed = r["placed"]
        if sc == "haproxy":
            seen = placed.get(LB_ADDR, [])
            nodes = sorted({p["node"] for p in seen})
            ok = sum(p["tests"] for p in seen) == len(self.sources) and set(placed) == {LB_ADDR}
            check(f"iperf3 {kind}: every test came from HAProxy", ok,
                  f"{sum(p['tests'] for p in seen)} tests from {LB_ADDR} on {', '.join(nodes)}; sources seen: "
                  f"{sorted(placed)}")
            return
        details, ok = [], True
        for src in self.sources:
            want = self.iperf_target(sc, src)
            got = placed.get(src, [])
            nodes = sorted({p["node"] for p in got})
            streams = sum(p["streams"] for p in got)
            good = nodes == [want] and streams == IPERF_STREAMS
            ok &= good
            details.append(f"{src}->{','.join(nodes) or 'nowhere'} ({streams} streams, expected {want})")
        check(f"iperf3 {kind}: each client on its node", ok, "; ".join(details))

    def check_filter(self, sc: str, f: dict, check) -> None:
        if sc == "farm":
            check("farm filter: every node accepted its share and dropped the others'",
                  all(f[n]["accepted"] > 0 and f[n]["dropped_foreign"] > 0 for n in NODES), json.dumps(f))
        elif sc == "farm-one":
            check("farm-one: n1's filter accepted everything and dropped nothing; no rules on n2 and n3",
                  f["n1"]["accepted"] > 0 and f["n1"]["dropped_foreign"] == 0
                  and all(v == 0 for n in NODES[1:] for v in f[n].values()), json.dumps(f))
        elif sc == "multicast-one":
            check("multicast-one: n1 accepted everything; no rules on n2 and n3",
                  f["n1"]["accepted"] > 0 and f["n1"]["dropped"] == 0
                  and all(v == 0 for n in NODES[1:] for v in f[n].values()), json.dumps(f))
        elif sc == "flood":
            check("flood: n1 accepted everything, n2 and n3 received it too and dropped it",
                  f["n1"]["accepted"] > 0 and f["n1"]["dropped"] == 0
                  and all(f[n]["dropped"] > 0 and f[n]["accepted"] == 0 for n in NODES[1:]), json.dumps(f))
        elif sc == "xt_cluster":
            check("xt_cluster: every node marked its share and dropped the others'",
                  all(f[n]["marked"] > 0 and f[n]["dropped"] > 0 for n in NODES), json.dumps(f))
        else:
            check("no filter rules on any node", all(v == 0 for n in NODES for v in f[n].values()), json.dumps(f))

    # ---- the whole run -------------------------------------------------------

    def run(self) -> dict:
        t0 = time.monotonic()
        self.cleanup_lb()
        try:
            with self.lab.running(nodes=len(NODES), wait=60):
                try:
                    self.setup()
                    for rnd in range(self.trials):
                        order = SCENARIOS if rnd % 2 == 0 else tuple(reversed(SCENARIOS))
                        for sc in order:
                            self.one(sc, rnd)
                finally:
                    self.cleanup_lb()
        finally:
            self.cleanup_lb()
        return self.result(time.monotonic() - t0)

    def one(self, sc: str, rnd: int) -> None:
        res = self.results[sc]
        self.progress(f"round {rnd + 1}/{self.trials}: {sc}")
        try:
            self.enter(sc)
        except Exception as exc:  # noqa: BLE001 - reported, and the other scenarios still run
            msg = f"round {rnd + 1}: could not set up {sc}: {type(exc).__name__}: {exc}"
            res["errors"].append(msg)
            self.progress(msg)
            try:
                self.leave()
            except Exception as exc2:  # noqa: BLE001
                res["errors"].append(f"round {rnd + 1}: cleaning up after {sc} failed too: {exc2}")
            return
        try:
            trial = self.measure(sc, rnd)
        except Exception as exc:  # noqa: BLE001 - reported, and the other scenarios still run
            msg = f"round {rnd + 1}: {sc} measurement failed: {type(exc).__name__}: {exc}"
            res["errors"].append(msg)
            self.progress(msg)
            return
        res["trials"].append(trial)
        bad = [c["what"] + ": " + c["detail"] for c in trial["checks"] if not c["ok"]]
        self.progress(f"   {sc}: {trial['conn_rate']} conn/s, {trial['req_rate']} req/s, up {trial['up_gbps']} "
                      f"Gbit/s, down {trial['down_gbps']} Gbit/s" + (f"; NOT VERIFIED: {bad}" if bad else ""))

    def result(self, seconds: float) -> dict:
        scen = {}
        for sc in SCENARIOS:
            r = self.results[sc]
            med = {m: _median([t.get(m) for t in r["trials"]]) for m, _, _ in METRICS}
            busy = {f"{role}_{kind}": _median([t.get(f"cpu_busy_{kind}", {}).get(role) for t in r["trials"]])
                    for role in ("client", "serving") for kind in ("close", "keepalive")}
            busy["agents_close"] = _median([t.get("agent_cpu_close") for t in r["trials"]])
            scen[sc] = {**r, "median": med, "cpu_busy_median": busy, "ran": bool(r["trials"]),
                        "verified": bool(r["trials"]) and all(t["verified"] for t in r["trials"])}
        for sc in SCENARIOS:
            s = scen[sc]
            s["ratio"] = {m: _ratio(s["median"].get(m), scen[BASELINE]["median"].get(m)) for m, _, _ in METRICS}
            s["paired_ratio"] = {m: _paired(s, scen[BASELINE], m) for m, _, _ in METRICS}
        # The farm against the same flood without any filter: what the filter itself adds.
        filter_only = {m: _ratio(scen["farm"]["median"].get(m), scen["flood"]["median"].get(m))
                       for m, _, _ in METRICS}
        # One node: the farm against the same cluster MAC and path without the farm.
        filter_own = {m: _ratio(scen[FILTER_COST]["median"].get(m), scen["multicast-one"]["median"].get(m))
                      for m, _, _ in METRICS}
        # The target's figure: the farm against the same node, path and cluster
        # MAC without it, paired within each round (the two run back to back).
        filter_own["conn_rate_paired"] = _paired(scen[FILTER_COST], scen["multicast-one"], "conn_rate")
        notes = list(self.notes)
        for sc in SCENARIOS:
            for e in scen[sc]["errors"]:
                notes.append(f"{LABELS[sc]}: {e}")
            if not scen[sc]["ran"]:
                notes.append(f"{LABELS[sc]} could not run in this lab: "
                             f"{scen[sc]['errors'][-1] if scen[sc]['errors'] else 'no trial completed'}")
            for t in scen[sc]["trials"]:
                for c in t["checks"]:
                    if not c["ok"]:
                        notes.append(f"{LABELS[sc]}, round {t['round'] + 1}: traffic check failed: "
                                     f"{c['what']}: {c['detail']}")
        load = [self.load_start, _loadavg()]
        # Only the load before this benchmark began says something about other
        # work: at the end the 1-minute average is this benchmark's own load.
        if load[0] > (os.cpu_count() or 1):
            notes.append(f"The machine was busy before this benchmark started (load average {load[0]:.1f} on "
                         f"{os.cpu_count()} CPUs): absolute figures swing from round to round; only the ratios "
                         "within a run mean something.")
        notes += [
            "Everything runs on one machine, and the switch is a Linux bridge on the same CPUs: flooding a client "
            "frame to every node (the farm's and xt_cluster's cluster MAC) is done in software by the sending "
            "CPU, and all three nodes' receive paths share the one serving CPU, where on real hardware the switch "
            "floods for free and each node has CPUs of its own. The 'flood only' row measures that part alone.",
            "The lab switch drops the cluster MAC's frames at its own bridge input hook, in every scenario: a "
            "Linux bridge passes each multicast frame it floods up to its own IP stack as well, on the sending "
            "CPU, which a hardware switch does not do.",
            "Debian's default `iptables` (nf_tables backend) translates `-m cluster` into native nftables "
            "(`jhash ct original saddr mod 3 ... meta pkttype set host`), so it would not run the kernel's "
            "xt_cluster match; the xt_cluster scenario therefore uses `iptables-legacy` (the ARP rewrite, as the "
            "man page's recipe, uses `arptables`, Debian's nf_tables one). Every node carries an empty legacy "
            "mangle table in every scenario, because the kernel keeps it once xt_cluster has used it.",
            "xt_cluster hashes the client address only, so one client address would land on one node: the client "
            f"spreads its HTTP connections over three source addresses ({', '.join(self.sources)}, SNAT on the "
            "client, the same in every scenario), and the xt_cluster seed is chosen so they reach three nodes.",
        ]
        return {
            "params": {
                "nodes": len(NODES), "trials": self.trials, "quick": self.quick,
                "app": "Debian nginx, 1 worker per node, access log off",
                "wrk": f"wrk -t1 -c{WRK_CONNECTIONS}: {self.t_close} s with 'Connection: close' (new-connection "
                       f"rate), {self.t_keep} s keep-alive (request rate)",
                "iperf3": f"3 clients at once, one per client address and VIP port "
                          f"{IPERF_PORTS[0]}-{IPERF_PORTS[-1]}, -P {IPERF_STREAMS} -t {self.t_iperf}, "
                          "upload and -R download",
                "cpus": {"client": self.client_cpu, "serving": self.server_cpu},
                "client_sources": self.sources, "xt_cluster_seed": self.xt_seed,
                "farm": {"buckets": self.farm_buckets, "rules": [dict(r) for r in RULES]},
                "scenario_order": "rounds alternate " + " -> ".join(SCENARIOS) + " and its reverse",
                "baseline": BASELINE, "target_ratio": TARGET, "seconds": round(seconds, 1),
                "agent_timing": f"farmd's default timing: lease TTL {self.lab.timing.lease_ttl} s, keepalive "
                                f"every {self.lab.timing.keepalive_interval} s, health check every "
                                f"{self.lab.check_interval} s",
                "load_average": {"start": self.load_start, "end": load[1]},
            },
            "scenarios": scen,
            "farm_vs_flood": filter_only,
            "farm_one_vs_multicast_one": filter_own,
            "summary": self.summary(scen, filter_only, filter_own),
            "notes": notes,
        }

    def summary(self, scen: dict, filter_only: dict, filter_own: dict) -> list[dict]:
        rows = []
        for m, title, _unit in METRICS:
            if not scen[BASELINE]["ran"]:
                break
            peers = ", ".join(f"{PEER_NAMES[sc]} {_fmt_ratio(scen[sc]['ratio'].get(m))}" for sc in PEERS)
            rows.append({"benchmark": TITLE, "metric": title,
                         "value": f"farm of 3 {_fmt_ratio(scen['farm']['ratio'].get(m))} of no-filter, "
                                  f"one node {_fmt_ratio(scen[FILTER_COST]['ratio'].get(m))} ({peers})",
                         "compared_with": "one node without filter rules, same lab and run"})
        fc = filter_own.get("conn_rate_paired")
        if fc is not None:
            f1, fr, fo = (scen[FILTER_COST]["ratio"].get("conn_rate"), scen["farm"]["ratio"].get("conn_rate"),
                          filter_only.get("conn_rate"))
            rows.append({"benchmark": TITLE, "metric": "farm filter cost on the connection rate (target: at most 5%)",
                         "value": f"{fc:.2f}x of the same node and cluster MAC without the farm (cost "
                                  f"{max(0.0, 1 - fc):.1%}; "
                                  f"{_spread(scen[FILTER_COST], scen['multicast-one'], 'conn_rate', TARGET)}), "
                                  f"target {'met' if fc >= TARGET else 'missed'} (median); "
                                  f"one node against no-filter (unicast, no multicast through the software "
                                  f"bridge): {_fmt_ratio(f1)}; 3 nodes sharing this machine's 2 CPUs: "
                                  f"{_fmt_ratio(fr)}, {_fmt_ratio(fo)} of the same flood without a filter",
                         "compared_with": "cluster MAC to one node without the farm, paired per round; no-filter; "
                                          "flood-only diagnostic, same run"})
        return rows


def _loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def _paired_values(s: dict, base: dict, m: str) -> list[float]:
    """Per round: this round's figure / the baseline's in the same round."""
    vals = []
    for t in s["trials"]:
        b = next((x.get(m) for x in base["trials"] if x["round"] == t["round"]), None)
        if t.get(m) and b:
            vals.append(t[m] / b)
    return vals


def _paired(s: dict, base: dict, m: str):
    """Median over rounds of (this round's figure / the baseline's in the same round)."""
    vals = _paired_values(s, base, m)
    return round(statistics.median(vals), 3) if vals else None


def _spread(s: dict, base: dict, m: str, target: float) -> str:
    """How the paired per-round ratios spread around the target (the verdict is their median)."""
    vals = _paired_values(s, base, m)
    if not vals:
        return "no rounds"
    below = sum(1 for v in vals if v < target)
    return f"rounds {min(vals):.2f} to {max(vals):.2f}, {below} of {len(vals)} below {target:.2f}"


def _fmt_ratio(r) -> str:
    return f"{r:.2f}x" if r is not None else "n/a"


def run(progress, quick: bool = False) -> dict:
    return _Bench(progress, quick).run()


# --------------------------------------------------------------------------
# report and plot
# --------------------------------------------------------------------------

def _pct(v) -> str:
    return f"{v:.0%}" if v is not None else "?"


def report(result: dict, plots: list[str]) -> str:
    p, scen = result["params"], result["scenarios"]
    cpus = p["cpus"]
    lines = [
        "How much of the path's capacity each way of spreading VIP traffic keeps: new HTTP connections per "
        "second, keep-alive requests per second and iperf3 bulk throughput through the VIP, each the median "
        f"over {p['trials']} round(s), with its ratio to the same path without any filter (one node, no rules, "
        "plain ARP). All scenarios ran in this run, on the same namespaces, nodes, nginx and client.",
        "",
        "- **no filter**: farm agents stopped, no nftables or iptables rules, the VIP only on n1: the physical "
        "limit of this path.",
        "- **nlbfarm**: farmd on all 3 nodes: multicast cluster MAC, the jhash bucket filter before conntrack, "
        "fence, agents and etcd running. HTTP with affinity `none`; the iperf3 ports with affinity `client` "
        "(an iperf3 test's control and data connections must meet on one node).",
        "- **nlbfarm, one node** (the filter's own cost): farmd on n1 alone, owning every bucket; n2 and n3 "
        "unplugged and the lab switch forwarding the cluster MAC to n1's port only (as a switch with a static "
        "entry would), so the path carries exactly the frames of no filter. What differs is the multicast MAC, "
        "the bucket filter, the fence, the conntrack rules and the agent running beside nginx.",
        "- **cluster MAC to one node** (diagnostic, not a peer): the same path as nlbfarm, one node, without the "
        "farm: n1 takes the VIP on the cluster MAC with one nft rule before conntrack (`meta pkttype set host`). "
        "nlbfarm, one node against this row is what the farm itself adds.",
        "- **xt_cluster** (the Linux peer): the `iptables-extensions(8)` cluster recipe on all 3 nodes: "
        f"`-m cluster --cluster-total-nodes 3 --cluster-local-node i --cluster-hash-seed {p['xt_cluster_seed']} "
        f"-j MARK`, `-m mark ! --mark {XT_MARK} -j DROP`, arptables giving the VIP the multicast MAC, "
        "conntrack with `nf_conntrack_tcp_loose=0`; run with `iptables-legacy`.",
        "- **HAProxy** (the dedicated load balancer that SafeKit and NLB exist to avoid): an extra host on the "
        "same bridge holds the VIP; HAProxy, one thread, mode tcp, round-robin to the 3 nginx (iperf3: "
        "`stick on src`).",
        "- **flood only** (diagnostic, not a peer): the cluster MAC without a filter: every node receives every "
        "frame, n2 and n3 drop it with one nft rule before conntrack, n1 serves everything. It separates the "
        "cost of flooding on this one machine from the cost of the filter.",
        "",
        f"Load: {p['wrk']}; iperf3: {p['iperf3']}. App: {p['app']}. "
        + (f"CPUs, shared the same way in every scenario: the client programs (wrk, iperf3 clients) run pinned "
           f"to CPU {cpus['client']}, everything serving (nginx, iperf3 servers, farmd, etcd, HAProxy) to CPU "
           f"{cpus['serving']}, and each host's receive processing is steered (RPS) to its side's CPU. "
           if cpus.get("client") is not None else "Only one CPU: nothing pinned. ")
        + f"Order: {p['scenario_order']}.",
        "",
        "| scenario | " + " | ".join(t for _, t, _ in METRICS) + " | CPU busy (client / serving) | traffic verified |",
        "|---|" + "---|" * (len(METRICS) + 2),
    ]
    for sc in SCENARIOS:
        s = scen[sc]
        if not s["ran"]:
            lines.append(f"| {s['label']} | " + " | ".join("did not run" for _ in METRICS) + " | - | - |")
            continue
        cells = []
        for m, _, _ in METRICS:
            v, r = s["median"].get(m), s["ratio"].get(m)
            if v is None:
                cells.append("failed")
            else:
                num = f"{v:,.0f}" if m in ("conn_rate", "req_rate") else f"{v:.2f}"
                cells.append(f"{num} ({_fmt_ratio(r)})")
        b = s["cpu_busy_median"]
        lines.append(f"| {s['label']} | " + " | ".join(cells)
                     + f" | {_pct(b.get('client_close'))} / {_pct(b.get('serving_close'))} | "
                     + f"{'yes' if s['verified'] else 'NO'} ({len(s['trials'])} of {p['trials']} rounds) |")
    lines += ["", "CPU busy: share of each CPU in use during the connection-rate test, whoever used it (other "
              "work on the machine included)."
              + "".join(f" The farmd agents of {scen[sc]['label']} used {_pct(scen[sc]['cpu_busy_median'].get('agents_close'))}"
                        f" of a CPU meanwhile ({p.get('agent_timing', 'lab timing')})."
                        for sc in ("farm", FILTER_COST)
                        if scen[sc]["ran"] and scen[sc]["cpu_busy_median"].get("agents_close") is not None), ""]
    f1 = scen[FILTER_COST]["ratio"].get("conn_rate")
    fr = scen["farm"]["ratio"].get("conn_rate")
    if f1 is not None or fr is not None:
        fo = result.get("farm_vs_flood", {})
        own = result.get("farm_one_vs_multicast_one", {})
        fc = own.get("conn_rate_paired")
        target = p["target_ratio"]
        if fc is not None:
            lines.append(
                f"Target: the farm filter costs at most {1 - target:.0%} of the connection rate. The filter's cost "
                "is what the farm takes from one node when everything else stays the same: nlbfarm, one node, "
                "against the cluster MAC to that node without the farm, paired within each round (they run back "
                f"to back): {fc:.3f}x, a cost of {max(0.0, 1 - fc):.1%}: **{'met' if fc >= target else 'missed'}** "
                f"on the median ({_spread(scen[FILTER_COST], scen['multicast-one'], 'conn_rate', target)}: the "
                "verdict sits within this lab's round-to-round noise). "
                f"It includes the bucket filter, the fence, conntrack and farmd itself (keep-alive requests "
                f"{_fmt_ratio(own.get('req_rate'))}, upload {_fmt_ratio(own.get('up_gbps'))}, medians). "
                f"Against no-filter, where the client sends to n1's own unicast MAC, the one-node farm keeps "
                f"{_fmt_ratio(f1)}: the cluster MAC alone keeps {_fmt_ratio(scen['multicast-one']['ratio'].get('conn_rate'))}, "
                "because this lab's switch is a Linux bridge that handles multicast frames in software on the "
                "client's CPU; a hardware switch and NIC deliver them like unicast ones.")
        lines.append(
            f"Three nodes on this one machine keep {_fmt_ratio(fr)} of the no-filter connection rate, and "
            f"{_fmt_ratio(fo.get('conn_rate'))} of the same flood without a filter "
            f"({_fmt_ratio(fo.get('req_rate'))} of its keep-alive request rate). That figure is not the "
            "filter's alone: here all three nodes' receive paths and the bridge's flooding share the same two "
            "CPUs, so each node's work for the frames it drops (see the foreign-packet benchmark for its cost "
            "per packet) and three nginx instead of one come out of the serving CPU, where in a real farm each "
            "node has CPUs of its own and the switch floods in hardware. Ratios paired within each round "
            "(median), connection rate: "
            + ", ".join(f"{LABELS[sc]} {_fmt_ratio(scen[sc]['paired_ratio'].get('conn_rate'))}"
                        for sc in SCENARIOS if sc != BASELINE) + ".")
        lines.append("")
    lines += ["Where the traffic went (last round: HTTP shares from each node's nginx counters, iperf3 from its "
              "servers' logs; every round is checked, see the JSON):", ""]
    for sc in SCENARIOS:
        s = scen[sc]
        if not s["trials"]:
            continue
        t = s["trials"][-1]
        per = t.get("per_node_close", {})
        tot = sum(per.values()) or 1
        ip = t.get("iperf_up", {}).get("placed", {})
        where = "; ".join(f"{a} on {'/'.join(sorted({x['node'] for x in v}))}" for a, v in sorted(ip.items()))
        lines.append(f"- {s['label']}: HTTP " + ", ".join(f"{n} {per.get(n, 0) / tot:.0%}" for n in NODES)
                     + f"; iperf3 upload: {where or 'none'}.")
    for name in plots:
        lines += ["", f"![data-plane cost]({name})"]
    return "\n".join(lines) + "\n"


def plot(result: dict, outdir) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = result["scenarios"]
    shown = [sc for sc in SCENARIOS if scen[sc]["ran"] and sc != BASELINE]
    if not shown or not scen[BASELINE]["ran"]:
        return []
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=90)
    width = 0.8 / len(shown)
    for i, sc in enumerate(shown):
        vals = [scen[sc]["ratio"].get(m) or 0 for m, _, _ in METRICS]
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(METRICS))]
        ax.bar(xs, vals, width, label=LABELS[sc], hatch="//" if sc in DIAGNOSTIC else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(TARGET, color="k", ls="--", lw=0.8, label=f"target {TARGET:.2f}")
    ax.set_xticks(range(len(METRICS)))
    ax.set_xticklabels([t for _, t, _ in METRICS], fontsize=8)
    ax.set_ylabel("ratio to no filter (1.0)")
    ax.set_title("Data-plane cost: medians as a ratio to one node without filter (higher is better)", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    name = "dataplane.png"
    fig.savefig(Path(outdir) / name)
    plt.close(fig)
    return [name]
