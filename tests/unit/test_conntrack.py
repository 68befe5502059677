from nlbfarm.coordinator.hashing import bucket_of, bucket_of_address
from nlbfarm.coordinator.rules import TrafficRule
from nlbfarm.node.conntrack import count_by_bucket, parse_conntrack_lines

SAMPLE = """\
tcp      6 431999 ESTABLISHED src=198.18.0.3 dst=198.18.0.100 sport=40000 dport=80 src=198.18.0.100 dst=198.18.0.3 sport=80 dport=40000 [ASSURED] mark=0 use=1
tcp      6 119 TIME_WAIT src=198.18.0.3 dst=198.18.0.100 sport=40001 dport=80 src=198.18.0.100 dst=198.18.0.3 sport=80 dport=40001 [ASSURED] mark=0 use=1
tcp      6 59 SYN_RECV src=198.18.0.3 dst=198.18.0.100 sport=40002 dport=80 src=198.18.0.100 dst=198.18.0.3 sport=80 dport=40002 mark=0 use=1
udp      17 29 src=198.18.0.3 dst=198.18.0.100 sport=5353 dport=53 [UNREPLIED] src=198.18.0.100 dst=198.18.0.3 sport=53 dport=5353 mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.
"""
ALL = (TrafficRule("198.18.0.100", ("tcp", "udp"), 1, 65535, "none"),)


def test_parse_takes_the_original_direction():
    rows = parse_conntrack_lines(SAMPLE)
    assert rows == [("198.18.0.3", 40000, "198.18.0.100", 80, "ESTABLISHED"),
                    ("198.18.0.3", 40001, "198.18.0.100", 80, "TIME_WAIT"),
                    ("198.18.0.3", 40002, "198.18.0.100", 80, "SYN_RECV")]


def test_only_live_connections_to_a_vip_count():
    rows = parse_conntrack_lines(SAMPLE) + [("198.18.0.3", 1, "198.18.1.9", 80, "ESTABLISHED")]
    counts = count_by_bucket(rows, ["198.18.0.100"], ALL, "drop", 64, 5)
    assert sum(counts.values()) == 2  # TIME_WAIT is over; other destinations are not ours
    assert counts[bucket_of("198.18.0.3", 40000, 64, 5)] >= 1


def test_connections_count_in_their_rule_affinity_bucket():
    rules = (TrafficRule("198.18.0.100", ("tcp",), 80, 80, "client"),)
    rows = [("198.18.0.3", p, "198.18.0.100", 80, "ESTABLISHED") for p in range(40000, 40010)]
    rows.append(("198.18.0.3", 5, "198.18.0.100", 8080, "ESTABLISHED"))  # no rule: dropped, not counted
    vips = ["198.18.0.100"]
    assert count_by_bucket(rows, vips, rules, "drop", 4096, 9) == {bucket_of_address("198.18.0.3", 4096, 9): 10}
    assert count_by_bucket(rows, vips, rules, "one-node", 4096, 9)[0] == 1  # unmatched: bucket 0


def test_a_vip_without_rules_counts_for_bucket_0():
    rules = (TrafficRule("198.18.0.100", ("tcp",), 80, 80, "none"),)
    rows = [("198.18.0.3", 4000, "198.18.0.101", 80, "ESTABLISHED")]
    assert count_by_bucket(rows, ["198.18.0.100", "198.18.0.101"], rules, "one-node", 64, 1) == {0: 1}


def test_ipv6_entries_parse_and_count_by_the_ipv6_hash():
    from nlbfarm.coordinator.hashing import bucket_of6
    from nlbfarm.node.conntrack import count_by_bucket, parse_conntrack_lines
    text = ("tcp      6 431999 ESTABLISHED src=2001:db8:0:0::3 dst=2001:DB8::100 sport=43970 dport=80 "
            "src=2001:db8::100 dst=2001:db8::3 sport=80 dport=43970 [ASSURED] mark=0 use=1\n")
    entries = parse_conntrack_lines(text)
    assert entries == [("2001:db8::3", 43970, "2001:db8::100", 80, "ESTABLISHED")]  # canonical text
    from nlbfarm.coordinator.rules import TrafficRule
    rules = (TrafficRule("2001:db8::100", ("tcp", "udp"), 1, 65535, "none"),)
    counts = count_by_bucket(entries, ["2001:db8::100"], rules, "drop", 4096, 7)
    assert counts == {bucket_of6("2001:db8::3", 43970, 4096, 7): 1}
