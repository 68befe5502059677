"""Table quality: balance and movement of the bucket table against known schemes.

For every node count N and bucket count B of the grid this builds the table
nlbfarm uses (``coordinator.table.rebalance``, equal weights, node ids
``node-01``...) and three reference schemes implemented here only for the
comparison, and measures

* balance: max/mean buckets per node with all N nodes serving; the best any
  table of B buckets can do is ceil(B/N) / (B/N);
* movement: buckets that change owner when one node joins (N-1 -> N) or
  leaves (N -> N-1), divided by the optimum B/N (the fair share of the node
  that joins or leaves). 1.0 is optimal; a scheme can go below 1.0 when the
  node happened to hold less than its share, which shows up as imbalance.
  "Collateral" moves are the part that neither goes to the joining node nor
  comes from the leaving one: buckets shuffled between nodes that stayed.

Samples: up to ``LEAVERS`` nodes spread over the ids (always the first and the
last) each leave the N-node table and join the other N-1. For nlbfarm, whose
table depends on its history, the N-node table is the one grown by joining
node-01, node-02, ... in turn; the join sample of the newest node is that
growth step, the join sample of any other node is its rejoin after its own
leave. The references are stateless (the table is a function of the member
set), so their join and leave samples move the same buckets.

Everything is deterministic: the references hash with blake2b, never with
Python's randomized ``hash``. Pure Python, so ``run`` needs no extra package;
``plot`` needs matplotlib.
"""
from __future__ import annotations

import hashlib
import statistics
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from math import ceil
from pathlib import Path

from nlbfarm.coordinator.table import rebalance

TITLE = "Table quality: balance and buckets moved, against Maglev, rendezvous and a hash ring"

NODES = (2, 3, 4, 8, 16, 32, 64)
BUCKETS = (256, 1024, 4096, 16384, 65536)
QUICK_NODES = (2, 3, 8)
QUICK_BUCKETS = (256, 1024)
LEAVERS = 64            # join/leave samples per N: every node up to N = 64
RING_VNODES = 100       # virtual nodes per node on the consistent-hash ring
MAGLEV_M = 65537        # Maglev lookup-table size: the paper's M, a prime
SUMMARY_B = 4096        # the bucket count the README summary compares at

METHODS = ("ours", "maglev", "rendezvous", "ring")
LABELS = {"ours": "nlbfarm rebalance", "maglev": f"Maglev (M={MAGLEV_M})",
          "rendezvous": "rendezvous (HRW)", "ring": f"hash ring ({RING_VNODES} vnodes)"}
SHORT = {"ours": "nlbfarm", "maglev": "Maglev", "rendezvous": "rendezvous", "ring": "ring"}

_M64 = (1 << 64) - 1


def node_id(i: int) -> str:
    """The id of node index ``i`` (0-based): node-01, node-02, ..."""
    return f"node-{i + 1:02d}"


def _h64(text: str, salt: bytes = b"") -> int:
    """A stable 64-bit hash (blake2b), independent of PYTHONHASHSEED."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, salt=salt).digest(), "little")


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-mixing 64-bit permutation."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


# --- reference schemes ------------------------------------------------------
# Each maps a member set (node indexes) to a list with one node index per slot
# (bucket, or Maglev table entry).

class Rendezvous:
    """Rendezvous / highest-random-weight hashing (Thaler & Ravishankar, 1998).

    Bucket b goes to the member with the highest score(b, node). The score is
    splitmix64(key(b) XOR key(node)) with blake2b keys, so each (bucket, node)
    pair gets a fixed pseudo-random weight. Every bucket's full node ranking is
    computed once; a member set then takes the first member in the ranking.
    """

    def __init__(self, buckets: int, nodes: int):
        keys = [_h64(node_id(i), b"hrw-node") for i in range(nodes)]
        self.buckets = buckets
        self.ranking: list[tuple[int, ...]] = []
        for b in range(buckets):
            kb = _h64(f"bucket-{b}", b"hrw-bucket")
            scores = [_mix64(kb ^ k) for k in keys]
            self.ranking.append(tuple(sorted(range(nodes), key=scores.__getitem__, reverse=True)))

    def owners(self, members: Sequence[int]) -> list[int]:
        ok = set(members)
        return [next(n for n in rank if n in ok) for rank in self.ranking]


class HashRing:
    """A consistent-hash ring (Karger et al., 1997) with virtual nodes.

    Each node puts ``vnodes`` points on a 64-bit circle (blake2b of
    "node-07#13"); bucket b hashes to a position and belongs to the first
    point at or after it, wrapping around.
    """

    def __init__(self, buckets: int, nodes: int, vnodes: int = RING_VNODES):
        self.points = {i: [_h64(f"{node_id(i)}#{v}", b"ring-node") for v in range(vnodes)]
                       for i in range(nodes)}
        self.positions = [_h64(f"bucket-{b}", b"ring-bucket") for b in range(buckets)]

    def owners(self, members: Sequence[int]) -> list[int]:
        ring = sorted((p, i) for i in members for p in self.points[i])
        keys = [p for p, _ in ring]
        size = len(ring)
        return [ring[bisect_left(keys, pos) % size][1] for pos in self.positions]


def maglev_table(names: Sequence[str], m: int = MAGLEV_M) -> list[int]:
    """The Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4, Pseudocode 1).

    Each backend gets offset = h1(name) mod M and skip = h2(name) mod (M-1) + 1,
    so its preference list permutation[j] = (offset + j * skip) mod M visits
    every entry (M prime). Backends take turns, each claiming its next
    preferred entry that is still empty, until all M entries are filled.
    Returns the index into ``names`` of each entry's backend.
    """
    if not names:
        return []
    offset = [_h64(n, b"maglev-offset") % m for n in names]
    skip = [_h64(n, b"maglev-skip") % (m - 1) + 1 for n in names]
    pos = list(offset)  # the next candidate entry of each backend
    entry = [-1] * m
    filled = 0
    while True:
        for i in range(len(names)):
            c, s = pos[i], skip[i]
            while entry[c] >= 0:
                c += s
                if c >= m:
                    c -= m
            entry[c] = i
            c += s
            pos[i] = c - m if c >= m else c
            filled += 1
            if filled == m:
                return entry


class Maglev:
    """Maglev on its own M-entry table: measured directly, independent of B."""

    def __init__(self, m: int = MAGLEV_M):
        self.m = m

    def owners(self, members: Sequence[int]) -> list[int]:
        members = sorted(members)
        return [members[e] for e in maglev_table([node_id(i) for i in members], self.m)]


# --- measurement -------------------------------------------------------------

def sample_nodes(n: int, k: int = LEAVERS) -> list[int]:
    """Up to ``k`` node indexes spread over 0..n-1, always with the first and the last."""
    if n <= k:
        return list(range(n))
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def balance(owners: Sequence, n: int) -> float:
    """max/mean slots per node; a node without any slot still counts in the mean."""
    tally: dict = {}
    for o in owners:
        tally[o] = tally.get(o, 0) + 1
    return max(tally.values()) / (len(owners) / n)


def _moves(before: Sequence, after: Sequence, node) -> tuple[int, int]:
    """(moved, collateral): slots whose owner changed, and those of them that
    neither went to nor came from ``node``."""
    moved = collateral = 0
    for a, c in zip(before, after):
        if a != c:
            moved += 1
            if a != node and c != node:
                collateral += 1
    return moved, collateral


def _row(method: str, n: int, size: int, bal: float, joins: list[tuple[int, int]],
         leaves: list[tuple[int, int]]) -> dict:
    opt = size / n
    jr = [m / opt for m, _ in joins]
    lr = [m / opt for m, _ in leaves]
    return {"method": method, "n": n, "b": size, "balance": round(bal, 4),
            "ideal": round(ceil(size / n) / opt, 4), "samples": len(joins),
            "join_median": round(statistics.median(jr), 4), "join_worst": round(max(jr), 4),
            "join_best": round(min(jr), 4),
            "leave_median": round(statistics.median(lr), 4), "leave_worst": round(max(lr), 4),
            "leave_best": round(min(lr), 4),
            "join_collateral_max": max(c for _, c in joins),
            "leave_collateral_max": max(c for _, c in leaves)}


def measure_ours(buckets: int, ns: Sequence[int]) -> list[dict]:
    """nlbfarm's rebalance: grown by joins node-01, node-02, ..., then leaves and rejoins."""
    def members(idx) -> dict[str, int]:
        return {node_id(i): 1 for i in idx}

    grown: dict[int, list] = {}
    table = None
    for k in range(1, max(ns) + 1):
        table = rebalance(table, members(range(k)), buckets)
        grown[k] = table
    rows = []
    for n in ns:
        full = grown[n]
        joins, leaves = [], []
        for x in sample_nodes(n):
            rest = members(i for i in range(n) if i != x)
            left = rebalance(full, rest, buckets)
            leaves.append(_moves(full, left, node_id(x)))
            if x == n - 1:  # the newest node: its join is the growth step
                joins.append(_moves(grown[n - 1], full, node_id(x)))
            else:
                joins.append(_moves(left, rebalance(left, members(range(n)), buckets), node_id(x)))
        rows.append(_row("ours", n, buckets, balance(full, n), joins, leaves))
    return rows


def measure_stateless(method: str, owners_of: Callable[[Sequence[int]], list[int]], size: int,
                      ns: Sequence[int]) -> list[dict]:
    """A reference scheme: a join of x into the others moves exactly what its leave moves."""
    rows = []
    for n in ns:
        full = owners_of(range(n))
        samples = [_moves(full, owners_of([i for i in range(n) if i != x]), x) for x in sample_nodes(n)]
        rows.append(_row(method, n, size, balance(full, n), samples, samples))
    return rows


def run(progress: Callable[[str], None], quick: bool = False) -> dict:
    ns = QUICK_NODES if quick else NODES
    bs = QUICK_BUCKETS if quick else BUCKETS
    rows: list[dict] = []
    seconds: dict[str, float] = {}
    for b in bs:
        progress(f"B={b}: nlbfarm rebalance")
        t0 = time.monotonic()
        rows += measure_ours(b, ns)
        seconds["ours"] = seconds.get("ours", 0.0) + time.monotonic() - t0
        for method, cls in (("rendezvous", Rendezvous), ("ring", HashRing)):
            progress(f"B={b}: {method}")
            t0 = time.monotonic()
            rows += measure_stateless(method, cls(b, max(ns)).owners, b, ns)
            seconds[method] = seconds.get(method, 0.0) + time.monotonic() - t0
    # Maglev's own table does not depend on B (and builds in ~20 ms in pure Python).
    progress(f"Maglev, M={MAGLEV_M}")
    t0 = time.monotonic()
    rows += measure_stateless("maglev", Maglev().owners, MAGLEV_M, ns)
    seconds["maglev"] = time.monotonic() - t0

    result = {
        "params": {"nodes": list(ns), "buckets": list(bs), "methods": list(METHODS),
                   "weights": "equal", "samples_per_n": LEAVERS, "ring_vnodes": RING_VNODES,
                   "maglev_m": MAGLEV_M, "hash": "blake2b (64-bit), splitmix64 for rendezvous scores",
                   "summary_b": SUMMARY_B if SUMMARY_B in bs else max(bs),
                   "compute_seconds": {k: round(v, 1) for k, v in seconds.items()}},
        "grid": rows,
        "notes": [
            "Balance is max/mean buckets per node with all N nodes serving; the best possible "
            "for B buckets is ceil(B/N)/(B/N) ('ideal').",
            "Moved/optimum is the buckets that change owner on one join (N-1 -> N) or leave "
            "(N -> N-1) over the fair share B/N; median and worst over up to "
            f"{LEAVERS} joining/leaving nodes per N. Collateral moves are those between nodes that stayed.",
            f"Maglev is measured on its own {MAGLEV_M}-entry lookup table (load = entries per "
            "backend, movement = entries that change backend, optimum M/N), so it has one value "
            "per N whatever B is; it is closest to the B=65536 column.",
            "Rendezvous, ring and Maglev are stateless, so a join of a node moves exactly the "
            "buckets its leave moves; nlbfarm's table depends on its history (grown by joins).",
        ],
    }
    if quick:
        result["notes"].append("Quick run: small grid; figures are not meaningful.")
    result["summary"] = _summary(result)
    return result


# --- summary, report, plots ----------------------------------------------------

def _rows(result: dict, method: str, b: int | None = None) -> list[dict]:
    return [r for r in result["grid"] if r["method"] == method and (b is None or r["b"] == b)]


def _methods(result: dict) -> list[str]:
    return [m for m in METHODS if _rows(result, m)]


def _ref_rows(result: dict, method: str, b: int) -> list[dict]:
    """A reference's rows to compare at B=b (Maglev has only its own M)."""
    return _rows(result, method) if method == "maglev" else _rows(result, method, b)


def _summary(result: dict) -> list[dict]:
    b = result["params"]["summary_b"]
    small = min(result["params"]["buckets"])
    refs = [m for m in _methods(result) if m != "ours"]
    ours = _rows(result, "ours", b)
    nrange = f"N={min(r['n'] for r in ours)}..{max(r['n'] for r in ours)}"
    compared = ", ".join(LABELS[m] for m in refs) + ", same node sets"

    def value(at: int, fmt: Callable[[list[dict], int], str]) -> str:
        refs_text = ", ".join(f"{SHORT[m]} {fmt(_ref_rows(result, m, at), 2)}" for m in refs)
        return f"{fmt(_rows(result, 'ours', at), 3)} ({refs_text})"

    def worst_balance(rows: list[dict], digits: int) -> str:
        return f"{max(r['balance'] for r in rows):.{digits}f}"

    def moved(kind: str) -> Callable[[list[dict], int], str]:
        return lambda rows, digits: (f"{statistics.median(r[kind + '_median'] for r in rows):.{digits}f}/"
                                     f"{max(r[kind + '_worst'] for r in rows):.{digits}f}")

    rows = [{"benchmark": "Table quality", "metric": f"balance max/mean, worst over {nrange}, B={at}",
             "value": value(at, worst_balance), "compared_with": compared}
            for at in dict.fromkeys((b, small))]
    for kind in ("join", "leave"):
        rows.append({"benchmark": "Table quality",
                     "metric": f"buckets moved per {kind} / optimum B/N, median/worst over {nrange}, B={b}",
                     "value": value(b, moved(kind)), "compared_with": compared})
    return rows


def _cell(result: dict, n: int, b: int, key: str, methods: list[str]) -> str:
    vals = []
    for m in methods:
        r = [x for x in _rows(result, m, b) if x["n"] == n]
        vals.append(f"{r[0][key]:.3f}" if m == "ours" and r else f"{r[0][key]:.2f}" if r else "-")
    return " / ".join(vals)


def _grid_table(result: dict, key: str, methods: list[str]) -> list[str]:
    """Rows N, columns B; each cell lists ``methods`` in order, plus a Maglev column."""
    bs = result["params"]["buckets"]
    maglev = bool(_rows(result, "maglev"))
    head = ["N"] + [f"B={b}" for b in bs] + ([f"Maglev M={MAGLEV_M}"] if maglev else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in result["params"]["nodes"]:
        cells = [str(n)] + [_cell(result, n, b, key, methods) for b in bs]
        if maglev:
            cells.append(_cell(result, n, MAGLEV_M, key, ["maglev"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(result: dict, plots: list[str]) -> str:
    p = result["params"]
    per_b = [m for m in ("ours", "rendezvous", "ring") if _rows(result, m)]
    ours = _rows(result, "ours")
    off_ideal = [f"N={r['n']} B={r['b']} ({r['balance']:.3f} vs {r['ideal']:.3f})"
                 for r in ours if r["balance"] != r["ideal"]]
    out = [
        f"Methods: {', '.join(LABELS[m] for m in _methods(result))}. Equal weights, node ids "
        f"node-01..; N = {', '.join(map(str, p['nodes']))}; B = {', '.join(map(str, p['buckets']))}. "
        "The references are implemented in `nlbfarm/bench/table_quality.py` for this comparison "
        f"only (blake2b hashes, {p['ring_vnodes']} virtual nodes per node on the ring, Maglev "
        f"measured on its own table of {p['maglev_m']} entries). Every node of the N is a "
        f"join and a leave sample (up to {p['samples_per_n']}). Cells read "
        f"{' / '.join(LABELS[m] for m in per_b)}.",
        "",
        "Balance, max/mean buckets per node with all N serving:",
        "",
        *_grid_table(result, "balance", per_b),
        "",
        ("nlbfarm's balance equals the ideal ceil(B/N)/(B/N) in every cell." if not off_ideal else
         "nlbfarm's balance differs from the ideal ceil(B/N)/(B/N) at: " + ", ".join(off_ideal) + "."),
        "",
    ]
    for stat in ("median", "worst"):
        out += [f"Buckets moved when one node leaves (N -> N-1) / optimum B/N, {stat} over the "
                "leaving nodes (for the stateless references also when it joins):", "",
                *_grid_table(result, f"leave_{stat}", per_b), ""]
    head = ["N"] + [f"B={b}" for b in p["buckets"]]
    out += ["nlbfarm, buckets moved when one node joins (N-1 -> N) / optimum B/N, median / worst "
            "over the joining nodes:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in p["nodes"]:
        cells = [str(n)] + [f"{_cell(result, n, b, 'join_median', ['ours'])} / "
                            f"{_cell(result, n, b, 'join_worst', ['ours'])}" for b in p["buckets"]]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    coll = [r for r in result["grid"] if r["join_collateral_max"] or r["leave_collateral_max"]]
    if coll:
        out += ["Collateral moves (between nodes that stayed), worst sample, where any:", "",
                "| method | N | B or M | join | leave |", "|---|---|---|---|---|"]
        out += [f"| {LABELS[r['method']]} | {r['n']} | {r['b']} | {r['join_collateral_max']} | "
                f"{r['leave_collateral_max']} |" for r in coll]
        out.append("")
    if not any(r["method"] == "ours" for r in coll):
        out += ["nlbfarm moved no bucket between nodes that stayed, on any join or leave.", ""]
    if p.get("compute_seconds"):
        out += ["Compute time per method (s, whole grid): " + ", ".join(
            f"{LABELS[m]} {s}" for m, s in p["compute_seconds"].items()) + ".", ""]
    for name in plots:
        out += [f"![{Path(name).stem.replace('_', ' ')}]({name})", ""]
    return "\n".join(out)


_STYLE = {"ours": dict(color="C0", marker="o", lw=2, zorder=4),
          "maglev": dict(color="C3", marker="s", mfc="none", ms=9, zorder=3),
          "rendezvous": dict(color="C2", marker="^"), "ring": dict(color="C1", marker="v")}


def plot(result: dict, outdir) -> list[str]:
    # The object API renders with Agg and leaves pyplot's global state alone.
    from matplotlib.figure import Figure

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    bs = result["params"]["buckets"]
    big = result["params"]["summary_b"]
    panels = [big] + ([min(bs)] if min(bs) != big else [])
    methods = _methods(result)
    names = []

    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    for k, b in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for m in methods:
            rows = sorted(_ref_rows(result, m, b), key=lambda r: r["n"])
            ax.plot([r["n"] for r in rows], [r["balance"] for r in rows], label=LABELS[m], **_STYLE[m])
        ideal = sorted(_rows(result, "ours", b), key=lambda r: r["n"])
        ax.plot([r["n"] for r in ideal], [r["ideal"] for r in ideal], "k:", label="ideal ceil(B/N)/(B/N)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["params"]["nodes"], [str(n) for n in result["params"]["nodes"]])
        ax.set_xlabel("nodes N")
        ax.set_ylabel("max/mean buckets per node")
        ax.set_title(f"Balance, B={b}", fontsize=10)
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    names.append("table_quality_balance.png")
    fig.savefig(outdir / names[-1], dpi=100)

    fig = Figure(figsize=(8.4, 3.4))
    for k, kind in enumerate(("join", "leave")):
        ax = fig.add_subplot(1, 2, k + 1)
        for m in methods:
            rows = sorted(_ref_rows(result, m, big), key=lambda r: r["n"])
            x = [r["n"] for r in rows]
            line, = ax.plot(x, [r[f"{kind}_median"] for r in rows], label=f"{LABELS[m]} median",
                            **_STYLE[m])
            ax.plot(x, [r[f"{kind}_worst"] for r in rows], ls="--", color=line.get_color(), lw=1)
        ax.axhline(1.0, color="k", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["params"]["nodes"], [str(n) for n in result["params"]["nodes"]])
        ax.set_xlabel("nodes N")
        ax.set_ylabel("buckets moved / (B/N)")
        ax.set_title(f"Moved per {kind}, B={big} (dashed: worst)", fontsize=10)
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    names.append("table_quality_moves.png")
    fig.savefig(outdir / names[-1], dpi=100)
    return names
