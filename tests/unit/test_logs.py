"""Logs: every line is logfmt that a strict (go-logfmt compatible) parser reads back into the same
fields; JSON carries the same keys; journald gets priorities; every log call of the project names
its values as fields, so no value hides in the message text."""
from __future__ import annotations

import ast
import io
import json
import logging
import os
from pathlib import Path

import logfmtkv
import pytest

from nlbfarm import logs

REPO = Path(__file__).resolve().parents[2]
LEVELS = ("debug", "info", "warning", "error", "exception", "critical")


def log_calls():
    """(file, line, format string or None, number of arguments) of every ``log.<level>(...)``."""
    for root in ("node", "coordinator", "nlbfarm"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in LEVELS and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "log"):
                    first = node.args[0] if node.args else None
                    fmt = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
                    yield f"{path.relative_to(REPO)}:{node.lineno}", fmt, len(node.args) - 1


def test_every_log_call_names_its_values_as_fields():
    calls = list(log_calls())
    assert len(calls) > 80
    bad = []
    for where, fmt, nargs in calls:
        split = logs.split_format(fmt) if fmt is not None else None
        if split is None or len(split[1]) != nargs:
            bad.append(f"{where}: {fmt!r}")
    assert bad == [], "log calls with a value in their text (write it as key=%s):\n" + "\n".join(bad)


@pytest.mark.parametrize("fmt, text, fields", [
    ("registered node=%s lease=%x ttl=%ds", "registered", [("node", "%s", ""), ("lease", "%x", ""),
                                                             ("ttl", "%d", "s")]),
    ("lease node=%s reason=%r: registering anew", "lease: registering anew",
     [("node", "%s", ""), ("reason", "%r", "")]),
    ("etcd unreachable retry_in=%.1fs reason=%s", "etcd unreachable", [("retry_in", "%.1f", "s"),
                                                                       ("reason", "%s", "")]),
    ("100%% done n=%d", "100% done", [("n", "%d", "")]),
    ("stopped", "stopped", []),
])
def test_split_format(fmt, text, fields):
    assert logs.split_format(fmt) == (text, fields)


@pytest.mark.parametrize("fmt", ["peer %s refused", "refusing to start: %s", "msg=%s", "x level=%s",
                                 "a ts=%s"])
def test_split_format_refuses_values_in_text_and_reserved_keys(fmt):
    assert logs.split_format(fmt) is None


def record(fmt, *args, level=logging.INFO, exc_info=None, name="nlbfarm.agent"):
    return logging.LogRecord(name, level, __file__, 1, fmt, args, exc_info)


NASTY = ["plain", "two words", 'quote " inside', "back\\slash", "a=b", "line\nbreak", "tab\there",
         "ünïcødé ✓", "", "'single'", "null\x00byte", "  padded  ", "=", '"']


@pytest.mark.parametrize("value", NASTY)
def test_logfmt_round_trips_through_a_strict_parser(value):
    line = logs.LogfmtFormatter().format(record("state change node=%s reason=%r: why", "n1", value))
    assert "\n" not in line
    got = logfmtkv.parse(line, strict=True, duplicates="error")
    assert True not in got.values(), f"a bare key: something was not quoted in {line!r}"
    assert got["level"] == "info" and got["logger"] == "nlbfarm.agent" and got["event"] == "state_change"
    assert got["msg"] == "state change: why" and got["node"] == "n1" and got["reason"] == value
    assert got["ts"].endswith("Z") and got["ts"][10] == "T"


def test_units_and_numbers_are_rendered_like_the_format_says():
    got = logfmtkv.parse(logs.LogfmtFormatter().format(
        record("registered node=%s lease=%x ttl=%ds weight=%d late=%.2fs", "n1", 0x1A2B, 3, 1, 0.256)), strict=True)
    assert (got["lease"], got["ttl"], got["weight"], got["late"]) == ("1a2b", "3s", "1", "0.26s")


def test_exceptions_stay_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        exc_info = sys.exc_info()
    line = logs.LogfmtFormatter().format(record("cycle crashed node=%s", "n1", level=logging.ERROR,
                                                exc_info=exc_info))
    assert "\n" not in line
    got = logfmtkv.parse(line, strict=True)
    assert got["exc"].startswith("Traceback") and "ValueError: boom" in got["exc"]


def test_a_foreign_record_keeps_its_whole_message():
    for rec in (record("peer %s refused", "n2"), record("%(a)s", {"a": 1})):
        got = logfmtkv.parse(logs.LogfmtFormatter().format(rec), strict=True)
        assert "event" not in got and got["msg"] == rec.getMessage()


def test_a_call_whose_arguments_do_not_fit_is_still_one_parsable_line():
    got = logfmtkv.parse(logs.LogfmtFormatter().format(record("odd args %s %s", "x")), strict=True)
    assert got["msg"] == "odd args %s %s (log arguments that do not fit: ('x',))"


def test_json_has_the_same_keys_and_integers_as_numbers():
    rec = record("registered node=%s lease=%x ttl=%ds weight=%d reason=%r share=%.1f", "123", 0x1A2B, 3, 7,
                 "a b", 33.3)
    kv = logfmtkv.parse(logs.LogfmtFormatter().format(rec), strict=True)
    js = json.loads(logs.JsonFormatter().format(rec))
    assert list(js) == list(kv)
    assert js["weight"] == 7 and js["share"] == 33.3 and js["ttl"] == "3s" and js["reason"] == "a b"
    assert js["node"] == "123", "a %s field stays text even when it looks like a number"
    assert {k: str(v) for k, v in js.items()} == kv


def test_journald_priorities_only_when_stderr_is_the_journal(tmp_path, monkeypatch):
    path = tmp_path / "stream"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.setup_logging("debug", "kv", stream=stream)
        log = logging.getLogger("nlbfarm.test")
        log.debug("a n=%d", 1)
        log.info("b n=%d", 2)
        log.warning("c n=%d", 3)
        log.error("d n=%d", 4)
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # another stream: no prefix
        logs.setup_logging("info", "kv", stream=stream)
        log.info("e n=%d", 5)
    lines = path.read_text().splitlines()
    assert [ln[:3] for ln in lines[:4]] == ["<7>", "<6>", "<4>", "<3>"]
    assert lines[4].startswith("ts=")
    for ln in lines:
        logfmtkv.parse(ln[3:] if ln.startswith("<") else ln, strict=True)


def test_setup_logging_json_lines(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    buf = io.StringIO()
    logs.setup_logging("info", "json", stream=buf)
    logging.getLogger("nlbfarm.test").info("vip added address=%s dev=%s", "198.18.0.100", "eth0")
    d = json.loads(buf.getvalue())
    assert d["event"] == "vip_added" and d["address"] == "198.18.0.100" and d["dev"] == "eth0"
