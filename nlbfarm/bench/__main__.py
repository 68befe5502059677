"""`python -m nlbfarm.bench`: run the benchmarks, write the JSON, the report and the plots.

Writes ``bench/results/<date>.json`` (every figure), ``bench/results/<date>.md``
(the report, with PNG plots in ``bench/results/<date>/``) and, with
``--readme``, the summary table between the README's bench markers.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

from nlbfarm.bench import BENCHMARKS


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    osname = "Linux"
    try:
        osname = dict(line.rstrip().split("=", 1) for line in open("/etc/os-release") if "=" in line).get(
            "PRETTY_NAME", "Linux").strip('"')
    except OSError:
        pass
    return {"os": osname, "kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib,
            "python": platform.python_version()}


def describe_machine(m: dict) -> str:
    return f"{m['os']}, kernel {m['kernel']}, {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB"


def run_all(names, quick: bool, progress) -> dict:
    out = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": machine(), "quick": quick,
           "benchmarks": {}}
    for name in names:
        t0 = time.monotonic()
        progress(f"== {name}")
        try:
            mod = importlib.import_module(f"nlbfarm.bench.{name}")
            result = mod.run(lambda m, n=name: progress(f"   {n}: {m}"), quick=quick)
            result["ok"] = True
        except Exception as exc:  # noqa: BLE001 - one benchmark's failure is reported, the others still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "params": {}, "summary": [],
                      "notes": [f"this benchmark failed: {type(exc).__name__}: {exc}"],
                      "traceback": traceback.format_exc()[-3000:]}
            progress(f"   {name} FAILED: {exc}")
        result["seconds"] = round(time.monotonic() - t0, 1)
        out["benchmarks"][name] = result
    return out


def result_stem(data: dict, only: bool = False) -> str:
    """``<date>``, or ``<date>-<names>`` for a ``--only`` run (it must not replace the full run's files)."""
    return f"{data['date']}-{'-'.join(data['benchmarks'])}" if only else data["date"]


def write_report(data: dict, outdir: Path, only: bool = False) -> Path:
    date = data["date"]
    stem = result_stem(data, only)
    plotdir = outdir / stem
    plotdir.mkdir(parents=True, exist_ok=True)
    lines = [f"# nlbfarm benchmarks, {date}", "",
             f"Machine: {describe_machine(data['machine'])}. All figures of one `make bench` run; "
             "ratios compare against a baseline or peer measured in the same run.", "",
             "## Summary", "", summary_table(data), ""]
    for name, result in data["benchmarks"].items():
        lines += [f"## {_title(name)}", ""]
        if not result.get("ok"):
            lines += [f"Failed in this run: `{result.get('error')}`", ""]
            continue
        mod = importlib.import_module(f"nlbfarm.bench.{name}")
        plots = []
        try:
            plots = [f"{stem}/{p}" for p in mod.plot(result, plotdir)]
        except Exception as exc:  # noqa: BLE001 - a missing plot must not lose the figures
            lines += [f"(plots failed: {type(exc).__name__}: {exc})", ""]
        lines += [mod.report(result, plots).rstrip(), ""]
        notes = result.get("notes") or []
        if notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
        lines += [f"({result.get('seconds', 0)} s)", ""]
    path = outdir / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path


def _title(name: str) -> str:
    try:
        return importlib.import_module(f"nlbfarm.bench.{name}").TITLE
    except Exception:  # noqa: BLE001
        return name


def summary_table(data: dict) -> str:
    rows = ["| benchmark | metric | result | compared with |", "|---|---|---|---|"]
    for name, result in data["benchmarks"].items():
        if not result.get("ok"):
            rows.append(f"| {_title(name)} | - | failed: {result.get('error', '')[:80]} | - |")
            continue
        for r in result.get("summary", []):
            rows.append(f"| {r.get('benchmark', _title(name))} | {r['metric']} | {r['value']} | "
                        f"{r.get('compared_with', '')} |")
    return "\n".join(rows)


def update_readme(data: dict, readme: Path, report: Path, only: bool = False) -> None:
    """Rewrite the README's summary block; ``only`` (a ``--only`` run): replace just the rows of the
    benchmarks that ran, keep the others, and say which rows come from which run."""
    text = readme.read_text()
    m = re.search(r"<!-- bench:begin -->(.*?)<!-- bench:end -->", text, flags=re.S)
    if m is None:
        raise SystemExit(f"{readme}: no <!-- bench:begin --> ... <!-- bench:end --> block to update")
    head = (f"Measured {data['date']} on {describe_machine(data['machine'])} by `make bench`; full report: "
            f"[{report.as_posix()}]({report.as_posix()}).")
    table = summary_table(data)
    if only:
        titles = {_title(n) for n in data["benchmarks"]}
        old_lines = m.group(1).strip().splitlines()
        old_head = [ln for ln in old_lines if not ln.startswith("|")]
        kept = [ln for ln in old_lines if ln.startswith("| ") and not ln.startswith("| benchmark |")
                and ln.split(" | ")[0][2:] not in titles]
        rows = table.splitlines()
        table = "\n".join(rows[:2] + kept + rows[2:])
        head = (" ".join(h for h in old_head if h.strip() and not h.startswith("Rows of ")) + "\n\n"
                f"Rows of {', '.join(sorted(titles))}: measured {data['date']} by `python -m nlbfarm.bench "
                f"--only {','.join(data['benchmarks'])}`; report: [{report.as_posix()}]({report.as_posix()}).")
    block = f"<!-- bench:begin -->\n{head}\n\n{table}\n<!-- bench:end -->"
    readme.write_text(text[:m.start()] + block + text[m.end():])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nlbfarm.bench", description=__doc__)
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="small and fast (smoke test); figures are not meaningful")
    ap.add_argument("--out", default="bench/results", help="results directory (default %(default)s)")
    ap.add_argument("--readme", help="update this README's summary table")
    args = ap.parse_args(argv)
    names = BENCHMARKS
    if args.only:
        names = tuple(n.strip() for n in args.only.split(",") if n.strip())
        bad = [n for n in names if n not in BENCHMARKS]
        if bad:
            ap.error(f"unknown benchmark(s) {', '.join(bad)}; choose from {', '.join(BENCHMARKS)}")
    if os.geteuid() != 0:
        ap.error("the benchmarks need root (network namespaces, nftables)")

    def progress(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    data = run_all(names, args.quick, progress)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    js = outdir / f"{result_stem(data, bool(args.only))}.json"
    # Keep the raw results small: no tracebacks of failed runs beyond their tail.
    js.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    report = write_report(data, outdir, only=bool(args.only))
    progress(f"wrote {js} and {report}")
    if args.readme:
        update_readme(data, Path(args.readme), report, only=bool(args.only))
        progress(f"updated the summary in {args.readme}")
    failed = [n for n, r in data["benchmarks"].items() if not r.get("ok")]
    if failed:
        progress(f"failed: {', '.join(failed)} (see the report)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
