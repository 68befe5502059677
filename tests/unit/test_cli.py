"""farmctl's pure parts: argument parsing, health verdicts, rendering; the token check before a change."""
import os
from types import SimpleNamespace

import pytest

from nlbfarm import cli
from nlbfarm.cli import (Connection, farm_problems, local_problems, parse_client, plaintext_token_problem,
                         render_event, token_metadata)
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


# ---- the token is not sent in plaintext over the network ----------------------------

TOKEN = "abc0123456789abcdef"


@pytest.fixture
def farmctl(tmp_path, monkeypatch, capsys):
    """Run farmctl's main() with a token file and no ambient configuration; calls are recorded, not sent."""
    for var in ("NLBFARM_CONFIG", "NLBFARM_TARGET", "NLBFARM_TOKEN_FILE", "NLBFARM_TLS_CA", "NLBFARM_TLS_CERT",
                "NLBFARM_TLS_KEY", "NLBFARM_TLS_SERVER_NAME", cli.NETNS_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.yaml"))
    monkeypatch.setattr(cli, "DEFAULT_TOKEN_FILE", str(tmp_path / "absent-token"))
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    sent = []

    def fake_rpc(conn, method, request, timeout, metadata=()):
        sent.append((conn.target, method, metadata))
        return SimpleNamespace(message=f"{request.node_id} done")

    def no_channel(conn):
        raise AssertionError(f"farmctl connected to {conn.target}")

    monkeypatch.setattr(cli, "_rpc", fake_rpc)
    monkeypatch.setattr(cli, "_channel", no_channel)

    def run(*argv, token_file=True):
        rc = cli.main([*argv, *(["--token-file", str(token)] if token_file else [])])
        out = capsys.readouterr()
        return rc, out.out, out.err, sent
    return run


@pytest.mark.parametrize("command", ["drain", "undrain"])
def test_regression_token_not_sent_in_plaintext_to_remote_target(farmctl, command):
    rc, _, err, sent = farmctl(command, "n2", "--target", "10.0.0.11:7400")
    assert rc == cli.EXIT_ERROR and sent == []
    assert "refusing to send the API token in plaintext to 10.0.0.11:7400" in err
    assert "--tls-ca" in err and "--insecure-send-token" in err


@pytest.mark.parametrize("command", ["drain", "undrain"])
def test_regression_insecure_send_token_sends_with_a_warning(farmctl, command):
    rc, out, err, sent = farmctl(command, "n2", "--target", "10.0.0.11:7400", "--insecure-send-token")
    assert rc == cli.EXIT_OK and out.strip() == "n2 done"
    assert sent == [("10.0.0.11:7400", command.capitalize(), (("authorization", f"Bearer {TOKEN}"),))]
    assert "warning: sending the API token in plaintext to 10.0.0.11:7400" in err


@pytest.mark.parametrize("target", ["127.0.0.1:7400", "127.3.2.1:7400", "[::1]:7400", "localhost:7400",
                                    "LocalHost:7400", "[::ffff:127.0.0.1]:7400", "unix:/run/nlbfarm/api.sock"])
def test_regression_token_still_sent_to_loopback_targets(farmctl, target):
    rc, _, err, sent = farmctl("drain", "n2", "--target", target)
    assert rc == cli.EXIT_OK and err == ""
    assert sent[0][2] == (("authorization", f"Bearer {TOKEN}"),)


@pytest.mark.parametrize("target", ["10.0.0.11:7400", "[2001:db8::11]:7400", "n1.farm.example:7400",
                                    "0.0.0.0:7400", "dns:///localhost:7400", "127.0.0.1.example:7400"])
def test_regression_non_loopback_targets_are_not_taken_for_local(target):
    assert plaintext_token_problem(Connection(target=target), None) is not None


def test_regression_token_check_allows_tls_and_lab_namespaces():
    assert plaintext_token_problem(Connection(target="10.0.0.11:7400", tls=object()), None) is None
    assert plaintext_token_problem(Connection(target="198.18.0.12:7400"), "nlbf-n1") is None


def test_regression_no_token_no_refusal(farmctl):
    # Nothing secret is sent: the agent itself answers UNAUTHENTICATED.
    rc, _, err, sent = farmctl("drain", "n2", "--target", "10.0.0.11:7400", token_file=False)
    assert rc == cli.EXIT_OK and err == "" and sent == [("10.0.0.11:7400", "Drain", ())]


def test_regression_netns_target_counts_as_local_only_inside_that_namespace(farmctl, tmp_path, monkeypatch):
    # `ip netns add` keeps a namespace as a file in /run/netns; this process's own
    # namespace stands in for the lab node's.
    run_netns = tmp_path / "netns"
    run_netns.mkdir()
    os.symlink("/proc/self/ns/net", run_netns / "nlbf-n1")
    (run_netns / "other").write_text("")
    monkeypatch.setattr(cli, "NETNS_DIR", str(run_netns))
    monkeypatch.setenv(cli.NETNS_ENV, "nlbf-n1")
    rc, _, err, sent = farmctl("drain", "n2", "--target", "198.18.0.12:7400")
    assert rc == cli.EXIT_OK and err == "" and sent[0][0] == "198.18.0.12:7400"
    # A leftover variable does not make a LAN target local.
    for name in ("other", "missing", "../nlbf-n1"):
        monkeypatch.setenv(cli.NETNS_ENV, name)
        rc, _, err, _ = farmctl("drain", "n2", "--target", "198.18.0.12:7400")
        assert rc == cli.EXIT_ERROR and "plaintext" in err


def test_regression_netns_reexec_tells_the_inner_farmctl_its_namespace(monkeypatch):
    from nlbfarm.node import iplib
    execs = []
    monkeypatch.setattr(iplib, "list_netns", lambda: ["nlbf-n1"])
    monkeypatch.setattr(cli.os, "execvpe", lambda file, argv, env: execs.append((file, argv, env)))
    cli._reexec_in_netns("nlbf-n1", ["drain", "n2"])
    (file, argv, env), = execs
    assert argv[:4] == ["ip", "netns", "exec", "nlbf-n1"] and argv[-2:] == ["drain", "n2"]
    assert env[cli.NETNS_ENV] == "nlbf-n1"


def test_version_has_one_source():
    """setup.cfg reads the version from the package; the installed metadata says the same."""
    import configparser
    from importlib.metadata import version
    from pathlib import Path

    import nlbfarm
    cp = configparser.ConfigParser()
    cp.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    assert cp["metadata"]["version"] == "attr: nlbfarm.__version__"
    assert version("nlbfarm") == nlbfarm.__version__


@pytest.mark.parametrize("prog, main", [("farmctl", cli.main), ("farmd", None)])
def test_version_flag(prog, main, capsys):
    import nlbfarm
    if main is None:
        from nlbfarm.node.agent import main
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out == f"{prog} {nlbfarm.__version__}\n"


def test_farmctl_version_client_only_needs_no_agent(capsys):
    import nlbfarm
    assert cli.main(["version", "--client", "--target", "127.0.0.1:1"]) == cli.EXIT_OK
    assert capsys.readouterr().out == f"farmctl {nlbfarm.__version__}\n"


# ---- operator habits: global flags, one-line errors, exit codes, output streams ------------------

@pytest.mark.parametrize("argv", [
    ["--target", "10.0.0.9:7400", "status"],
    ["status", "--target", "10.0.0.9:7400"],
    ["--target", "10.0.0.1:1", "status", "--target", "10.0.0.9:7400"],  # the later one wins
    ["--target=10.0.0.9:7400", "members", "--json"],
])
def test_connection_flags_before_or_after_the_subcommand(argv, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.yaml"))
    monkeypatch.delenv("NLBFARM_TARGET", raising=False)
    args = cli.build_parser().parse_args(argv)
    assert args.talks_to_agent and cli.connection(args).target == "10.0.0.9:7400"


def test_without_a_target_flag_the_default_stays(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.yaml"))
    monkeypatch.delenv("NLBFARM_TARGET", raising=False)
    assert cli.connection(cli.build_parser().parse_args(["status"])).target == cli.DEFAULT_TARGET


def test_regression_64_bit_fields_are_json_numbers():
    """proto3's JSON mapping writes uint64 as strings; farmctl --json printed "generation": "7"."""
    from nlbfarm.proto import farm_pb2
    resp = farm_pb2.GetStatusResponse(generation=2 ** 40, bucket_count=64, members=[
        farm_pb2.Member(id="n1", applied_generation=2 ** 40 - 1, buckets=64)])
    d = cli.message_dict(resp)
    assert d["generation"] == 2 ** 40 and d["members"][0]["applied_generation"] == 2 ** 40 - 1
    assert d["bucket_count"] == 64 and d["members"][0]["buckets"] == 64
    ev = cli.message_dict(farm_pb2.Event(seq=5, fields={"a": "b"}))
    assert ev["seq"] == 5 and ev["fields"] == {"a": "b"}
    view = cli.message_dict(farm_pb2.NodeView(counters=[farm_pb2.RuleCounter(packets=3, bytes=2 ** 50)]))
    assert view["counters"][0] == {"vip": "", "rule": "", "packets": 3, "bytes": 2 ** 50}


def one_line_error(capsys) -> str:
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("farmctl: ") and "Traceback" not in out.err, out.err
    return lines[0]


def test_regression_which_from_a_missing_file_is_one_line(capsys, tmp_path):
    assert cli.main(["which", "--from-file", str(tmp_path / "missing"), "--target", "127.0.0.1:1"]) == cli.EXIT_ERROR
    assert "cannot read --from-file" in one_line_error(capsys)


def test_which_from_a_binary_file_is_one_line(capsys, tmp_path):
    f = tmp_path / "bin"
    f.write_bytes(b"\xff\xfe\x00garbage")
    assert cli.main(["which", "--from-file", str(f), "--target", "127.0.0.1:1"]) == cli.EXIT_ERROR
    assert "is not text" in one_line_error(capsys)


def _drain_fakes(monkeypatch, statuses):
    monkeypatch.setattr(cli, "change_metadata", lambda args: ())
    monkeypatch.setattr(cli, "_rpc", lambda *a, **k: SimpleNamespace(message="n2 is draining"))
    it = iter(statuses)

    def fetch(conn, timeout):
        st = next(it)
        if isinstance(st, BaseException):
            raise st
        return st
    monkeypatch.setattr(cli, "fetch_status", fetch)
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)


def _member(state, buckets, dbuckets, conns):
    return {"members": [{"id": "n2", "state": state, "buckets": buckets, "draining_buckets": dbuckets,
                         "draining_connections": conns}]}


def test_regression_ctrl_c_during_drain_wait_is_one_line(monkeypatch, capsys):
    _drain_fakes(monkeypatch, [_member("draining", 0, 3, 5), KeyboardInterrupt()])
    assert cli.main(["drain", "n2", "--wait", "--target", "127.0.0.1:7400"]) == cli.EXIT_INTERRUPTED
    out = capsys.readouterr()
    assert out.err.splitlines()[-1] == "farmctl: interrupted" and "Traceback" not in out.err


def test_drain_wait_progress_goes_to_stderr_and_the_result_to_stdout(monkeypatch, capsys):
    _drain_fakes(monkeypatch, [_member("draining", 0, 3, 5), _member("draining", 0, 3, 1),
                               _member("draining", 0, 0, 0)])
    assert cli.main(["drain", "n2", "--wait", "--target", "127.0.0.1:7400"]) == cli.EXIT_OK
    out = capsys.readouterr()
    assert out.out == "n2 is drained: it serves no connection\n"
    assert "5 connections left" in out.err and "1 connections left" in out.err


def test_an_unexpected_error_is_one_line_unless_debugging(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("division by zero\nsecond line")
    monkeypatch.setattr(cli, "cmd_table", boom)
    monkeypatch.delenv("NLBFARM_DEBUG", raising=False)
    assert cli.main(["table", "--target", "127.0.0.1:1"]) == cli.EXIT_ERROR
    line = one_line_error(capsys)
    assert "unexpected error: ZeroDivisionError: division by zero second line" in line
    monkeypatch.setenv("NLBFARM_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["table", "--target", "127.0.0.1:1"])


def test_unreachable_agent_has_its_own_exit_code(capsys):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = cli.main(["status", "--target", f"127.0.0.1:{port}", "--timeout", "1"])
    assert rc == cli.EXIT_UNREACHABLE == 4
    assert "nothing answers there" in one_line_error(capsys)


def test_regression_long_node_ids_keep_the_columns_aligned():
    long_id = "web-frontend-eu-west-1a-0042.example.com"
    st = {"node_id": "n1", "cluster": "c", "bucket_count": 64, "members": [
        {"id": long_id, "state": "active", "weight": 1, "buckets": 32, "applied_generation": 3},
        {"id": "n2", "state": "active", "weight": 1, "buckets": 32, "applied_generation": 3}]}
    header, *rows = cli.render_status(st).split("\n")[4:]
    assert rows[0].startswith(long_id + " ") and rows[1].startswith("n2" + " " * (len(long_id) - 1))
    assert header.index("STATE") == rows[0].index("active") == rows[1].index("active")


@pytest.mark.parametrize("line, want", [
    ("farmctl st", {"status"}),
    ("farmctl --target 10.0.0.1:7400 dr", {"drain"}),
    ("farmctl lab ", {"up", "status", "down", "-h", "--help"}),
    ("farmctl lab up --n", {"--nodes"}),
    ("farmctl drain n2 --wa", {"--wait", "--wait-timeout"}),
    ("farmctl completion ", {"bash", "-h", "--help"}),
    ("farmctl status --target ", set()),
])
def test_bash_completion(line, want, tmp_path):
    import shutil
    import subprocess
    bash = shutil.which("bash")
    script = tmp_path / "farmctl.bash"
    script.write_text(cli.completion_script(cli.build_parser(), "bash"))
    words = line.split(" ")
    probe = (f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
             f"COMP_CWORD={len(words) - 1}; _farmctl; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    cp = subprocess.run([bash, "-c", probe], capture_output=True, text=True, timeout=10)
    assert cp.returncode == 0, cp.stderr
    assert set(filter(None, cp.stdout.splitlines())) == want


def test_regression_a_subcommand_option_is_not_taken_for_a_global_prefix():
    """With the connection flags on the top-level parser too, `lab up --tls` was refused as an
    ambiguous abbreviation of --tls-ca, --tls-cert, ... (seen in CI)."""
    args = cli.build_parser().parse_args(["lab", "up", "--tls", "--nodes", "2"])
    assert args.tls is True and args.nodes == 2
    args = cli.build_parser().parse_args(["lab", "up", "--ipv6"])
    assert args.ipv6 is True
