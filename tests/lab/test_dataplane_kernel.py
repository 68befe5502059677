"""The rendered rules against the real kernel, inside a throwaway namespace."""
import json
import subprocess
import sys
import time

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
    return ("import json\nfrom nlbfarm.node.dataplane import DataPlane, DataPlaneSpec\n"
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
    apply_spec(netns, SPEC, then="import time\nfor _ in range(4):\n    time.sleep(0.4); assert dp.refresh_fence(lambda: True)\n")
    # 1.6 s after apply with a 1 s timeout: only the refreshes kept it alive.
    out = json.loads(nft(netns, "-j", "list", "set", "inet", "nlbfarm", "fence").stdout)
    assert out["nftables"][1]["set"].get("elem")


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
    out = apply_spec(netns, SPEC, then="print(dp.refresh_fence(lambda: False))\n")
    assert out.split()[-1] == "False"


def test_refresh_after_a_flush_forgets_the_spec(netns):
    code = spec_code(SPEC) + (
        "import subprocess\ndp.apply(spec)\nsubprocess.run(['nft', 'flush', 'ruleset'], check=True)\n"
        "try:\n    dp.refresh_fence(lambda: True)\nexcept DataPlaneError:\n    print('failed', dp.current is None)\n"
        "print(dp.apply(spec), dp.fence_is_open())\n")
    assert in_ns(netns, code).split() == ["failed", "True", "True", "True"]
