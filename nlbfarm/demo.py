"""`make demo`: a live farm in network namespaces, a node crash, a rejoin, and a summary.

Phases (seconds, measured from when the client starts):
  steady   3 nodes serve the VIP;
  kill     kill -9 of n2's agent and app, as if the server died; survivors take over
           once its lease expires;
  rejoin   n2 is started again and gets its share back;
then a summary, also written as JSON to $DEMO_SUMMARY (default demo-summary.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nlbfarm.analysis import failures, match_accepts, read_accepts, read_results, shares
from nlbfarm.errors import FarmError
from nlbfarm.lab import CLIENT_ADDR, Lab

NODES = ["n1", "n2", "n3"]
VICTIM = "n2"


def say(msg: str) -> None:
    print(msg, flush=True)


def bar(frac: float, width: int = 20) -> str:
    n = round(frac * width)
    return "#" * n + "." * (width - n)


def percent(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {n: round(100 * counts.get(n, 0) / total, 1) for n in NODES}


class Demo:
    def __init__(self, steady: float, down: float, rejoin: float, summary_path: Path, prefix: str):
        self.lab = Lab(prefix=prefix, progress=lambda m: say(f"  lab: {m}"))
        self.steady, self.down_s, self.rejoin_s = steady, down, rejoin
        self.summary_path = summary_path
        self.events: list[tuple[float, str]] = []

    def event(self, what: str) -> float:
        t = time.time()
        self.events.append((t, what))
        say(f"\n>>> {what}\n")
        return t

    def live_line(self, out: Path, t_start: float, last: list[int]) -> None:
        results = read_results(out)
        new = results[last[0]:]
        last[0] = len(results)
        window = shares(new)
        failed = len(failures(new))
        total = sum(window.values())
        try:
            snap = self.lab.snapshot()
            table = snap.counts()
            gen = snap.table.generation if snap.table else 0
        except FarmError:
            table, gen = {}, 0
        cells = []
        for n in NODES:
            frac = window.get(n, 0) / total if total else 0.0
            cells.append(f"{n} {bar(frac, 12)} {100 * frac:5.1f}% ({table.get(n, 0):4d} b)")
        say(f"t={time.time() - t_start:5.1f}s gen={gen:<3d} conns/s={len(new):4d} failed={failed:3d} | "
            + " | ".join(cells))

    def wait_phase(self, until: float, out: Path, t_start: float, last: list[int], check=None) -> None:
        """Print one live line per second until ``until``; poll ``check`` every 0.1 s in between."""
        next_line = time.time() + 1.0
        while time.time() < until:
            time.sleep(0.1)
            if check is not None:
                check()
            if time.time() >= next_line or time.time() >= until:
                self.live_line(out, t_start, last)
                next_line += 1.0

    def run(self) -> dict:
        lab = self.lab
        say("== nlbfarm demo: 3 nodes share VIP 198.18.0.100 in network namespaces ==")
        lab.up(nodes=3)
        out = lab.dir / "client.jsonl"
        total_s = self.steady + self.down_s + self.rejoin_s
        say(f"\nclient {CLIENT_ADDR} opens new HTTP connections to the VIP for {total_s:.0f}s; "
            "each line is one second: share of connections per node (and buckets held)\n")
        load = subprocess.Popen(lab.loadclient_argv(count=100_000, duration=total_s + 2, out=out, workers=16,
                                                    interval=0.04, timeout=2.0),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            t_start = time.time()
            last = [0]
            self.wait_phase(t_start + self.steady, out, t_start, last)

            t_kill = self.event(f"kill -9 of {VICTIM}'s agent and app (a server crash); "
                                f"its lease expires after {lab.timing.lease_ttl}s")
            lab.kill_node(VICTIM)
            t_rebalanced = None

            def rebalanced() -> None:
                nonlocal t_rebalanced
                if t_rebalanced is not None:
                    return
                try:
                    if lab.converged(lab.snapshot(), ["n1", "n3"]):
                        t_rebalanced = time.time()
                        say(f"    rebalanced: n1 and n3 hold all buckets, "
                            f"{t_rebalanced - t_kill:.1f}s after the kill")
                except FarmError:
                    pass

            self.wait_phase(t_kill + self.down_s, out, t_start, last, check=rebalanced)

            t_restart = self.event(f"restarting {VICTIM} (app and agent): it rejoins and gets its share back")
            lab.start_node(VICTIM)
            snap = lab.wait_converged(NODES, timeout=30)
            t_rejoined = time.time()
            say(f"    rejoined: table generation {snap.table.generation}, buckets {snap.counts()}, "
                f"{t_rejoined - t_restart:.1f}s after the restart")
            self.wait_phase(t_restart + self.rejoin_s, out, t_start, last)
        finally:
            load.terminate()
            try:
                load.wait(10)
            except subprocess.TimeoutExpired:
                load.kill()
        results = read_results(out)
        accepts = read_accepts({n: lab.accept_log(n) for n in NODES}, CLIENT_ADDR)
        matched = match_accepts(results, accepts)
        fails = failures(results)
        rel = [round(r["t"] - t_kill, 3) for r in fails]
        before = shares(results, 0, t_kill)
        after_kill = shares(results, (t_rebalanced or t_kill) + 0.5, t_restart)
        after_rejoin = shares(results, t_rejoined + 0.5)
        summary = {
            "requests": len(results),
            "failed": len(fails),
            "failure_window_s": [min(rel), max(rel)] if rel else [],
            "shares": {"before": before, "after_kill": after_kill, "after_rejoin": after_rejoin},
            "shares_percent": {"before": percent(before), "after_kill": percent(after_kill),
                               "after_rejoin": percent(after_rejoin)},
            "rebalance_s": round(t_rebalanced - t_kill, 3) if t_rebalanced else None,
            "rejoin_s": round(t_rejoined - t_restart, 3),
            "accepted_by_two_nodes": sum(1 for m in matched if len(m) > 1),
            "answered_but_not_logged": sum(1 for r, m in zip(results, matched) if r["node"] and m != [r["node"]]),
            "lease_ttl_s": lab.timing.lease_ttl,
            "fence_timeout_s": lab.timing.fence_timeout,
            "killed": VICTIM,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return summary

    def report(self, s: dict) -> bool:
        say("\n== summary ==")
        say(f"connections: {s['requests']}, failed: {s['failed']}"
            + (f" (all between +{s['failure_window_s'][0]:.2f}s and +{s['failure_window_s'][1]:.2f}s "
               "after the kill)" if s["failure_window_s"] else ""))
        say(f"rebalance after the kill: {s['rebalance_s']}s (lease TTL {s['lease_ttl_s']}s); "
            f"rejoin: {s['rejoin_s']}s")
        for phase in ("before", "after_kill", "after_rejoin"):
            pct = s["shares_percent"][phase]
            say(f"  {phase:<13} " + "  ".join(f"{n} {pct[n]:5.1f}%" for n in NODES))
        say(f"connections accepted by two nodes: {s['accepted_by_two_nodes']}")
        ok = (s["accepted_by_two_nodes"] == 0 and s["answered_but_not_logged"] == 0
              and s["rebalance_s"] is not None
              and (not s["failure_window_s"] or s["failure_window_s"][1] <= s["lease_ttl_s"] + 2)
              and s["shares"]["after_kill"].get(VICTIM, 0) == 0
              and s["shares"]["after_rejoin"].get(VICTIM, 0) > 0)
        say(f"summary written to {self.summary_path}")
        say("demo result: " + ("OK" if ok else "UNEXPECTED (see above)"))
        return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nlbfarm-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steady", type=float, default=15)
    ap.add_argument("--down", type=float, default=20, help="seconds between the kill and the restart")
    ap.add_argument("--rejoin", type=float, default=15)
    ap.add_argument("--prefix", default="demo")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (network namespaces and nftables)", file=sys.stderr)
        return 2
    path = Path(os.environ.get("DEMO_SUMMARY", "demo-summary.json"))
    demo = Demo(args.steady, args.down, args.rejoin, path, args.prefix)
    t0 = time.time()
    try:
        summary = demo.run()
        summary["demo_duration_s"] = round(time.time() - t0, 1)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        ok = demo.report(summary)
    except FarmError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        removed = demo.lab.down()
        say(f"lab removed ({len(removed)} namespaces)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
