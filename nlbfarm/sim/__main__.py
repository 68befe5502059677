"""python -m nlbfarm.sim: run many seeds, replay one, or write the README's safety table.

    python -m nlbfarm.sim --seeds 20000            # seeds 0..19999, both CPUs
    python -m nlbfarm.sim --seed 185               # one seed, its schedule printed
    python -m nlbfarm.sim --seed 185 --replay '[{"kind": "restore", ...}]'
    python -m nlbfarm.sim --seeds 5000 --readme README.md   # the "Safety under faults" table
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from nlbfarm.sim.faults import (KINDS, UNSERVED_BOUND, certificate_schedule, handoff_schedule, outage_schedule,
                                 run, variant)

BEGIN, END = "<!-- safety:begin -->", "<!-- safety:end -->"


# Every HANDOFF_EVERY-th seed also plays a planned-restart schedule (handoff_schedule),
# the seeds halfway between a rejected-peer-port schedule (certificate_schedule),
# and the seeds just after each an etcd outage that must stay served (outage_schedule).
HANDOFF_EVERY = 4


def _one(seed: int) -> dict:
    logging.getLogger("nlbfarm").setLevel(logging.CRITICAL)  # hostile records warn on purpose
    nodes, timing = variant(seed)
    runs = [run(seed, nodes=nodes, timing=timing)]
    if seed % HANDOFF_EVERY == 0:
        runs.append(run(seed, handoff_schedule(seed, nodes), nodes=nodes, timing=timing))
    if seed % HANDOFF_EVERY == HANDOFF_EVERY // 2:
        runs.append(run(seed, certificate_schedule(seed, nodes), nodes=nodes, timing=timing))
    if seed % HANDOFF_EVERY == 1:
        runs.append(run(seed, outage_schedule(seed, nodes), nodes=nodes, timing=timing))
    worst = next((r for r in runs if not r.ok), runs[0])
    return {"seed": seed, "ok": all(r.ok for r in runs), "violations": worst.violations, "error": worst.error,
            "unserved": max(r.unserved_after_heal for r in runs),
            "kinds": sorted({f["kind"] for r in runs for f in r.schedule}), "replay": worst.replay_hint()}


def run_seeds(first: int, count: int, jobs: int) -> list[dict]:
    seeds = range(first, first + count)
    if jobs <= 1:
        return [_one(s) for s in seeds]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_one, seeds, chunksize=64))


def summarize(results: list[dict]) -> dict:
    rows = {}
    for k in KINDS:
        mine = [r for r in results if k in r["kinds"]]
        rows[k] = {"seeds": len(mine), "violations": sum(1 for r in mine if r["violations"]),
                   "failures": sum(1 for r in mine if not r["ok"]),
                   "max_unserved_s": round(max((r["unserved"] for r in mine), default=0.0), 2)}
    return rows


def lab_trials(path: str | None) -> dict:
    """Lab trials per fault class, from the report the lab's safety tests write (``make safety``)."""
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def table(rows: dict, seeds: int, lab: dict, when: str) -> str:
    out = [f"Simulated {seeds} seeds (3 to 5 nodes, default and lab timings) on {when}; "
           f"lab trials from `make safety`. Violations must be 0.", "",
           "| fault class | simulated seeds | lab trials | invariant violations | longest unserved after heal (s) |",
           "|---|---|---|---|---|"]
    for k, desc in KINDS.items():
        r = rows[k]
        trials = lab.get(k, {})
        lab_text = f"{trials.get('trials', 0)} ({trials.get('failed', 0)} failed)" if trials else "-"
        out.append(f"| {desc} | {r['seeds']} | {lab_text} | {r['violations']} | {r['max_unserved_s']:.1f} |")
    return "\n".join(out)


def write_readme(path: str, text: str) -> None:
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} section")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nlbfarm.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1000, help="how many seeds to run")
    ap.add_argument("--first", type=int, default=0, help="the first seed")
    ap.add_argument("--seed", type=int, help="run this one seed and print its schedule")
    ap.add_argument("--replay", help="with --seed: the schedule (JSON) to play instead of the seed's own")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--readme", help="write the safety table into this README")
    ap.add_argument("--lab-report", default=os.environ.get("NLBFARM_SAFETY_REPORT", "bench/results/safety-lab.json"))
    ap.add_argument("--json", help="write every seed's result here")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        ap.error("--seeds and --jobs must be at least 1")
    if args.seed is not None:
        logging.getLogger("nlbfarm").setLevel(logging.CRITICAL)
        nodes, timing = variant(args.seed)
        try:
            schedule = json.loads(args.replay) if args.replay else None
        except ValueError as exc:
            ap.error(f"--replay is not JSON: {exc}")
        if schedule is not None and not isinstance(schedule, list):
            ap.error("--replay must be a JSON list of faults")
        r = run(args.seed, schedule, nodes=nodes, timing=timing)
        print(json.dumps({"seed": r.seed, "ok": r.ok, "violations": r.violations, "error": r.error,
                          "unserved_after_heal_s": round(r.unserved_after_heal, 3), "schedule": r.schedule},
                         indent=2))
        return 0 if r.ok else 1
    t0 = time.monotonic()
    results = run_seeds(args.first, args.seeds, args.jobs)
    bad = [r for r in results if not r["ok"]]
    for r in bad[:10]:
        print(f"FAILED seed {r['seed']}: {'; '.join(r['violations']) or r['error']}\n  replay: {r['replay']}")
    rows = summarize(results)
    print(f"{len(results)} seeds in {time.monotonic() - t0:.0f} s: {len(bad)} failed, "
          f"{sum(r['violations'] for r in rows.values())} invariant violations, longest unserved after heal "
          f"{max(r['unserved'] for r in results):.1f} s (bound {UNSERVED_BOUND:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "summary": rows}, f)
    if args.readme:
        write_readme(args.readme, table(rows, len(results), lab_trials(args.lab_report),
                                        time.strftime("%Y-%m-%d")))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
