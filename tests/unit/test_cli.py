"""farmctl's pure parts: argument parsing, health verdicts, rendering."""
import pytest

from nlbfarm.cli import farm_problems, local_problems, parse_client, render_event, token_metadata
from nlbfarm.errors import FarmError


@pytest.mark.parametrize("text, want", [
    ("198.18.0.3:40000", ("198.18.0.3", 40000)),
    ("198.18.0.3", ("198.18.0.3", None)),
    ("2001:db8::3", ("2001:db8::3", None)),
    ("[2001:DB8::3]:40000", ("2001:db8::3", 40000)),
    ("[2001:db8::3]", ("2001:db8::3", None)),
])
def test_parse_client(text, want):
    assert parse_client(text) == want


@pytest.mark.parametrize("text, words", [
    ("host:80", "'host' is not an IP address"),
    ("[2001:db8::3]40000", r"\[ADDRESS\]:PORT"),
    ("[2001:db8::3:40000", r"\[ADDRESS\]:PORT"),
    ("[2001:db8::zz]:1", "is not an IP address"),
    ("[2001:db8::3]:0", "port must be 1..65535"),
    ("198.18.0.3:0", "port must be 1..65535"),
    ("198.18.0.3:70000", "port must be 1..65535"),
    ("198.18.0.3:x", "port must be 1..65535"),
])
def test_parse_client_errors(text, words):
    with pytest.raises(FarmError, match=words):
        parse_client(text)


def status(**kw):
    st = {"fence_open": True, "etcd_state": "connected", "generation": 4, "applied_generation": 4,
          "accepting_buckets": 10, "owned_buckets": 10,
          "members": [{"id": "n1", "state": "active", "applied_generation": 4},
                      {"id": "n2", "state": "draining", "applied_generation": 4}]}
    st.update(kw)
    return st


def test_healthy_farm_has_no_problems():
    assert local_problems(status()) == [] and farm_problems(status()) == []


def test_problems_are_named():
    st = status(fence_open=False, applied_generation=3, members=[
        {"id": "n1", "state": "active", "applied_generation": 3},
        {"id": "n2", "state": "failed", "reason": "check http failing: HTTP 503", "applied_generation": 4},
        {"id": "n3", "state": "starting", "applied_generation": 0}])
    assert local_problems(st) == ["this node's fence is closed", "this node applied generation 3, not 4"]
    assert farm_problems(st) == ["n1 has not applied table generation 4 yet",
                                 "n2 is failed: check http failing: HTTP 503", "n3 is starting"]


def test_token_metadata(tmp_path, monkeypatch):
    class Args:
        token_file = None
    monkeypatch.delenv("NLBFARM_TOKEN_FILE", raising=False)
    monkeypatch.setattr("nlbfarm.cli.DEFAULT_TOKEN_FILE", str(tmp_path / "absent"))
    assert token_metadata(Args()) == ()
    f = tmp_path / "token"
    f.write_text("abc0123456789abcdef\n")
    monkeypatch.setenv("NLBFARM_TOKEN_FILE", str(f))
    assert token_metadata(Args()) == (("authorization", "Bearer abc0123456789abcdef"),)
    Args.token_file = str(tmp_path / "missing")
    with pytest.raises(FarmError, match="cannot read token file"):
        token_metadata(Args())


def test_render_event():
    line = render_event({"time": 0, "kind": "member_state", "node_id": "n2", "message": "n2 active -> failed"})
    assert line.endswith("member_state      n2: n2 active -> failed")


def test_members_with_different_traffic_rules_are_a_problem():
    st = status(members=[{"id": "n1", "state": "active", "applied_generation": 4, "rules": "aaa"},
                         {"id": "n2", "state": "active", "applied_generation": 4, "rules": "bbb"}])
    assert farm_problems(st) == ["members disagree on traffic rules (cluster.vips, rules, unmatched): "
                                 "n1=aaa, n2=bbb"]
