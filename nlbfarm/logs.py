"""Logs as logfmt (the default) or JSON lines with the same keys, one format for farmd and farmctl.

A log call names its fields in its format string, after the message text:
``log.info("registered node=%s lease=%x ttl=%ds", ...)``. The formatter takes
that string apart instead of printing it as it is, so every field becomes a
key of its own, and its value is quoted and escaped as logfmt wants:

    ts=2026-12-05T06:01:02.345Z level=info logger=nlbfarm.node.agent event=registered msg=registered node=n1 lease=1a2b ttl=3s

* ``msg``: the text of the format string, with the fields taken out
  (``"not adopting the previous agent's lease: registering anew once its lease ends"``).
* ``event``: the same text up to its first colon, as a slug
  (``not_adopting_the_previous_agents_lease``). It never holds a value, so it is a
  stable key to alert or count on.
* One key per field. ``%r`` renders like ``%s``, because a Python repr's quotes are
  not logfmt's.

Text holds no values: a unit test scans every log call of the project for a
conversion outside a ``key=%x`` field. A record whose format string does not
split this way (another library's) keeps its whole message in ``msg``.

With ``JOURNAL_STREAM`` naming stderr (systemd connected it to the journal),
each line starts with the syslog priority prefix ``<N>``, which journald
strips and records as the entry's priority.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import threading
import time

# key=%conv (an optional unit right after it: ttl=%ds, retry_in=%.1fs)
_FIELD = re.compile(r"(?<![\w.])([a-z_][a-z0-9_]*)=(%[#0 +-]?\d*(?:\.\d+)?[sdirxXgGfFeEo])([A-Za-z]*)")
_CONVERSION = re.compile(r"%(?:%|[#0 +-]?\d*(?:\.\d+)?[sdirxXgGfFeEoc])")
RESERVED = ("ts", "level", "logger", "event", "msg", "exc")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


@functools.lru_cache(maxsize=1024)  # every record splits its format string: literals, a bounded set
def split_format(fmt: str) -> tuple[str, list[tuple[str, str, str]]] | None:
    """``(text, [(key, conversion, unit), ...])`` of a log format string, or None when a
    conversion stands outside a ``key=%x`` field (its text would hold a value)."""
    fields, text, pos = [], [], 0
    for m in _FIELD.finditer(fmt):
        text.append(fmt[pos:m.start()])
        fields.append((m.group(1), m.group(2), m.group(3)))
        pos = m.end()
    text.append(fmt[pos:])
    joined = "".join(text)
    if any(c != "%%" for c in _CONVERSION.findall(joined)):
        return None
    if any(key in RESERVED for key, _, _ in fields):
        return None
    # "lease node=%s reason=%r: registering anew" -> "lease: registering anew"
    msg = re.sub(r"\s+([:;,)])", r"\1", re.sub(r"\s+", " ", joined.replace("%%", "%"))).strip()
    return msg.strip(" :;,") or msg, fields


def event_name(msg: str) -> str:
    head = msg.split(":", 1)[0]
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]+", "_", head.lower().replace("'", ""))).strip("_")


def _value(conv: str, unit: str, arg):
    if conv.endswith("r"):
        conv = conv[:-1] + "s"
    try:
        return conv % (arg,) + unit
    except (TypeError, ValueError):
        return str(arg) + unit


def record_fields(record: logging.LogRecord, typed: bool = False) -> dict:
    """ts, level, logger, event, msg and the record's own fields, then exc. Values are text;
    with ``typed``, a field written as a bare %d is an int and a bare %f or %g a float."""
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
    out = {"ts": ts, "level": record.levelname.lower(), "logger": record.name}
    args = record.args if isinstance(record.args, tuple) else None
    split = split_format(record.msg) if isinstance(record.msg, str) and args is not None else None
    if split is not None and len(split[1]) == len(args):
        msg, fields = split
        out["event"] = event_name(msg)
        out["msg"] = msg
        for (key, conv, unit), arg in zip(fields, args):
            out[key] = _value(conv, unit, arg)
            if typed and not unit and conv[-1] in "di" and isinstance(arg, int) and not isinstance(arg, bool):
                out[key] = int(arg)
            elif typed and not unit and conv[-1] in "fFgGeE" and isinstance(arg, (int, float)):
                out[key] = float(out[key])
    else:
        try:
            out["msg"] = record.getMessage()
        except (TypeError, ValueError, KeyError):  # a bad call must not become logging's own traceback
            out["msg"] = f"{record.msg} (log arguments that do not fit: {record.args!r})"
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


_BARE = re.compile(r'^[^\s="\\]+$')


def logfmt_value(value) -> str:
    text = str(value)
    if _BARE.match(text) and text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable() and ch != " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={logfmt_value(v)}" for k, v in record_fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the logfmt keys; %d fields are numbers, the rest text."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_fields(record, typed=True), ensure_ascii=False)


class JournalPrefix(logging.Formatter):
    """``<N>`` before each line: journald's syslog priority prefix."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{prio}>" + self.inner.format(record)


def stream_is_journal(stream, env=os.environ) -> bool:
    """Whether ``stream`` is the journal socket systemd named in ``$JOURNAL_STREAM`` (device:inode)."""
    want = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in want.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str = "info", fmt: str = "logfmt", stream=None) -> None:
    """The root logger writes ``fmt`` (logfmt, kv: the same, json) to ``stream`` (stderr)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else LogfmtFormatter()
    if stream_is_journal(stream):
        formatter = JournalPrefix(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Warnings and uncaught exceptions of any thread go through the same format
    # instead of raw lines on stderr that a log pipeline cannot read.
    logging.captureWarnings(True)
    crash = logging.getLogger("nlbfarm.crash")
    sys.excepthook = lambda t, v, tb: crash.critical("uncaught exception", exc_info=(t, v, tb))
    threading.excepthook = lambda a: crash.error("uncaught exception in a thread thread=%s",
                                                 a.thread.name if a.thread else "?",
                                                 exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    # grpc and etcd3 are chatty at debug level and say nothing an operator needs at info.
    for noisy in ("grpc", "etcd3", "pyroute2", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
