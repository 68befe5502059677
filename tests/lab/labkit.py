"""Helpers shared by the lab tests that start labs of their own."""
from __future__ import annotations

import contextlib
from pathlib import Path

import logfmtkv

from nlbfarm.lab import Lab

STANDARD_KEYS = ("ts", "level", "logger", "msg")


def log_records(path: Path) -> list[dict]:
    """Every line of an agent's log, read by a strict (go-logfmt compatible) logfmt parser.

    A line that does not parse, lacks a standard key or holds a bare key (a value
    that should have been quoted) fails the test that reads it: every lab test that
    looks at a log also checks that all of it is logfmt a log pipeline reads right.
    """
    out = []
    for n, line in enumerate(path.read_text(errors="strict").splitlines(), 1):
        try:
            rec = logfmtkv.parse(line, strict=True, duplicates="error")
        except logfmtkv.LogfmtError as exc:
            raise AssertionError(f"{path}:{n} is not logfmt ({exc}): {line!r}") from None
        missing = [k for k in STANDARD_KEYS if not isinstance(rec.get(k), str)]
        bare = [k for k, v in rec.items() if v is True]
        if missing or bare:
            raise AssertionError(f"{path}:{n} lacks {missing} or has bare keys {bare}: {line!r}")
        out.append(rec)
    return out


def render(rec: dict) -> str:
    """A record as the old plain lines read: ``ts=.. level=.. logger=.. <msg> key=value ...`` (values
    unquoted, the traceback of ``exc`` on the lines after), for substring checks and failure messages."""
    fields = " ".join(f"{k}={v}" for k, v in rec.items() if k not in (*STANDARD_KEYS, "event", "exc"))
    line = f"ts={rec['ts']} level={rec['level']} logger={rec['logger']} {rec['msg']}" + (f" {fields}" if fields else "")
    return line + ("\n" + rec["exc"] if "exc" in rec else "")


def read_log(path: Path) -> str:
    """An agent's log, every line checked to be logfmt (log_records), rendered plainly (render)."""
    return "\n".join(render(r) for r in log_records(path)) + "\n"


def agent_log(lab: Lab, node: str) -> str:
    return read_log(lab.dir / f"{node}.agent.log")


def logged(lab: Lab, host: str, event: str, **fields: str) -> bool:
    """Whether the agent on ``host`` logged ``event`` with these field values (node=... among them)."""
    return any(r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
               for r in log_records(lab.dir / f"{host}.agent.log"))


@contextlib.contextmanager
def fresh_labs(prefix: str, state_root: Path):
    """``make(nodes=3, **lab_options)`` starts a lab of its own, one per call; all are
    torn down at the end, whatever happened, keeping their logs for a post-mortem.
    A lab that leaves a namespace behind fails the test that made it."""
    labs = []

    def make(nodes: int = 3, **kw) -> Lab:
        lab = Lab(prefix=prefix, state_root=state_root, **kw)
        labs.append(lab)
        lab.up(nodes=nodes, wait=60)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.down(keep_logs=True)
        left = [ns for lab in labs for ns in lab.lab_namespaces()]
        assert not left, f"labs {prefix} left namespaces behind: {left}"
