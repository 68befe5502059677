"""Rule programming: how long ``DataPlane.apply`` takes for big tables, and that it is one transaction.

For every bucket count B and node count N of the grid this builds the
accepting ranges of one member of a real table and applies its spec with the
project's own ``DataPlane`` in a fresh network namespace (``bnr-<pid>``):

* ``fresh``: ``rebalance`` from scratch, member ``n1`` (one contiguous range);
* ``joins``: the table grown by joining n1, n2, ... nN in turn, the member with
  the most ranges;
* ``churn``: that table after 2N seeded leave-and-rejoin events, the member
  with the most ranges (the realistic worst case: each event cuts ranges);
* ``strided``: every N-th bucket, B/N single-bucket ranges. No table
  ``rebalance`` makes looks like this; it is the upper bound for the set size.

Each trial tears the tables down (not timed), times a first apply (no nlbfarm
table in the kernel) and then a replace with a changed spec (the seed
toggled: ``apply`` replaces the whole table whatever changed, and the toggle
keeps its size). Trials run config after config in turn, so noise from other
load on the machine spreads over all of them; the figures are medians. The
baseline, measured the same way in the same run, is a trivial ruleset: one
VIP, one range.

One transaction: around every timed apply the helper reads the kernel's
ruleset generation id (``NFT_MSG_GETGEN`` on a netfilter netlink socket in the
namespace). Every committed transaction increments it by exactly one, so the
difference is the number of transactions the apply committed. Before the
timed trials a separate pass applies every config once (first apply and
replace) while ``nft monitor`` runs in the namespace and counts its
``# new generation`` lines per apply, mapped to the apply by the generation
numbers they print. (The timed trials run without a listener: the kernel
builds event messages for every rule and element only when one listens.)
The same pass lists the table back and counts the set elements the kernel
holds.
"""
from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from nlbfarm.bench.netns import Lock, delete_ns, remove_stale, sh

TITLE = "Rule programming: time to apply a new table, one transaction"

NS_PREFIX = "bnr-"
LOCK_PATH = "/run/lock/nlbfarm-bench-bnr.lock"
VIP = "198.19.0.1"
IFACE = "eth0"          # only a name in the fence set; it need not exist
SEED = 0x5EED
BUCKETS = (256, 4096, 16384, 65536)
NODES = (2, 8, 64)
QUICK_BUCKETS = (256, 4096)
QUICK_NODES = (2, 8)
LAYOUTS = ("fresh", "joins", "churn", "strided")
LAYOUT_LABELS = {"fresh": "fresh rebalance", "joins": "joins 1..N", "churn": "joins + churn",
                 "strided": "every N-th bucket"}
TRIALS = 9
QUICK_TRIALS = 2
REPLY_TIMEOUT_S = 120.0    # one helper request (the largest apply takes well under a second)
MONITOR_WAIT_S = 30.0      # for nft monitor to print a generation it has been sent
LOCK_WAIT_S = 900.0


# ---------------------------------------------------------------------------
# Tables and specs (pure)
# ---------------------------------------------------------------------------

def _members(k: int) -> dict[str, int]:
    return {f"n{i}": 1 for i in range(1, k + 1)}


def _most_fragmented(table) -> tuple[str, list[tuple[int, int]]]:
    from nlbfarm.coordinator.table import bucket_ranges, owned_buckets
    best = None
    for node in sorted({o for o in table if o is not None}, key=lambda n: int(n[1:])):
        r = bucket_ranges(owned_buckets(table, node))
        if best is None or len(r) > len(best[1]):
            best = (node, r)
    return best


def layout_ranges(layout: str, buckets: int, nodes: int) -> tuple[str, list[tuple[int, int]]]:
    """(member, its inclusive accepting ranges) for one layout of an N-node table."""
    from nlbfarm.coordinator.table import bucket_ranges, owned_buckets, rebalance
    if layout == "fresh":
        return "n1", bucket_ranges(owned_buckets(rebalance(None, _members(nodes), buckets), "n1"))
    if layout == "strided":
        return "n1", [(b, b) for b in range(0, buckets, nodes)]
    table = None
    for k in range(1, nodes + 1):
        table = rebalance(table, _members(k), buckets)
    if layout == "churn":
        rng = random.Random(buckets * 1000 + nodes)
        members = _members(nodes)
        for _ in range(2 * nodes):
            victim = rng.choice(sorted(members))
            del members[victim]
            table = rebalance(table, members, buckets)
            members[victim] = 1
            table = rebalance(table, members, buckets)
    elif layout != "joins":
        raise ValueError(f"unknown layout {layout!r}")
    return _most_fragmented(table)


def make_spec(ranges, buckets: int, seed: int = SEED):
    from nlbfarm.node.dataplane import DataPlaneSpec, cluster_mac_for
    return DataPlaneSpec(interface=IFACE, vips=(VIP,), cluster_mac=cluster_mac_for(VIP), buckets=buckets,
                         seed=seed, accepting=tuple(tuple(r) for r in ranges), fence_open=True,
                         fence_timeout=3600)


def ruleset_size(cmds: list[dict]) -> dict:
    """Rules, anonymous-set elements (all of them and those matched against the bucket hash) of a ruleset."""
    rules = elements = bucket_elements = 0

    def walk(x):
        nonlocal elements, bucket_elements
        if isinstance(x, dict):
            m = x.get("match")
            if isinstance(m, dict):
                right = m.get("right")
                is_set = isinstance(right, dict) and isinstance(right.get("set"), list)
                if isinstance(m.get("left"), dict) and "jhash" in m["left"]:
                    # The kernel lists a one-element set as its bare value or range.
                    bucket_elements += len(right["set"]) if is_set else 1
                    elements += len(right["set"]) if is_set else 1
                elif is_set:
                    elements += len(right["set"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for c in cmds:
        rule = c.get("add", {}).get("rule") if isinstance(c, dict) else None
        if rule:
            rules += 1
            walk(rule.get("expr"))
    return {"rules": rules, "elements": elements, "bucket_elements": bucket_elements}


def _listed_size(listing) -> dict:
    """The same counts for the ruleset the kernel hands back (``nft -j list ruleset``)."""
    cmds = [{"add": {"rule": item["rule"]}} for item in listing.get("nftables", [])
            if isinstance(item, dict) and "rule" in item]
    return ruleset_size(cmds)


# ---------------------------------------------------------------------------
# The helper: runs inside the namespace, applies on request
# ---------------------------------------------------------------------------

_NETLINK_NETFILTER = 12
_NFT_MSG_GETGEN = (10 << 8) | 16   # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN
_NFTA_GEN_ID = 1


def read_genid(sock: socket.socket) -> int:
    """The ruleset generation id of the socket's namespace (bumped once per committed transaction)."""
    seq = int(time.monotonic_ns() & 0x7FFFFFFF)
    # nlmsghdr (len, type, flags=NLM_F_REQUEST, seq, pid) + nfgenmsg (family, version, res_id)
    sock.send(struct.pack("=IHHII", 20, _NFT_MSG_GETGEN, 1, seq, 0) + struct.pack("=BBH", 0, 0, 0))
    data = sock.recv(65536)
    length, mtype = struct.unpack_from("=IH", data, 0)
    if mtype == 2:  # NLMSG_ERROR
        raise OSError(-struct.unpack_from("=i", data, 16)[0], "NFT_MSG_GETGEN failed")
    off = 20
    while off + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        if atype & 0x3FFF == _NFTA_GEN_ID:
            return struct.unpack_from(">I", data, off + 4)[0]
        off += (alen + 3) & ~3
    raise RuntimeError("no generation id in the kernel's answer")


def _helper_main() -> int:
    from nlbfarm.node.dataplane import DataPlane, build_counters_list, build_ruleset
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    dp = DataPlane()
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "quit":
                break
            g0 = read_genid(sock)
            reply: dict = {}
            if op == "teardown":
                dp.teardown()
            elif op == "apply":
                spec = make_spec(req["ranges"], req["buckets"], req["seed"])
                t0 = time.perf_counter()
                build_ruleset(spec)
                t1 = time.perf_counter()
                g0 = read_genid(sock)
                t2 = time.perf_counter()
                changed = dp.apply(spec)
                t3 = time.perf_counter()
                reply = {"build_ms": (t1 - t0) * 1e3, "apply_ms": (t3 - t2) * 1e3, "changed": changed}
                # What a replace spends reading the old table's counters (the
                # same listing apply makes first), timed on its own.
                t4 = time.perf_counter()
                dp.run(build_counters_list(spec.table), "counter listing")
                reply["counters_ms"] = (time.perf_counter() - t4) * 1e3
            elif op == "control":
                # Negative control for the counting: two transactions on purpose.
                dp.teardown()
                dp.apply(make_spec(req["ranges"], req["buckets"], req["seed"]))
            elif op == "list":
                reply = {"kernel": _listed_size(dp.run([{"list": {"ruleset": None}}], "ruleset listing"))}
            else:
                raise ValueError(f"unknown op {op!r}")
            reply.update(gen_before=g0, gen_after=read_genid(sock))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


class _Helper:
    def __init__(self, ns: str):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "nlbfarm.bench.rule_programming", "--helper"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"the apply helper gave no answer to {req.get('op')} "
                               f"(stderr: {self.proc.stderr.read()[-500:]!r})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the apply helper failed on {req.get('op')}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)


class _Monitor:
    """``nft monitor`` in the namespace; collects the generation numbers it prints."""

    _GEN = re.compile(r"^# new generation (\d+)")

    def __init__(self, ns: str):
        self.gens: list[int] = []
        self.lines = 0
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "monitor"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            m = self._GEN.match(line)
            with self._cond:
                self.lines += 1
                if m:
                    self.gens.append(int(m.group(1)))
                    self._cond.notify_all()

    def wait_for(self, gen: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(g >= gen for g in self.gens):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def between(self, g0: int, g1: int) -> int:
        with self._cond:
            return sum(1 for g in self.gens if g0 < g <= g1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------

def _configs(buckets, nodes) -> list[dict]:
    out = [{"key": "baseline", "layout": "baseline", "buckets": 4096, "nodes": 1, "member": "-",
            "ranges": [(0, 2047)]}]
    for b in buckets:
        for n in nodes:
            for layout in LAYOUTS:
                member, ranges = layout_ranges(layout, b, n)
                out.append({"key": f"{layout}-{b}-{n}", "layout": layout, "buckets": b, "nodes": n,
                            "member": member, "ranges": ranges})
    return out


def _med(xs):
    return statistics.median(xs) if xs else None


def run(progress, quick: bool = False) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("needs root (network namespaces, nftables)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed")
    buckets, nodes = (QUICK_BUCKETS, QUICK_NODES) if quick else (BUCKETS, NODES)
    trials = QUICK_TRIALS if quick else TRIALS
    from nlbfarm.node.dataplane import build_ruleset
    t_start = time.monotonic()
    progress("building tables")
    configs = _configs(buckets, nodes)
    for c in configs:
        c["n_ranges"] = len(c["ranges"])
        c.update(ruleset_size(build_ruleset(make_spec(c["ranges"], c["buckets"]))))
    notes: list[str] = []
    with Lock(LOCK_PATH, LOCK_WAIT_S):
        stale = remove_stale(NS_PREFIX)
        if stale:
            notes.append(f"removed namespaces left by an earlier run: {', '.join(stale)}")
        ns = f"{NS_PREFIX}{os.getpid()}"
        helper = monitor = None
        try:
            sh("ip", "netns", "add", ns)
            helper = _Helper(ns)
            monitor = _Monitor(ns)
            # Sync: the monitor has subscribed once it prints a teardown's generation.
            deadline = time.monotonic() + 10
            while True:
                r = helper.ask(op="teardown")
                if monitor.wait_for(r["gen_after"], 0.5):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("nft monitor printed no generation within 10 s")
            # The check must be able to fail: a teardown and an apply, two transactions.
            r = helper.ask(op="control", ranges=[(0, 1)], buckets=256, seed=SEED)
            if not monitor.wait_for(r["gen_after"], MONITOR_WAIT_S):
                raise RuntimeError(f"nft monitor did not print generation {r['gen_after']}")
            control = {"genid_delta": r["gen_after"] - r["gen_before"],
                       "monitor_generations": monitor.between(r["gen_before"], r["gen_after"])}
            progress(f"monitor pass: {len(configs)} configs, first apply and replace each")
            for c in configs:
                c["verify"] = []
                helper.ask(op="teardown")
                for kind, seed in (("first", SEED), ("replace", SEED + 1)):
                    r = helper.ask(op="apply", ranges=c["ranges"], buckets=c["buckets"], seed=seed)
                    if not monitor.wait_for(r["gen_after"], MONITOR_WAIT_S):
                        raise RuntimeError(f"nft monitor did not print generation {r['gen_after']}")
                    c["verify"].append({"kind": kind, "genid_delta": r["gen_after"] - r["gen_before"],
                                        "monitor_generations": monitor.between(r["gen_before"], r["gen_after"]),
                                        "apply_ms_with_monitor": round(r["apply_ms"], 3)})
                c["kernel"] = helper.ask(op="list")["kernel"]
            monitor.close()
            monitor_lines = monitor.lines
            monitor = None

            progress(f"timed pass: {trials} trials x {len(configs)} configs")
            for c in configs:
                c.update(first_ms=[], replace_ms=[], build_ms=[], counters_ms=[], genid_deltas=[])
            helper.ask(op="apply", ranges=[(0, 1)], buckets=256, seed=SEED)  # warm-up
            for t in range(trials):
                for c in configs:
                    helper.ask(op="teardown")
                    for kind, seed in (("first", SEED), ("replace", SEED + 1)):
                        r = helper.ask(op="apply", ranges=c["ranges"], buckets=c["buckets"], seed=seed)
                        if not r["changed"]:
                            raise RuntimeError("apply saw no change")
                        c[f"{kind}_ms"].append(round(r["apply_ms"], 3))
                        c["genid_deltas"].append(r["gen_after"] - r["gen_before"])
                        if kind == "first":
                            c["build_ms"].append(round(r["build_ms"], 3))
                        else:
                            c["counters_ms"].append(round(r["counters_ms"], 3))
                progress(f"trial {t + 1}/{trials} done")
            helper.ask(op="teardown")
        finally:
            if monitor is not None:
                monitor.close()
            if helper is not None:
                helper.close()
            delete_ns(ns)

    base = configs[0]
    base_first, base_replace = _med(base["first_ms"]), _med(base["replace_ms"])
    rows = []
    for c in configs:
        f, r = _med(c["first_ms"]), _med(c["replace_ms"])
        rows.append({
            "key": c["key"], "layout": c["layout"], "buckets": c["buckets"], "nodes": c["nodes"],
            "member": c["member"], "ranges": c["n_ranges"], "rules": c["rules"], "elements": c["elements"],
            "bucket_elements": c["bucket_elements"], "kernel": c["kernel"],
            "build_ms": _med(c["build_ms"]), "counters_ms": _med(c["counters_ms"]), "first_ms": f, "replace_ms": r,
            "first_x": f / base_first, "replace_x": r / base_replace,
            "first_trials": c["first_ms"], "replace_trials": c["replace_ms"],
            "genid_deltas": sorted(set(c["genid_deltas"])), "verify": c["verify"],
        })
    applies = sum(len(c["genid_deltas"]) + len(c["verify"]) for c in configs)
    one_tx = all(d == 1 for c in configs for d in c["genid_deltas"]) and all(
        v["genid_delta"] == 1 and v["monitor_generations"] == 1 for c in configs for v in c["verify"])
    kernel_ok = all(r["kernel"]["bucket_elements"] == r["bucket_elements"] and r["kernel"]["rules"] == r["rules"]
                    for r in rows)
    if not kernel_ok:
        bad = [r["key"] for r in rows if r["kernel"]["bucket_elements"] != r["bucket_elements"]
               or r["kernel"]["rules"] != r["rules"]]
        notes.append(f"the kernel listing differs from the built ruleset for: {', '.join(bad)}")
    notes.append("The timed applies ran without nft monitor (a listener makes the kernel build an event "
                 "per rule and element); the monitor pass applied each config once more with it running.")
    notes.append("apply_ms includes build_ruleset (also shown alone), libnftables' JSON parsing and "
                 "evaluation, the netlink batch and the kernel commit; a replace also reads the old counters first.")

    result = {
        "params": {"buckets": list(buckets), "nodes": list(nodes), "layouts": list(LAYOUTS), "trials": trials,
                   "baseline": "one VIP, one range (B=4096, buckets 0-2047)", "vip": VIP, "quick": quick,
                   "change": "seed toggled between the first apply and the replace",
                   "transaction_check": "kernel generation id before/after every apply; nft monitor "
                                        "'# new generation' lines per apply in a separate pass"},
        "baseline": {"first_ms": base_first, "replace_ms": base_replace, "rules": base["rules"],
                     "elements": base["elements"]},
        "rows": rows[1:],
        "transactions": {"applies": applies, "all_exactly_one": one_tx,
                         "genid_deltas": sorted({d for c in configs for d in c["genid_deltas"]}),
                         "monitor_counts": sorted({v["monitor_generations"] for c in configs for v in c["verify"]}),
                         "monitor_lines": monitor_lines, "control_two_transactions": control},
        "kernel_matches_built": kernel_ok,
        "notes": notes,
        "elapsed_s": round(time.monotonic() - t_start, 1),
    }
    result["summary"] = _summary(result)
    return result


def _tx_text(result) -> str:
    tx = result["transactions"]
    return "1 transaction" if tx["all_exactly_one"] else f"transactions per apply: {tx['genid_deltas']}"


def _summary(result) -> list[dict]:
    rows = result["rows"]
    bmax, nmax = max(result["params"]["buckets"]), max(result["params"]["nodes"])
    base = result["baseline"]
    out = []
    real = [r for r in rows if r["buckets"] == bmax and r["nodes"] == nmax and r["layout"] == "churn"]
    if real:
        r = real[0]
        out.append({"benchmark": "Rule programming",
                    "metric": f"apply a new table, B={bmax}, N={nmax} (churned table, {r['ranges']} ranges)",
                    "value": f"x{r['replace_x']:.2f} of a one-range ruleset: {r['replace_ms']:.1f} ms to replace "
                             f"(first apply {r['first_ms']:.1f} ms, x{r['first_x']:.2f}); {_tx_text(result)}",
                    "compared_with": f"one VIP, one range: {base['replace_ms']:.1f} ms (replace)"})
    worst = max(rows, key=lambda r: (r["bucket_elements"], r["replace_ms"]))
    out.append({"benchmark": "Rule programming",
                "metric": f"worst case: every N-th bucket, B={worst['buckets']}, N={worst['nodes']} "
                          f"({worst['ranges']} ranges)",
                "value": f"x{worst['replace_x']:.1f} of a one-range ruleset: {worst['replace_ms']:.0f} ms to replace "
                         f"(first apply {worst['first_ms']:.0f} ms); {_tx_text(result)}",
                "compared_with": f"one VIP, one range: {base['replace_ms']:.1f} ms (replace)"})
    tx = result["transactions"]
    out.append({"benchmark": "Rule programming", "metric": "transactions per apply",
                "value": (f"1 per apply in {tx['applies']} of {tx['applies']} applies (kernel generation id +1; "
                          f"nft monitor: one new generation each)") if tx["all_exactly_one"]
                else f"NOT one: generation deltas {tx['genid_deltas']}, monitor counts {tx['monitor_counts']}",
                "compared_with": "-"})
    return out


def report(result: dict, plots: list[str]) -> str:
    p, base, tx = result["params"], result["baseline"], result["transactions"]
    lines = [
        f"`DataPlane.apply` of one member's share of a table, in a fresh network namespace; medians of "
        f"{p['trials']} trials, run in turn over all configs. Baseline: a trivial ruleset ({p['baseline']}): "
        f"first apply {base['first_ms']:.2f} ms, replace {base['replace_ms']:.2f} ms, {base['rules']} rules, "
        f"{base['elements']} set elements. \"x\" columns are ratios to it. Layouts: "
        "*fresh* = `rebalance` from scratch (member n1); *joins* = grown by joins n1..nN, most fragmented "
        "member; *churn* = that plus 2N seeded leave/rejoin events, most fragmented member; *strided* = "
        "every N-th bucket (no real table; the upper bound of B/N ranges).",
        "",
        f"**Transactions:** {tx['applies']} applies; kernel generation-id deltas seen: {tx['genid_deltas']}; "
        f"`nft monitor` `# new generation` lines per apply: {tx['monitor_counts']} "
        f"({'exactly one transaction per apply' if tx['all_exactly_one'] else 'NOT one transaction per apply'}). "
        f"Control: a teardown followed by an apply, two transactions on purpose, counted "
        f"{tx['control_two_transactions']['genid_delta']} by the generation id and "
        f"{tx['control_two_transactions']['monitor_generations']} by the monitor. "
        f"The kernel's listing of every applied table had the built rules and bucket-set elements: "
        f"{'yes' if result['kernel_matches_built'] else 'no'}.",
        "",
        "| B | N | layout | member | ranges | rules | set elements | build ms | first apply ms | x | "
        "replace ms | x | counter read ms |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["buckets"], r["nodes"], LAYOUTS.index(r["layout"]))):
        lines.append(f"| {r['buckets']} | {r['nodes']} | {LAYOUT_LABELS[r['layout']]} | {r['member']} | "
                     f"{r['ranges']} | {r['rules']} | {r['elements']} | {r['build_ms']:.2f} | {r['first_ms']:.2f} | "
                     f"{r['first_x']:.2f} | {r['replace_ms']:.2f} | {r['replace_x']:.2f} | {r['counters_ms']:.2f} |")
    lines += ["", "*build ms*: `build_ruleset` alone (pure Python, part of every apply). *counter read ms*: "
              "the counter listing a replace makes before it sends the new table (part of *replace ms*), timed "
              "on its own. Set elements count both anonymous bucket sets (ICMP echo by client address and the port "
              "rule's pick chain) plus the small ICMP-type sets. With `nft monitor` listening (monitor pass, "
              "one apply each) the largest replace took "
              f"{max(v['apply_ms_with_monitor'] for r in result['rows'] for v in r['verify'] if v['kind'] == 'replace'):.1f} ms.",
              ""]
    for pth in plots:
        lines += [f"![apply time against set size]({pth})", ""]
    return "\n".join(lines)


def plot(result: dict, outdir) -> list[str]:
    from matplotlib.figure import Figure
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    markers = {"fresh": "o", "joins": "s", "churn": "^", "strided": "x"}
    for layout in LAYOUTS:
        rows = sorted((r for r in result["rows"] if r["layout"] == layout), key=lambda r: r["bucket_elements"])
        if rows:
            ax.scatter([max(r["bucket_elements"], 1) for r in rows], [r["replace_ms"] for r in rows],
                       marker=markers[layout], label=LAYOUT_LABELS[layout])
    ax.axhline(result["baseline"]["replace_ms"], color="k", linestyle=":", label="one-range ruleset")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bucket-set elements (both sets)")
    ax.set_ylabel("replace, median ms")
    ax.set_title("DataPlane.apply of a new table (one transaction)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "rule_programming.png"
    fig.savefig(outdir / name, dpi=90)
    return [name]


if __name__ == "__main__":
    if sys.argv[1:] == ["--helper"]:
        sys.exit(_helper_main())
    sys.exit("usage: python -m nlbfarm.bench.rule_programming --helper (the benchmark runs via nlbfarm.bench)")
