"""Port rules: the Python twin of the kernel's rule and affinity choice."""
import pytest

from nlbfarm.config import PortRule
from nlbfarm.coordinator.hashing import bucket_of, bucket_of_address, bucket_of_network
from nlbfarm.coordinator.rules import TrafficRule, bucket_for, match, resolve

V1, V2 = "198.18.0.100", "198.18.0.101"
RULES = resolve((V1, V2), (PortRule(vip=V1, protocol="tcp", ports=80, affinity="client"),
                           PortRule(protocol="udp", ports="5000-5100", affinity="network"),
                           PortRule(vip=V2, protocol="both", ports=443)))


def test_resolve_expands_rules_per_vip_in_order():
    assert RULES == (TrafficRule(V1, ("tcp",), 80, 80, "client"),
                     TrafficRule(V1, ("udp",), 5000, 5100, "network"),
                     TrafficRule(V2, ("udp",), 5000, 5100, "network"),
                     TrafficRule(V2, ("tcp", "udp"), 443, 443, "none"))


@pytest.mark.parametrize("vip, proto, port, want", [
    (V1, "tcp", 80, 0), (V1, "udp", 80, None), (V1, "udp", 5050, 1), (V2, "udp", 5100, 2),
    (V2, "tcp", 443, 3), (V2, "udp", 443, 3), (V1, "tcp", 443, None), (V2, "tcp", 80, None),
])
def test_match(vip, proto, port, want):
    got = match(RULES, vip, proto, port)
    assert got == (None if want is None else RULES[want])


def test_bucket_for_each_affinity_and_unmatched():
    B, S = 4096, 0xABCD
    assert bucket_for(RULES, "drop", V1, "tcp", 80, "198.18.0.3", 40000, B, S) == bucket_of_address("198.18.0.3", B, S)
    assert bucket_for(RULES, "drop", V1, "udp", 5000, "198.18.0.3", 1, B, S) == bucket_of_network("198.18.0.3", B, S)
    assert bucket_for(RULES, "drop", V2, "tcp", 443, "198.18.0.3", 7, B, S) == bucket_of("198.18.0.3", 7, B, S)
    assert bucket_for(RULES, "drop", V1, "tcp", 22, "198.18.0.3", 7, B, S) is None
    assert bucket_for(RULES, "one-node", V1, "tcp", 22, "198.18.0.3", 7, B, S) == 0


def test_affinities_keep_what_they_promise():
    B, S = 4096, 77
    # client: the port does not matter; network: the last address byte does not either
    assert len({bucket_for(RULES, "drop", V1, "tcp", 80, "198.18.0.3", p, B, S) for p in range(1024, 1100)}) == 1
    assert len({bucket_for(RULES, "drop", V1, "udp", 5000, f"198.18.0.{i}", 9, B, S) for i in range(1, 60)}) == 1
    # none spreads
    assert len({bucket_for(RULES, "drop", V2, "tcp", 443, "198.18.0.3", p, B, S) for p in range(1024, 1100)}) > 50


def test_digest_tells_rule_sets_apart_and_ignores_order():
    from nlbfarm.coordinator.rules import digest
    assert digest(RULES, "drop") == digest(tuple(reversed(RULES)), "drop")
    assert digest(RULES, "drop") != digest(RULES, "one-node")
    assert digest(RULES, "drop") != digest(RULES[:-1], "drop")


def test_a_rule_for_every_port_takes_port_0_like_the_kernel_rule():
    every = TrafficRule(V1, ("udp",), 1, 65535, "none")
    assert every.matches(V1, "udp", 0) and not RULES[0].matches(V1, "tcp", 0)


V6 = "2001:db8::100"
B, S = 4096, 0xABCD
RULES6 = resolve((V1, V6), (PortRule(vip=V6, protocol="tcp", ports=80, affinity="client"),
                            PortRule(vip=V6, protocol="udp", ports=53, affinity="none"),
                            PortRule(vip=V6, protocol="tcp", ports=443, affinity="network"),
                            PortRule(vip=V1, protocol="tcp", ports=80, affinity="network")))


@pytest.mark.parametrize("vip,proto,port,client,cport,expected", [
    (V6, "tcp", 80, "2001:db8::3", 40000, ("address6", "2001:db8::3")),
    (V6, "udp", 53, "2001:db8::3", 40000, ("port6", "2001:db8::3", 40000)),
    (V6, "tcp", 443, "2001:db8:0:0:1::3", 1, ("network6", "2001:db8:0:0:1::3")),
    (V1, "tcp", 80, "198.18.0.3", 1, ("network", "198.18.0.3")),
])
def test_ipv6_clients_hash_with_the_ipv6_models(vip, proto, port, client, cport, expected):
    from nlbfarm.coordinator import hashing
    model = {"address6": lambda ip: hashing.bucket_of_address6(ip, B, S),
             "port6": lambda ip, p: hashing.bucket_of6(ip, p, B, S),
             "network6": lambda ip: hashing.bucket_of_network6(ip, B, S),
             "network": lambda ip: hashing.bucket_of_network(ip, B, S)}[expected[0]]
    assert bucket_for(RULES6, "drop", vip, proto, port, client, cport, B, S) == model(*expected[1:])


def test_a_64_lands_together_and_different_64s_spread():
    same = {bucket_for(RULES6, "drop", V6, "tcp", 443, f"2001:db8::{i:x}", 1, B, S) for i in range(1, 200)}
    assert len(same) == 1
    spread = {bucket_for(RULES6, "drop", V6, "tcp", 443, f"2001:db8:0:{i:x}::3", 1, B, S) for i in range(64)}
    assert len(spread) > 50


def test_a_client_of_the_other_family_is_refused():
    with pytest.raises(ValueError, match="same address family"):
        bucket_for(RULES6, "drop", V6, "tcp", 80, "198.18.0.3", 1, B, S)
