"""Golden tests: the exact nftables JSON the agent sends for representative specs.

Regenerate after an intended change with NLBFARM_UPDATE_GOLDEN=1 and review the diff.
"""
import json
import os
from pathlib import Path

import pytest
from dataclasses import replace

from nlbfarm.config import AFFINITIES
from nlbfarm.errors import DataPlaneError
from nlbfarm.coordinator.rules import TrafficRule
from nlbfarm.node.dataplane import (
    ALL_AFFINITIES, COUNTER_RULES, DataPlane, DataPlaneSpec, RuleCounter, all_inet_chains, build_counters_list,
    build_fence_write,
    IPV4, IPV6, build_ruleset, build_teardown, cluster_mac_for, counter_name, nd_checksum_delta, parse_counters,
    vips_of)

GOLDEN = Path(__file__).parent / "golden"

BASE = DataPlaneSpec(interface="eth0", vips=("198.18.0.100",), cluster_mac=cluster_mac_for("198.18.0.100"),
                     buckets=4096, seed=0x1234ABCD, fence_timeout=1)

CASES = {
    "owner_fence_open": replace(BASE, accepting=((0, 1364), (4000, 4000)), fence_open=True),
    "no_buckets_fence_open": replace(BASE, fence_open=True),
    "fence_closed_two_vips": replace(BASE, vips=("198.18.0.100", "198.18.0.101"), accepting=((0, 63),),
                                     fence_open=False),
    # After a rebalance: serves 0-1023 (of which 1000-1023 came from a peer
    # that still drains them) and drains 2048-2100, which it gave away.
    "handover_draining_and_guarded": replace(BASE, accepting=((0, 1023),), draining=((2048, 2100),),
                                             guarded=((1000, 1023),), fence_open=True),
    # Per-VIP counters through a map in every counted rule.
    "handover_two_vips": replace(BASE, vips=("198.18.0.100", "198.18.0.101"), accepting=((0, 1023),),
                                 draining=((2048, 2100),), guarded=((1000, 1023),), fence_open=True),
    # Port rules with every affinity on two VIPs; unmatched traffic to the owner of bucket 0.
    "rules_two_vips_one_node": replace(
        BASE, vips=("198.18.0.100", "198.18.0.101"), unmatched="one-node", fence_open=True,
        accepting=((0, 1023),), draining=((2048, 2100),), guarded=((1000, 1023),),
        rules=(TrafficRule("198.18.0.100", ("tcp",), 80, 80, "client"),
               TrafficRule("198.18.0.100", ("udp",), 5000, 5100, "none"),
               TrafficRule("198.18.0.101", ("tcp", "udp"), 1, 65535, "network"))),
    # Bucket 0 is draining here: unmatched TCP keeps its old connections, new ones go elsewhere.
    "rules_bucket0_draining": replace(
        BASE, unmatched="one-node", fence_open=True, accepting=((1, 100),), draining=((0, 0),),
        rules=(TrafficRule("198.18.0.100", ("tcp",), 443, 443, "none"),)),
    # The cluster MAC is a flooded unicast MAC: an ingress hook relabels its frames.
    "unicast_flood": replace(BASE, cluster_mac=cluster_mac_for("198.18.0.100", "unicast-flood"),
                             mac_mode="unicast-flood", accepting=((0, 2047),), fence_open=True),
    # IPv6: ip6 hashes (the /64 for network), ICMPv6 errors and neighbour
    # discovery for every node, and the checksum-neutral ND rewrite.
    "ipv6_rules_handover": replace(
        BASE, vips=("2001:db8::100",), cluster_mac=cluster_mac_for("2001:db8::100"), node_mac="02:00:00:00:00:0b",
        fence_open=True, accepting=((0, 1023),), draining=((2048, 2100),), guarded=((1000, 1023),),
        rules=(TrafficRule("2001:db8::100", ("tcp",), 80, 80, "client"),
               TrafficRule("2001:db8::100", ("udp",), 5300, 5300, "none"),
               TrafficRule("2001:db8::100", ("tcp",), 8000, 8100, "network"))),
    # One IPv4 and two IPv6 VIPs: per-family chains, the ARP rewrite for IPv4 only.
    "dual_stack_one_node": replace(
        BASE, vips=("198.18.0.100", "2001:db8::100", "2001:db8::101"), node_mac="02:00:00:00:00:0b",
        unmatched="one-node", fence_open=True, accepting=((0, 63),), draining=((64, 64),)),
}

IPV6_CASES = ("ipv6_rules_handover", "dual_stack_one_node")


def _check(name, cmds):
    path = GOLDEN / f"{name}.json"
    text = json.dumps(cmds, indent=1, sort_keys=True) + "\n"
    if os.environ.get("NLBFARM_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with NLBFARM_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name}: rendered rules differ from {path}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_ruleset_golden(name):
    _check(name, build_ruleset(CASES[name]))


def test_fence_write_golden():
    _check("fence_write", build_fence_write(CASES["owner_fence_open"], 350))


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_chain_a_ruleset_creates_is_one_the_in_place_rebuild_deletes(name):
    # A chain missing from all_inet_chains() would survive the rebuild with its rules flushed
    # and make the next transaction fail on "add chain" of a base chain already there.
    assert set(_chains_after(build_ruleset(CASES[name]))) <= set(all_inet_chains())


def _chains_after(cmds) -> list[str]:
    """The inet chains the transaction leaves (the rebuild adds and deletes every known one first)."""
    out: list[str] = []
    for c in cmds:
        for verb, body in c.items():
            ch = body.get("chain")
            if ch is None or ch["family"] != "inet":
                continue
            if verb == "add" and ch["name"] not in out:
                out.append(ch["name"])
            elif verb == "delete" and ch["name"] in out:
                out.remove(ch["name"])
    return out


def test_chain_universe_knows_every_affinity_the_config_accepts():
    assert set(ALL_AFFINITIES) == set(AFFINITIES)


def test_regression_ruleset_apply_keeps_an_open_fence_element_and_closes_a_closed_one():
    # The whole-table replace dropped the fence element, which the JSON API
    # cannot write back with a millisecond expiry in the same transaction.
    def fence_cmds(cmds):
        return [verb for c in cmds for verb, body in c.items() if "element" in body]

    open_spec = CASES["owner_fence_open"]
    assert fence_cmds(build_ruleset(open_spec)) == []
    assert fence_cmds(build_ruleset(replace(open_spec, fence_open=False))) == ["add", "delete"]
    inet_tables = [c for c in build_ruleset(open_spec) if "table" in next(iter(c.values()))
                   and next(iter(c.values()))["table"]["family"] == "inet"]
    assert [next(iter(c)) for c in inet_tables] == ["add", "flush"]  # never a delete of the table


def test_counters_of_vips_no_longer_configured_are_deleted():
    cmds = build_ruleset(BASE, previous_vips=("198.18.0.7",))
    deleted = {c["delete"]["counter"]["name"] for c in cmds if "counter" in c.get("delete", {})}
    assert counter_name("198.18.0.7", "accepted") in deleted
    declared_after = {c["add"]["counter"]["name"] for c in cmds if "counter" in c.get("add", {})}
    assert declared_after >= {counter_name("198.18.0.100", r) for r in COUNTER_RULES}


def test_teardown_golden():
    _check("teardown", build_teardown("nlbfarm"))


def test_counters_list_golden():
    _check("counters_list", build_counters_list("nlbfarm"))


def test_one_transaction_replaces_our_tables_and_nothing_else():
    cmds = build_ruleset(CASES["owner_fence_open"])
    tables = {(c[v]["table"]["family"], c[v]["table"]["name"]) for c in cmds for v in c if "table" in c[v]}
    # netdev is replaced empty in multicast mode, so a switch of mac_mode leaves nothing behind.
    assert tables == {("arp", "nlbfarm"), ("inet", "nlbfarm"), ("netdev", "nlbfarm")}
    for c in cmds:
        (verb, obj), = c.items()
        (_kind, body), = obj.items()
        assert body.get("table", body.get("name")) == "nlbfarm"


def test_filter_runs_before_conntrack():
    cmds = build_ruleset(CASES["owner_fence_open"])
    chains = [c["add"]["chain"] for c in cmds if "add" in c and "chain" in c["add"] and "hook" in c["add"]["chain"]]
    pre = next(ch for ch in chains if ch["hook"] == "prerouting")
    assert pre["prio"] < -200  # conntrack sits at -200


def test_cluster_mac_is_multicast_and_derived_from_vip():
    assert cluster_mac_for("198.18.0.100") == "03:bf:c6:12:00:64"
    assert int(cluster_mac_for("10.0.0.1")[:2], 16) & 1


def test_spec_equality_drives_idempotence():
    a = BASE.with_buckets([(0, 10)])
    b = BASE.with_buckets([(0, 10)])
    assert a == b and build_ruleset(a) == build_ruleset(b)


# --- per-VIP counters -------------------------------------------------------

def _counter_refs(cmds):
    """(chain, counter statement) for every counted rule."""
    return [(c["add"]["rule"]["chain"], e["counter"]) for c in cmds if "rule" in c.get("add", {})
            for e in c["add"]["rule"]["expr"] if "counter" in e]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_counted_rule_uses_declared_per_vip_counters(name):
    spec = CASES[name]
    cmds = build_ruleset(spec)
    declared = {c["add"]["counter"]["name"] for c in cmds if "counter" in c.get("add", {})}
    assert declared == {counter_name(v, r) for v in spec.vips for r in COUNTER_RULES}
    refs = _counter_refs(cmds)
    assert refs, "no counted rule"
    for chain, ref in refs:
        # IPv6 chains are vip6_in, pick6_none...: they count the IPv6 VIPs only.
        fam = IPV6 if chain.split("_")[0].endswith("6") else IPV4
        if isinstance(ref, str):  # one VIP of the family: a plain named counter
            assert len(vips_of(spec, fam)) == 1 and ref in declared
            continue
        # Several VIPs: the map must hit for every packet that reaches the
        # counted chains, i.e. its keys are exactly the VIPs of the jump rules.
        m = ref["map"]
        assert m["key"] == {"payload": {"protocol": fam.ip, "field": "daddr"}}
        pairs = m["data"]["set"]
        assert [vip for vip, _ in pairs] == vips_of(spec, fam)
        rules = [r for r in COUNTER_RULES if all(n == counter_name(vip, r) for vip, n in pairs)]
        assert len(rules) == 1, pairs  # one rule's counters, one per VIP


def test_counted_rules_by_chain():
    spec = CASES["handover_draining_and_guarded"]
    vip = spec.vips[0]
    by_chain = [(chain, ref) for chain, ref in _counter_refs(build_ruleset(spec))]
    assert by_chain == [("vip_in", counter_name(vip, "dropped_fenced")),
                        ("vip_in", counter_name(vip, "accepted")),  # ICMP echo, by client address
                        ("vip_in", counter_name(vip, "dropped_foreign")),  # another node's echo
                        ("vip_in", counter_name(vip, "dropped_unmatched")),
                        ("pick_none", counter_name(vip, "accepted")),
                        ("pick_none", counter_name(vip, "dropped_foreign")),
                        ("drain_in", counter_name(vip, "dropped_draining_syn")),
                        ("drain_in", counter_name(vip, "draining")),
                        ("ct_none", counter_name(vip, "dropped_draining_unknown")),
                        ("ct_none", counter_name(vip, "dropped_guarded"))]


def test_a_counter_sits_just_before_its_rule_verdict():
    """Counting happens only once all of a rule's matches held: it changes no verdict."""
    for name, spec in CASES.items():
        rules = [c["add"]["rule"] for c in build_ruleset(spec) if "rule" in c.get("add", {})]
        for chain, kinds in [(r["chain"], [next(iter(e)) for e in r["expr"]]) for r in rules]:
            assert kinds.count("counter") <= 1
            if "counter" in kinds:
                assert kinds.index("counter") == len(kinds) - 2, (name, chain, kinds)  # just before the verdict
                assert kinds[-1] in ("accept", "drop"), (name, chain, kinds)


# A trimmed `nft -j list table inet nlbfarm` of the two-VIP handover spec
# (nft 1.0.6): counter objects come with handles and values, rules and sets
# in between; another table's counter of the same name must be ignored.
CANNED_LISTING = {"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "nlbfarm", "handle": 7}},
    {"set": {"family": "inet", "name": "fence", "table": "nlbfarm", "type": "ifname", "handle": 1,
             "flags": ["timeout"], "elem": [{"elem": {"val": "eth0", "timeout": 1, "expires": 0}}]}},
    {"counter": {"family": "inet", "name": "accepted_198_18_0_100", "table": "nlbfarm", "handle": 2,
                 "packets": 120, "bytes": 9600}},
    {"counter": {"family": "inet", "name": "draining_198_18_0_100", "table": "nlbfarm", "handle": 3,
                 "packets": 4, "bytes": 208}},
    {"counter": {"family": "inet", "name": "dropped_fenced_198_18_0_100", "table": "nlbfarm", "handle": 4,
                 "packets": 0, "bytes": 0}},
    {"counter": {"family": "inet", "name": "dropped_foreign_198_18_0_100", "table": "nlbfarm", "handle": 5,
                 "packets": 241, "bytes": 19280}},
    {"counter": {"family": "inet", "name": "dropped_draining_syn_198_18_0_100", "table": "nlbfarm",
                 "handle": 6, "packets": 1, "bytes": 60}},
    {"counter": {"family": "inet", "name": "dropped_draining_unknown_198_18_0_100", "table": "nlbfarm",
                 "handle": 7, "packets": 0, "bytes": 0}},
    {"counter": {"family": "inet", "name": "dropped_guarded_198_18_0_100", "table": "nlbfarm", "handle": 8,
                 "packets": 2, "bytes": 104}},
    {"counter": {"family": "inet", "name": "accepted_198_18_0_101", "table": "nlbfarm", "handle": 9,
                 "packets": 7, "bytes": 420}},
    {"counter": {"family": "inet", "name": "dropped_foreign_198_18_0_101", "table": "nlbfarm",
                 "handle": 12, "packets": 9, "bytes": 540}},
    {"counter": {"family": "inet", "name": "accepted_198_18_0_101", "table": "other", "handle": 1,
                 "packets": 99999, "bytes": 99999}},
    {"chain": {"family": "inet", "table": "nlbfarm", "name": "vip_in", "handle": 17}},
    {"rule": {"family": "inet", "table": "nlbfarm", "chain": "vip_in", "handle": 30, "expr": [
        {"counter": {"map": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": {"set": [
            ["198.18.0.100", "dropped_foreign_198_18_0_100"],
            ["198.18.0.101", "dropped_foreign_198_18_0_101"]]}}}},
        {"drop": None}]}},
]}


def test_parse_counters_from_a_canned_listing():
    spec = CASES["handover_two_vips"]
    got = parse_counters(CANNED_LISTING, spec)
    assert len(got) == 2 * len(COUNTER_RULES)
    assert got == sorted(got, key=lambda c: (c.vip, c.rule))
    by = {(c.vip, c.rule): (c.packets, c.bytes) for c in got}
    assert by[("198.18.0.100", "accepted")] == (120, 9600)
    assert by[("198.18.0.100", "draining")] == (4, 208)
    assert by[("198.18.0.100", "dropped_foreign")] == (241, 19280)
    assert by[("198.18.0.100", "dropped_draining_syn")] == (1, 60)
    assert by[("198.18.0.100", "dropped_guarded")] == (2, 104)
    assert by[("198.18.0.101", "accepted")] == (7, 420)  # not the other table's
    assert by[("198.18.0.101", "dropped_foreign")] == (9, 540)
    assert by[("198.18.0.101", "dropped_fenced")] == (0, 0)  # missing from the listing
    assert got[0] == RuleCounter("198.18.0.100", "accepted", 120, 9600)


def test_parse_counters_only_reports_the_spec_vips():
    spec = replace(CASES["handover_two_vips"], vips=("198.18.0.101",))
    assert {c.vip for c in parse_counters(CANNED_LISTING, spec)} == {"198.18.0.101"}
    assert parse_counters({"nftables": []}, spec) == [RuleCounter("198.18.0.101", r, 0, 0)
                                                      for r in sorted(COUNTER_RULES)]
    assert parse_counters("", spec)[0].packets == 0  # libnftables returns "" for no output


class FakeNft:
    """The libnftables JSON API, reduced to one table's counter objects."""

    def __init__(self):
        self.counters = {}   # name -> [packets, bytes]
        self.table = False
        self.fail_listing = False
        self.refuse_next = False

    def hit(self, name, packets, nbytes):
        self.counters[name][0] += packets
        self.counters[name][1] += nbytes

    def json_cmd(self, doc):
        cmds = doc["nftables"]
        if "list" in cmds[0]:
            if self.fail_listing or not self.table:
                return 1, "", "Error: No such file or directory"
            return 0, {"nftables": [{"counter": {"family": "inet", "table": "nlbfarm", "name": n,
                                                 "packets": p, "bytes": b}}
                                    for n, (p, b) in self.counters.items()]}, ""
        if self.refuse_next:
            self.refuse_next = False
            return 1, "", "Error: refused"
        for c in cmds:  # in order, as the kernel's transaction
            if "table" in c.get("delete", {}) and c["delete"]["table"]["family"] == "inet":
                self.counters, self.table = {}, False   # teardown: counters go
            elif "counter" in c.get("delete", {}):
                self.counters.pop(c["delete"]["counter"]["name"], None)
            elif "counter" in c.get("add", {}):
                self.counters.setdefault(c["add"]["counter"]["name"], [0, 0])  # an existing one keeps its count
                self.table = True
        return 0, "", ""

    def cmd(self, text):  # the text fence write
        return 0, "", ""


def _values(dp):
    return {(c.vip, c.rule): (c.packets, c.bytes) for c in dp.counters()}


def test_counters_stay_monotonic_across_replace_refusal_and_flush():
    fake = FakeNft()
    dp = DataPlane(_nft=fake)
    assert dp.counters() == []
    spec = CASES["owner_fence_open"]
    vip = spec.vips[0]
    acc = ("198.18.0.100", "accepted")
    assert dp.apply(spec)
    fake.hit(counter_name(vip, "accepted"), 10, 1000)
    assert _values(dp)[acc] == (10, 1000)
    # A replace resets the kernel counters; the base carries them.
    assert dp.apply(spec.with_buckets([(0, 10)]))
    assert fake.counters[counter_name(vip, "accepted")] == [0, 0]
    assert _values(dp)[acc] == (10, 1000)
    fake.hit(counter_name(vip, "accepted"), 5, 500)
    assert _values(dp)[acc] == (15, 1500)
    # A refused replace resets nothing and adds nothing.
    fake.refuse_next = True
    with pytest.raises(DataPlaneError):
        dp.apply(spec.with_buckets([(0, 20)]))
    assert _values(dp)[acc] == (15, 1500)
    # The pre-read fails (table flushed): apply still works, nothing reported goes back.
    fake.hit(counter_name(vip, "accepted"), 1, 100)
    assert _values(dp)[acc] == (16, 1600)
    fake.fail_listing = True
    assert dp.apply(spec.with_buckets([(0, 30)]))
    fake.fail_listing = False
    assert _values(dp)[acc] == (16, 1600)
    fake.hit(counter_name(vip, "dropped_foreign"), 3, 300)
    v = _values(dp)
    assert v[acc] == (16, 1600) and v[(vip, "dropped_foreign")] == (3, 300)
    # counters() reports the kernel's failure.
    fake.fail_listing = True
    with pytest.raises(DataPlaneError):
        dp.counters()
    fake.fail_listing = False
    # teardown starts over.
    dp.teardown()
    assert dp.counters() == []
    assert dp.apply(spec)
    assert set(_values(dp).values()) == {(0, 0)}


def _ones_sum(data: bytes) -> int:
    s = 0
    for i in range(0, len(data), 2):
        s += int.from_bytes(data[i:i + 2], "big")
        s = (s & 0xFFFF) + (s >> 16)
    return s


@pytest.mark.parametrize("node_mac,cluster_mac", [
    ("02:00:00:00:00:0b", "03:bf:00:00:01:00"),
    ("ba:eb:66:88:3a:c5", "03:bf:c6:12:00:64"),
    ("00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"),
    ("03:bf:c6:12:00:64", "03:bf:c6:12:00:64"),
])
def test_nd_checksum_delta_keeps_the_message_sum(node_mac, cluster_mac):
    """The rewritten advert (cluster MAC + delta in the reserved bits) sums like the original."""
    def advert(mac: str, reserved_low: int) -> bytes:
        return (bytes([136, 0, 0, 0, 0x20, 0]) + reserved_low.to_bytes(2, "big") + bytes(range(16))
                + bytes([2, 1]) + bytes(int(x, 16) for x in mac.split(":")))
    before = _ones_sum(advert(node_mac, 0))
    after = _ones_sum(advert(cluster_mac, nd_checksum_delta(node_mac, cluster_mac)))
    # ones' complement: 0x0000 and 0xffff are both zero
    assert before % 0xFFFF == after % 0xFFFF


def test_ipv6_vips_need_the_node_mac():
    with pytest.raises(ValueError, match="node_mac"):
        build_ruleset(replace(CASES["ipv6_rules_handover"], node_mac=""))


def test_ipv4_only_spec_has_no_ipv6_chains():
    names = _chains_after(build_ruleset(CASES["rules_two_vips_one_node"]))
    assert not [n for n in names if "6" in n or n == "nd_out"]


def _hooked_chains(cmds):
    return {c["add"]["chain"]["name"]: c["add"]["chain"] for c in cmds
            if "add" in c and "chain" in c["add"] and "hook" in c["add"]["chain"]}


def _has_ct_expression(cmds):
    return any(isinstance(e, dict) and "ct" in e.get("match", {}).get("left", {})
               for c in cmds if "add" in c and "rule" in c["add"] for e in c["add"]["rule"]["expr"])


def test_steady_state_has_no_hook_after_conntrack_but_keeps_conntrack_on():
    """No bucket drains or is guarded: every verdict falls before conntrack, so there is
    no post-conntrack hook; a ct expression stays in the table so conntrack keeps tracking."""
    steady = build_ruleset(CASES["owner_fence_open"])
    assert "postct" not in _hooked_chains(steady)
    assert _has_ct_expression(steady)
    handover = build_ruleset(CASES["handover_draining_and_guarded"])
    assert _hooked_chains(handover)["postct"]["prio"] > -200  # after conntrack
