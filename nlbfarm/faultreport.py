"""Render the fault tests' figures (JSON) into the README's "Faults survived" table.

Usage: python -m nlbfarm.faultreport FIGURES.json README.md
The table sits between the markers below; nothing else in the README changes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
ORDER = [
    "planned: scale-out 2->3, drain, rolling restart",
    "kill -9 of one agent (supervised restart)",
    "kill -9 of a whole node (agent and app)",
    "LAN link of one node cut",
    "etcd fully stopped for 60 s",
    "3-member etcd: leader killed, then a second member",
    "one node cut off from etcd",
    "etcd restarted, then compaction during a broken watch",
]


def render(figures: dict) -> str:
    rows = ["| fault | failed new connections | broken long-lived connections | recovery (s) | measured |",
            "|---|---|---|---|---|"]
    for name in ORDER + sorted(set(figures) - set(ORDER)):
        f = figures.get(name)
        if f is None:
            continue
        new = f"{f['failed']} of {f['new_connections']}" if "new_connections" in f else str(f["failed"])
        # A trial without long-lived connections (the certified kill -9) has no broken figure.
        broken = (f"{f['broken']} of {f['long_lived']}" if "long_lived" in f else str(f.get("broken", "-")))
        if f.get("broken_on_victim") is not None and f.get("broken"):
            broken += " (all on the failed node)" if f["broken_on_victim"] == f["broken"] else ""
        rows.append(f"| {name} | {new} | {broken} | {f['recovery_s']} | {f['measured']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m nlbfarm.faultreport FIGURES.json README.md", file=sys.stderr)
        return 2
    figures = json.loads(Path(argv[0]).read_text())
    readme = Path(argv[1])
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{readme}: markers {BEGIN} / {END} not found", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render(figures)}\n{END}{tail}")
    print(f"{readme}: faults table updated from {argv[0]} ({len(figures)} faults)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
