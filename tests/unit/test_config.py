"""Config validation: every error names its field; nothing half-valid gets through."""
import textwrap

import pytest

from nlbfarm.config import load_config, parse_config
from nlbfarm.errors import ConfigError

GOOD = {
    "node": {"id": "n1", "interface": "eth0"},
    "cluster": {"vips": ["198.18.0.100"]},
    "etcd": {"endpoints": ["127.0.0.1:2379"]},
}


def merged(**sections):
    d = {k: dict(v) for k, v in GOOD.items()}
    for sec, vals in sections.items():
        d.setdefault(sec, {}).update(vals)
    return d


def test_minimal_config_gets_sane_defaults():
    cfg = parse_config(GOOD)
    assert cfg.cluster.buckets == 4096
    assert cfg.timing.lease_ttl == 3 and cfg.timing.fence_timeout == 0.4
    assert cfg.status.listen == "127.0.0.1:7400"  # loopback by default
    assert cfg.key_prefix == "/nlbfarm/default"
    assert cfg.nft.table == "nlbfarm"


@pytest.mark.parametrize("sections, field, words", [
    ({"timing": {"lease_ttl": 3, "fence_timeout": 3}}, "timing", "must be less than lease_ttl"),
    ({"timing": {"lease_ttl": 3, "fence_timeout": 2, "keepalive_interval": 0.8}}, "timing",
     "keepalive_interval (0.8 s) must be at most half"),
    ({"cluster": {"buckets": 1000}}, "cluster.buckets", "power of two from 64 to 65536, got 1000"),
    ({"cluster": {"buckets": 32}}, "cluster.buckets", "power of two"),
    ({"cluster": {"buckets": 131072}}, "cluster.buckets", "power of two"),
    ({"cluster": {"vips": ["300.1.1.1"]}}, "cluster.vips", "is not an IP address"),
    ({"cluster": {"vips": []}}, "cluster.vips", "at least 1"),
    ({"cluster": {"vips": ["198.18.0.1", "198.18.0.1"]}}, "cluster.vips", "same VIP twice"),
    ({"cluster": {"vips": ["2001:db8::1", "2001:DB8:0::1"]}}, "cluster.vips", "same VIP twice"),
    ({"cluster": {"vips": ["ff02::1"]}}, "cluster.vips", "ff02::1 cannot be a VIP"),
    ({"cluster": {"vips": ["fe80::1"]}}, "cluster.vips", "fe80::1 cannot be a VIP"),
    ({"cluster": {"cluster_mac": "02:00:00:00:00:01"}}, "cluster", "not a multicast MAC"),
    ({"cluster": {"mac_mode": "unicast-flood", "cluster_mac": "03:bf:00:00:00:01"}}, "cluster",
     "must be a locally administered unicast MAC"),
    ({"cluster": {"mac_mode": "broadcast"}}, "cluster.mac_mode", "must be one of multicast, unicast-flood"),
    ({"cluster": {"cluster_mac": "zz"}}, "cluster.cluster_mac", "not a MAC address"),
    ({"node": {"id": "bad id!"}}, "node.id", "must be 1-63 characters"),
    ({"node": {"interface": "a-very-long-interface-name"}}, "node.interface", "interface name"),
    ({"node": {"weight": -1}}, "node.weight", "greater than or equal to 0"),
    ({"etcd": {"endpoints": ["localhost"]}}, "etcd.endpoints", "is not host:port"),
    ({"etcd": {"prefix": "nlbfarm"}}, "etcd.prefix", "must start with '/'"),
    ({"status": {"listen": "nowhere"}}, "status.listen", "is not host:port"),
    ({"node": {"wieght": 2}}, "node.wieght", "unknown field"),
])
def test_errors_name_the_field_and_the_problem(sections, field, words):
    with pytest.raises(ConfigError) as ei:
        parse_config(merged(**sections), "farmd.yaml")
    msg = str(ei.value)
    assert "farmd.yaml" in msg
    assert f"  {field}" in msg, msg
    assert words in msg, msg


def test_missing_sections_are_reported_together():
    with pytest.raises(ConfigError) as ei:
        parse_config({"node": {"id": "n1"}})
    msg = str(ei.value)
    assert "cluster: required field is missing" in msg
    assert "etcd: required field is missing" in msg


def test_top_level_must_be_mapping():
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["x"])


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent("""
        node: {id: n1}
        cluster: {name: web, vips: [198.18.0.100]}
        etcd: {endpoints: ["10.0.0.1:2379", "10.0.0.2:2379"]}
    """))
    cfg = load_config(good)
    assert cfg.key_prefix == "/nlbfarm/web" and len(cfg.etcd.endpoints) == 2


def test_farmd_check_exits_nonzero_and_changes_nothing(tmp_path, capsys):
    from nlbfarm.node.agent import main
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: {id: n1}\ncluster: {vips: [198.18.0.100]}\netcd: {endpoints: ['x:1']}\n"
                   "timing: {lease_ttl: 2, fence_timeout: 2}\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "timing: fence_timeout (2 s) must be less than lease_ttl (2 s) (line 4)" in err


def test_a_fence_shorter_than_two_keepalives_is_refreshed_on_its_own_tick():
    # The fence thread rewrites the element three times per fence_timeout,
    # whatever the keepalive interval: the old "2 x keepalive <= fence" rule is gone.
    cfg = parse_config(merged(timing={"lease_ttl": 5, "fence_timeout": 0.3, "keepalive_interval": 0.8}))
    from nlbfarm.node.decide import Timing
    assert Timing.from_config(cfg).fence_refresh == pytest.approx(0.1)


@pytest.mark.parametrize("timing, etcd, words", [
    ({"lease_ttl": 3, "fence_timeout": 1}, {"timeout": 1.5},
     "etcd.timeout (1.5 s) must be at most half of timing.lease_ttl - timing.fence_timeout (2 s)"),
])
def test_timing_rules_that_keep_the_fence_alive(timing, etcd, words):
    with pytest.raises(ConfigError) as ei:
        parse_config(merged(timing=timing, etcd=etcd))
    assert words in str(ei.value)


# ---- farm module, metrics, token --------------------------------------------

def check(**kw):
    return {"name": "c", "type": "tcp", "port": 80, **kw}


def test_module_defaults_and_a_full_module():
    cfg = parse_config(GOOD)
    assert cfg.module.checks == () and cfg.module.on_failure == "withdraw"
    assert cfg.metrics.listen == "127.0.0.1:9740" and cfg.status.token_file is None
    cfg = parse_config(merged(module={
        "start": "systemctl start nginx", "stop": "systemctl stop nginx", "on_failure": "restart",
        "checks": [check(), {"name": "h", "type": "https", "url": "https://127.0.0.1/", "insecure": True,
                             "expect_status": [200, 204], "body_match": "ok"},
                   {"name": "p", "type": "process", "pid_file": "/run/nginx.pid"},
                   {"name": "x", "type": "command", "command": "true", "interval": 5, "timeout": 5}]}))
    c = cfg.module.checks
    assert [x.type for x in c] == ["tcp", "https", "process", "command"]
    assert (c[0].interval, c[0].timeout, c[0].rise, c[0].fall) == (1.0, 0.5, 2, 2)


@pytest.mark.parametrize("module, field, words", [
    ({"checks": [check(type="icmp")]}, "module.checks.0.type", "must be one of tcp, http, https, process, "
                                                               "command, got 'icmp'"),
    ({"checks": [{"name": "c", "type": "tcp"}]}, "module.checks.0", "check 'c' of type tcp needs port"),
    ({"checks": [check(url="http://x/")]}, "module.checks.0", "of type tcp does not take url"),
    ({"checks": [{"name": "c", "type": "http", "url": "https://x/"}]}, "module.checks.0",
     "needs a http:// url"),
    ({"checks": [{"name": "c", "type": "process"}]}, "module.checks.0", "exactly one of process, pid_file"),
    ({"checks": [{"name": "c", "type": "process", "process": "a", "pid_file": "/p"}]}, "module.checks.0",
     "exactly one of process, pid_file"),
    ({"checks": [check(timeout=2, interval=1)]}, "module.checks.0", "timeout (2.0 s) must not exceed interval"),
    ({"checks": [check(rise=0)]}, "module.checks.0.rise", "greater than or equal to 1"),
    ({"checks": [{"name": "c", "type": "http", "url": "http://x/", "body_match": "("}]},
     "module.checks.0.body_match", "not a valid regular expression"),
    ({"checks": [{"name": "c", "type": "http", "url": "http://x/", "expect_status": [99]}]},
     "module.checks.0.expect_status", "99 is not an HTTP status code"),
    ({"checks": [check(), check()]}, "module", "check names must be unique: c used twice"),
    ({"on_failure": "reboot"}, "module.on_failure", "must be one of withdraw, restart, stop"),
    ({"on_failure": "restart", "start": "x"}, "module", "restart needs both start and stop"),
    ({"on_failure": "stop"}, "module", "on_failure: stop needs a stop command"),
    ({"checks": [check(nmae="x")]}, "module.checks.0.nmae", "unknown field"),
])
def test_module_errors_name_the_field(module, field, words):
    with pytest.raises(ConfigError) as ei:
        parse_config(merged(module=module), "farmd.yaml")
    msg = str(ei.value)
    assert f"  {field}" in msg and words in msg, msg


@pytest.mark.parametrize("sections, field, words", [
    ({"status": {"token_file": "relative/token"}}, "status.token_file", "must be an absolute path"),
    ({"metrics": {"listen": "9740"}}, "metrics.listen", "is not host:port"),
])
def test_status_and_metrics_errors(sections, field, words):
    with pytest.raises(ConfigError) as ei:
        parse_config(merged(**sections), "farmd.yaml")
    assert f"  {field}" in str(ei.value) and words in str(ei.value)


def test_metrics_can_be_turned_off():
    assert parse_config(merged(metrics={"listen": None})).metrics.listen is None


@pytest.mark.parametrize("name", ["farmd.yaml", "modules/nginx.yaml", "modules/generic.yaml"])
def test_example_configs_are_valid(name):
    from pathlib import Path
    cfg = load_config(Path(__file__).parents[2] / "deploy" / "examples" / name)
    if name.startswith("modules/"):
        assert cfg.module.start and cfg.module.stop and cfg.module.checks


# ---- port rules ----------------------------------------------------------------

def test_port_rules():
    cfg = parse_config(merged(cluster={"vips": ["198.18.0.100", "198.18.0.101"], "unmatched": "one-node",
                                       "rules": [{"vip": "198.18.0.100", "protocol": "tcp", "ports": 80,
                                                  "affinity": "client"},
                                                 {"protocol": "both", "ports": "5000-5100",
                                                  "affinity": "network"},
                                                 {"vip": "198.18.0.101", "protocol": "tcp", "ports": "80"}]}))
    r = cfg.cluster.rules
    assert [(x.vip, x.protocols, x.port_range, x.affinity) for x in r] == [
        ("198.18.0.100", ("tcp",), (80, 80), "client"), (None, ("tcp", "udp"), (5000, 5100), "network"),
        ("198.18.0.101", ("tcp",), (80, 80), "none")]
    assert cfg.cluster.unmatched == "one-node"
    assert [(x.protocol, x.ports, x.affinity) for x in parse_config(GOOD).cluster.effective_rules] == [
        ("both", "all", "none")]


@pytest.mark.parametrize("rules, field, words", [
    ([{"ports": "90-80"}], "cluster.rules.0.ports", "the range first <= last"),
    ([{"ports": 0}], "cluster.rules.0.ports", "ports must be 1..65535"),
    ([{"ports": "http"}], "cluster.rules.0.ports", "is not a port, a range like 8000-8100, or 'all'"),
    ([{"protocol": "sctp"}], "cluster.rules.0.protocol", "must be one of tcp, udp, both"),
    ([{"affinity": "sticky"}], "cluster.rules.0.affinity", "must be one of none, client, network"),
    ([{"vip": "198.18.0.9"}], "cluster", "rules[0]: vip 198.18.0.9 is not one of cluster.vips"),
    ([{"protocol": "tcp", "ports": "1-100"}, {"protocol": "both", "ports": 80}], "cluster",
     "rules[1] overlaps rules[0] (198.18.0.100 tcp 80-80)"),
])
def test_port_rule_errors(rules, field, words):
    with pytest.raises(ConfigError) as ei:
        parse_config(merged(cluster={"vips": ["198.18.0.100"], "rules": rules}), "farmd.yaml")
    assert f"  {field}" in str(ei.value) and words in str(ei.value), str(ei.value)


def test_unmatched_must_be_known():
    with pytest.raises(ConfigError, match="must be one of drop, one-node"):
        parse_config(merged(cluster={"unmatched": "default-host"}))


def test_ipv6_and_dual_stack_vips_are_accepted_in_canonical_form():
    cfg = parse_config(merged(cluster={"vips": ["198.18.0.100", "2001:DB8:0::100"],
                                       "rules": [{"vip": "2001:db8::100", "protocol": "tcp", "ports": 80,
                                                  "affinity": "network"}]}))
    assert cfg.cluster.vips == ("198.18.0.100", "2001:db8::100")
    assert cfg.cluster.rules[0].vip == "2001:db8::100"
