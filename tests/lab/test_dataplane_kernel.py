"""The rendered rules against the real kernel, inside a throwaway namespace."""
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from nlbfarm.coordinator.hashing import bucket_of
from nlbfarm.node.dataplane import cluster_mac_for

SPEC = dict(interface="eth0", vips=["198.18.0.100"], cluster_mac=cluster_mac_for("198.18.0.100"),
            buckets=4096, seed=305441741, accepting=[[0, 1364], [4000, 4000]], fence_open=True, fence_timeout=1)


def in_ns(ns, code, **kw):
    cp = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=30, **kw)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


def nft(ns, *args):
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], capture_output=True, text=True,
                          timeout=10)


def spec_code(spec: dict) -> str:
    """Python source that builds ``spec`` and an empty DataPlane ``dp`` inside the namespace."""
    return ("import json, math\nfrom nlbfarm.node.dataplane import DataPlane, DataPlaneSpec\n"
            "from nlbfarm.errors import DataPlaneError\n"
            f"d = json.loads({json.dumps(json.dumps(spec))})\n"
            "d['vips'] = tuple(d['vips']); d['accepting'] = tuple(tuple(r) for r in d['accepting'])\n"
            "dp = DataPlane(); spec = DataPlaneSpec(**d)\n")


def apply_spec(ns, spec: dict, then: str = ""):
    return in_ns(ns, spec_code(spec) + "print(dp.apply(spec), dp.apply(spec))\n" + then)


def test_ruleset_loads_and_is_idempotent(netns):
    assert apply_spec(netns, SPEC).split() == ["True", "False"]
    out = nft(netns, "list", "ruleset").stdout
    assert "jhash ip saddr . th sport mod 4096 seed 0x1234abcd { 0-1364, 4000 }" in out
    assert "arp saddr ip 198.18.0.100 arp saddr ether set 03:bf:c6:12:00:64" in out
    assert "priority raw" in out


def test_fence_expires_in_the_kernel_without_the_agent(netns):
    apply_spec(netns, SPEC)
    listing = lambda: json.loads(nft(netns, "-j", "list", "set", "inet", "nlbfarm", "fence").stdout)
    assert listing()["nftables"][1]["set"].get("elem"), "fence should be open right after apply"
    time.sleep(SPEC["fence_timeout"] + 0.5)
    assert not listing()["nftables"][1]["set"].get("elem"), "fence element must expire by itself"


def test_fence_refresh_resets_the_timeout(netns):
    apply_spec(netns, SPEC, then="import time\nfor _ in range(4):\n    time.sleep(0.4); assert dp.refresh_fence(math.inf)\n")
    # 1.6 s after apply with a 1 s timeout: only the refreshes kept it alive.
    out = json.loads(nft(netns, "-j", "list", "set", "inet", "nlbfarm", "fence").stdout)
    assert out["nftables"][1]["set"].get("elem")


def fence_elements(ns) -> list[dict]:
    out = json.loads(nft(ns, "-j", "list", "set", "inet", "nlbfarm", "fence").stdout)
    return [e["elem"] for e in out["nftables"][1]["set"].get("elem", [])]


def test_sub_second_fence_element_expires_on_time(netns):
    apply_spec(netns, dict(SPEC, fence_timeout=0.3))
    started = time.monotonic()
    text = nft(netns, "list", "set", "inet", "nlbfarm", "fence").stdout
    if time.monotonic() - started < 0.2:
        assert '"eth0" timeout 300ms' in text, text
    time.sleep(0.6)
    assert fence_elements(netns) == [], "a 300 ms fence element must be gone 600 ms later"


def test_regression_ruleset_apply_keeps_the_fence_element(netns):
    # Every new table replaced the whole inet table, fence element included.
    # With millisecond elements (text, outside the JSON transaction) that
    # would close the fence for a moment at each table change: the element
    # must survive the rebuild, with its own expiry, not a renewed one.
    spec = dict(SPEC, fence_timeout=5)
    apply_spec(netns, spec, then=(
        "import time\ntime.sleep(2.2)\n"
        "from dataclasses import replace\nother = replace(spec, accepting=((0, 99),))\n"
        "assert dp.apply(other)\n"))
    elems = fence_elements(netns)
    assert len(elems) == 1 and elems[0]["expires"] <= 3, elems  # kept (about 2.8 s left), not renewed to 5 s
    rules = nft(netns, "list", "ruleset").stdout
    assert "0-99" in rules and "0-1364" not in rules


def test_a_successor_process_adopts_the_element_and_rebuilds_without_a_gap(netns):
    # A planned restart: the old process holds the element past fence_timeout
    # (its lease deadline), a new process adopts it and re-applies the same
    # ruleset keeping it; the element it adopted is never renewed by the
    # rebuild and never closed.
    spec = dict(SPEC, fence_timeout=0.3)
    apply_spec(netns, spec, then=(
        "import time\nms = dp.hold_fence(time.monotonic() + 2.0)\nassert 1900 <= ms <= 1950, ms\n"))
    assert fence_elements(netns), "the held element outlives fence_timeout"
    time.sleep(0.5)
    out = in_ns(netns, spec_code(spec) + (
        "import time\nleft = dp.adopt_fence('nlbfarm', 'eth0')\n"
        "assert 1.0 < left < 1.6, left\n"
        "assert dp.apply(spec, time.monotonic() + 2.8)\n"
        "print(round(dp.fence_expires_at - time.monotonic(), 3))\n"))
    assert 1.0 < float(out) < 1.6, out  # the adopted element, not a fresh 300 ms one
    time.sleep(0.2)
    assert fence_elements(netns), "the rebuild kept the adopted element"
    # Nothing to adopt: no table, or no element.
    assert in_ns(netns, "from nlbfarm.node.dataplane import DataPlane\n"
                        "print(DataPlane().adopt_fence('nosuch', 'eth0'))").strip() == "0.0"
    time.sleep(1.6)
    assert in_ns(netns, "from nlbfarm.node.dataplane import DataPlane\n"
                        "print(DataPlane().adopt_fence('nlbfarm', 'eth0'))").strip() == "0.0"


def test_an_adopted_element_that_could_outlive_the_deadline_is_replaced(netns):
    spec = dict(SPEC, fence_timeout=0.3)
    apply_spec(netns, spec, then="import time\ndp.hold_fence(time.monotonic() + 3.0)\n")
    out = in_ns(netns, spec_code(spec) + (
        "import time\ndp.adopt_fence('nlbfarm', 'eth0')\n"
        "assert dp.apply(spec, time.monotonic() + 1.0)\n"
        "print(round(dp.fence_expires_at - time.monotonic(), 3))\n"))
    assert 0 < float(out) <= 0.3, out
    assert in_ns(netns, spec_code(spec) + "dp.close_fence_of('nlbfarm', 'eth0')\n") == ""
    assert fence_elements(netns) == []


def test_teardown_removes_only_our_tables(netns):
    assert nft(netns, "add", "table", "inet", "other").returncode == 0
    apply_spec(netns, SPEC, then="dp.teardown()\n")
    tables = nft(netns, "list", "tables").stdout.split("\n")
    assert "table inet other" in tables
    assert not any("nlbfarm" in t for t in tables)


def test_refused_transaction_leaves_previous_rules(netns):
    apply_spec(netns, SPEC)
    bad = dict(SPEC, interface="x" * 40)  # an ifname longer than the kernel accepts
    code = spec_code(bad) + ("try:\n    dp.apply(spec); print('applied')\n"
                             "except DataPlaneError as e:\n    print('refused', dp.current is None)\n")
    assert in_ns(netns, code).split() == ["refused", "True"]
    assert "seed 0x1234abcd { 0-1364, 4000 }" in nft(netns, "list", "ruleset").stdout


def test_fence_is_not_extended_when_the_condition_fails(netns):
    out = apply_spec(netns, SPEC, then="print(dp.refresh_fence(None))\n")
    assert out.split()[-1] == "False"


def test_refresh_after_a_flush_forgets_the_spec(netns):
    code = spec_code(SPEC) + (
        "import subprocess\ndp.apply(spec)\nsubprocess.run(['nft', 'flush', 'ruleset'], check=True)\n"
        "try:\n    dp.refresh_fence(math.inf)\nexcept DataPlaneError:\n    print('failed', dp.current is None)\n"
        "print(dp.apply(spec), dp.fence_is_open())\n")
    assert in_ns(netns, code).split() == ["failed", "True", "True", "True"]


# --- per-VIP counters, with real packets from a client namespace ------------------

CLIENT_IP = "198.18.0.1"
PAYLOAD = 32  # UDP payload bytes: the counters see 20 + 8 + 32 bytes per packet


@pytest.fixture
def client(netns):
    """A second throwaway namespace wired to ``netns``: its ``c0`` is the node's ``eth0``."""
    from nlbfarm.node import iplib
    name = f"nft-{uuid.uuid4().hex[:8]}"
    iplib.ensure_netns(name)
    try:
        iplib.ensure_veth_pair("eth0", "c0", netns=netns, peer_netns=name)
        for cmd in (["-n", netns, "addr", "add", "198.18.0.2/24", "dev", "eth0"],
                    ["-n", netns, "addr", "add", f"{SPEC['vips'][0]}/32", "dev", "eth0"],
                    ["-n", name, "addr", "add", f"{CLIENT_IP}/24", "dev", "c0"],
                    ["-n", netns, "link", "set", "eth0", "up"], ["-n", name, "link", "set", "c0", "up"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True, timeout=10)
        yield name
    finally:
        iplib.delete_netns(name)


def owned(port: int, ranges) -> bool:
    b = bucket_of(CLIENT_IP, port, SPEC["buckets"], SPEC["seed"])
    return any(lo <= b <= hi for lo, hi in ranges)


def test_counters_per_vip_rule_are_monotonic_across_reapply_and_fence(netns, client):
    first, second = SPEC["accepting"], [[1365, 3999]]
    rnd = random.Random(7)
    p1, p2, p3 = (rnd.sample(range(20000, 60000), 60) for _ in range(3))
    assert any(owned(p, first) for p in p1) and not all(owned(p, first) for p in p1)
    # Each batch is one bounded sender run: one UDP datagram per source port.
    sender = ("import socket, sys\nfor p in map(int, sys.argv[1:]):\n"
              "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('" + CLIENT_IP + "', p))\n"
              f"    s.sendto(b'x' * {PAYLOAD}, ('{SPEC['vips'][0]}', 9)); s.close()\n")
    code = spec_code(SPEC) + (
        "import dataclasses, subprocess, sys, time\n"
        f"def send(ports):\n"
        f"    subprocess.run(['ip', 'netns', 'exec', {client!r}, sys.executable, '-c', {sender!r},"
        " *map(str, ports)], check=True, timeout=30)\n"
        "    time.sleep(0.3)  # let the veth backlog drain into prerouting\n"
        "snap = lambda: {c.rule: [c.packets, c.bytes] for c in dp.counters()}\n"
        "snaps = [dp.counters()]\n"
        "dp.apply(spec); snaps.append(snap())\n"
        f"send({p1!r}); snaps.append(snap())\n"
        f"dp.apply(spec.with_buckets({second!r})); snaps.append(snap())\n"
        f"send({p2!r}); snaps.append(snap())\n"
        "dp.apply(dataclasses.replace(spec.with_buckets(" + repr(second) + "), fence_open=False))\n"
        "snaps.append(snap())\n"
        f"send({p3!r}); snaps.append(snap())\n"
        "print(json.dumps(snaps))\n")
    snaps = json.loads(in_ns(netns, code).strip().splitlines()[-1])
    assert snaps[0] == []  # nothing applied yet
    fresh, after1, reapplied, after2, fenced, after3 = snaps[1:]
    size = 20 + 8 + PAYLOAD
    assert set(fresh) == {"accepted", "draining", "dropped_fenced", "dropped_foreign", "dropped_unmatched",
                          "dropped_draining_syn", "dropped_draining_unknown", "dropped_guarded"}
    assert all(v == [0, 0] for v in fresh.values())

    def grew(a, b, rule):
        return [b[rule][0] - a[rule][0], b[rule][1] - a[rule][1]]

    # Batch 1: owned buckets are accepted, the others dropped as foreign.
    n_own = sum(owned(p, first) for p in p1)
    assert grew(fresh, after1, "accepted") == [n_own, n_own * size]
    assert grew(fresh, after1, "dropped_foreign") == [len(p1) - n_own, (len(p1) - n_own) * size]
    assert after1["accepted"][0] > 0 and after1["dropped_foreign"][0] > 0
    assert after1["accepted"][0] + after1["dropped_foreign"][0] >= len(p1)
    # The re-apply resets the kernel counters; counters() must not go back.
    assert reapplied == after1
    n_own = sum(owned(p, second) for p in p2)
    assert grew(reapplied, after2, "accepted") == [n_own, n_own * size]
    assert grew(reapplied, after2, "dropped_foreign") == [len(p2) - n_own, (len(p2) - n_own) * size]
    # Fence closed: everything is dropped as fenced, nothing else moves.
    assert fenced == after2
    assert grew(fenced, after3, "dropped_fenced") == [len(p3), len(p3) * size]
    assert grew(fenced, after3, "accepted") == [0, 0] and grew(fenced, after3, "dropped_foreign") == [0, 0]
    for a, b in zip(snaps[1:], snaps[2:]):
        assert all(b[r][0] >= a[r][0] and b[r][1] >= a[r][1] for r in a), (a, b)


def test_two_vip_counters_load_and_read_back(netns):
    two = dict(SPEC, vips=["198.18.0.100", "198.18.0.101"])
    code = spec_code(two) + (
        "spec = spec.with_buckets(((0, 1023),), ((2048, 2100),), ((1000, 1023),))\n"
        "print(dp.counters() == [], dp.apply(spec))\n"
        "cs = dp.counters()\n"
        "print(len(cs), cs == sorted(cs, key=lambda c: (c.vip, c.rule)), {c.vip for c in cs} == set(spec.vips),"
        " all(c.packets == 0 for c in cs))\n"
        "import subprocess\nlisting = subprocess.run(['nft', 'list', 'chain', 'inet', 'nlbfarm', 'ct_none'],"
        " check=True, capture_output=True, text=True).stdout\n"
        "print('counter name ip daddr map { 198.18.0.100 : \"dropped_guarded_198_18_0_100\", '\n"
        "      '198.18.0.101 : \"dropped_guarded_198_18_0_101\" } drop' in listing)\n"
        "subprocess.run(['nft', 'flush', 'ruleset'], check=True)\n"
        "try:\n    dp.counters(); print('read')\nexcept DataPlaneError:\n    print('failed')\n"
        "print(dp.apply(spec.with_buckets(((0, 10),))), len(dp.counters()))\n")
    assert in_ns(netns, code).split() == ["True", "True", "16", "True", "True", "True", "True", "failed", "True",
                                            "16"]


@pytest.mark.parametrize("case", ["ipv6_rules_handover", "dual_stack_one_node"])
def test_ipv6_golden_rulesets_load_into_the_kernel(netns, case):
    """The IPv6 and dual-stack rulesets are accepted by nft, and read back as intended."""
    golden = (Path(__file__).parents[1] / "unit" / "golden" / f"{case}.json").read_text()
    cp = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "-f", "-"], input=json.dumps(
        {"nftables": json.loads(golden)}), capture_output=True, text=True, timeout=10)
    assert cp.returncode == 0, cp.stderr
    out = nft(netns, "list", "table", "inet", "nlbfarm").stdout
    assert "ip6 daddr" in out and "jump vip6_in" in out
    assert "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept" in out
    # the ND rewrite: the cluster MAC into the link-layer option, the delta into reserved bits
    assert "icmpv6 type nd-neighbor-advert" in out and "@th,208,48 set" in out and "@th,48,16 set" in out
    if case == "ipv6_rules_handover":
        assert "jhash @nh,64,64 mod 4096" in out  # network affinity: the client's /64
        assert "jhash ip6 saddr . th sport mod 4096" in out


def test_steady_state_keeps_conntrack_tracking_without_a_post_conntrack_hook(netns):
    """No bucket drains: no hook after conntrack, yet conntrack tracks connections, so a
    drain that starts later knows every connection opened before it."""
    apply_spec(netns, SPEC)
    assert nft(netns, "list", "chain", "inet", "nlbfarm", "postct").returncode != 0  # not there
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=10)
    code = ("import socket, subprocess\n"
            "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(); port = srv.getsockname()[1]\n"
            "c = socket.create_connection(('127.0.0.1', port), timeout=5); a, _ = srv.accept()\n"
            "out = subprocess.run(['conntrack', '-L', '-p', 'tcp', '--dport', str(port)], capture_output=True,"
            " text=True, timeout=10).stdout\n"
            "print('ESTABLISHED' in out)\n")
    assert in_ns(netns, code).split() == ["True"]
