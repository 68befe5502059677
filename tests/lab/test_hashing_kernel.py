"""The Python bucket hash against the kernel's jhash, packet by packet."""
import json
import random
import subprocess
import uuid

import pytest

from nlbfarm.coordinator.hashing import (bucket_of, bucket_of6, bucket_of_address, bucket_of_address6,
                                         bucket_of_network, bucket_of_network6)


@pytest.fixture
def pair():
    a, b = f"hsa-{uuid.uuid4().hex[:6]}", f"hsb-{uuid.uuid4().hex[:6]}"
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "link", "add", "h0", "netns", a, "type", "veth", "peer", "name", "h1",
                        "netns", b], check=True)
        subprocess.run(["ip", "-n", a, "addr", "add", "198.18.77.1/24", "dev", "h0"], check=True)
        subprocess.run(["ip", "-n", b, "addr", "add", "198.18.77.2/24", "dev", "h1"], check=True)
        for ns, dev in ((a, "h0"), (b, "h1")):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _load_counted_rules(ns, rules):
    """One prerouting chain (before conntrack) holding these rules, each ending in a counter."""
    text = "\n".join(["table inet h {", "chain p {", "type filter hook prerouting priority -300; policy accept;",
                      *rules, "}", "}"])
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text, text=True, check=True)


def _counters(ns):
    """Packet counts of every counted rule, in rule order."""
    out = json.loads(subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset"],
                                    capture_output=True, text=True, check=True).stdout)
    return [e["counter"]["packets"] for x in out["nftables"] if "rule" in x
            for e in x["rule"]["expr"] if "counter" in e]


@pytest.mark.parametrize("buckets, seed", [(4096, 0x1234ABCD), (64, 0), (65536, 0xFFFFFFFF)])
def test_python_bucket_equals_kernel_jhash(pair, buckets, seed):
    a, b = pair
    ports = random.Random(seed).sample(range(1024, 65535), 40)
    rules = [f"tcp sport {p} jhash ip saddr . th sport mod {buckets} seed {seed:#x} "
             f"{bucket_of('198.18.77.1', p, buckets, seed)} counter" for p in ports]
    _load_counted_rules(b, rules)
    code = ("import socket\n"
            f"for p in {ports!r}:\n"
            "    s = socket.socket(); s.settimeout(0.3); s.bind(('198.18.77.1', p))\n"
            "    try: s.connect(('198.18.77.2', 9))\n"
            "    except OSError: pass\n"
            "    s.close()\n")
    subprocess.run(["ip", "netns", "exec", a, "python3", "-c", code], check=True, timeout=60)
    hits = _counters(b)
    assert len(hits) == len(ports)
    missed = [p for p, h in zip(ports, hits) if h == 0]
    assert missed == [], f"kernel put these ports in other buckets than Python predicted: {missed}"


@pytest.mark.parametrize("buckets, seed", [(4096, 0x1234ABCD), (64, 7)])
def test_python_address_bucket_equals_kernel_jhash(pair, buckets, seed):
    """ICMP echo is hashed on the client address alone (a 4-byte jhash key)."""
    a, b = pair
    clients = [f"198.18.77.{i}" for i in range(10, 30)]
    for c in clients:
        subprocess.run(["ip", "-n", a, "addr", "add", f"{c}/24", "dev", "h0"], check=True)
    rules = [f"ip saddr {c} icmp type echo-request jhash ip saddr mod {buckets} seed {seed:#x} "
             f"{bucket_of_address(c, buckets, seed)} counter" for c in clients]
    _load_counted_rules(b, rules)
    for c in clients:
        subprocess.run(["ip", "netns", "exec", a, "ping", "-n", "-c", "1", "-W", "1", "-I", c, "198.18.77.2"],
                       capture_output=True, timeout=10)
    hits = _counters(b)
    missed = [c for c, h in zip(clients, hits) if h == 0]
    assert len(hits) == len(clients) and missed == [], f"kernel put these clients elsewhere: {missed}"


@pytest.mark.parametrize("buckets, seed", [(4096, 0x1234ABCD), (64, 7)])
def test_python_network_bucket_equals_kernel_jhash(pair, buckets, seed):
    """Network affinity: ``jhash @nh,96,24`` hashes the first three octets (a 3-byte key).

    Clients come from eleven /24s, two per /24. Each also gets a rule for the
    masked form ``jhash ip saddr & 255.255.255.0``, which hashes the 4-byte
    ``a.b.c.0`` instead, so the test tells the two key lengths apart.
    """
    a, b = pair
    nets = ["198.18.77"] + [f"198.18.{n}" for n in range(80, 90)]
    clients = [f"{n}.{h}" for n in nets for h in (5, 77)]
    for n in nets:
        assert bucket_of_network(f"{n}.5", buckets, seed) == bucket_of_network(f"{n}.77", buckets, seed)
    masked = {c: bucket_of_address(c.rsplit(".", 1)[0] + ".0", buckets, seed) for c in clients}
    assert any(masked[c] != bucket_of_network(c, buckets, seed) for c in clients), "test cannot tell 3 from 4 bytes"
    for c in clients:
        subprocess.run(["ip", "-n", a, "addr", "add", f"{c}/16", "dev", "h0"], check=True)
    subprocess.run(["ip", "-n", b, "route", "add", "198.18.0.0/16", "dev", "h1"], check=True)
    rules = []
    for c in clients:
        rules.append(f"ip saddr {c} icmp type echo-request jhash @nh,96,24 mod {buckets} seed {seed:#x} "
                     f"{bucket_of_network(c, buckets, seed)} counter")
        rules.append(f"ip saddr {c} icmp type echo-request jhash ip saddr & 255.255.255.0 mod {buckets} "
                     f"seed {seed:#x} {masked[c]} counter")
    _load_counted_rules(b, rules)
    for c in clients:
        subprocess.run(["ip", "netns", "exec", a, "ping", "-n", "-c", "1", "-W", "1", "-I", c, "198.18.77.2"],
                       capture_output=True, timeout=10)
    hits = _counters(b)
    assert len(hits) == 2 * len(clients)
    missed = [c for c, h in zip(clients, hits[0::2]) if h == 0]
    assert missed == [], f"kernel put these clients in other /24 buckets than Python predicted: {missed}"
    missed = [c for c, h in zip(clients, hits[1::2]) if h == 0]
    assert missed == [], f"masked form: kernel put these clients elsewhere: {missed}"


@pytest.fixture
def pair6(pair):
    """The veth pair with 2001:db8:77::1/64 (client side) and 2001:db8:77::2/64, usable at once."""
    a, b = pair
    subprocess.run(["ip", "-n", a, "addr", "add", "2001:db8:77::1/64", "dev", "h0", "nodad"], check=True)
    subprocess.run(["ip", "-n", b, "addr", "add", "2001:db8:77::2/64", "dev", "h1", "nodad"], check=True)
    return a, b


@pytest.mark.parametrize("buckets, seed", [(4096, 0x1234ABCD), (64, 7)])
def test_python_bucket6_equals_kernel_jhash(pair6, buckets, seed):
    """``jhash ip6 saddr . th sport``: a 20-byte key, so the kernel runs one mix round."""
    a, b = pair6
    clients = ["2001:db8:77::1", "2001:db8:77::a:5", "2001:db8:77:0:ffff:ffff:ffff:fffe", "2001:db8:77::8000:1"]
    for c in clients[1:]:
        subprocess.run(["ip", "-n", a, "addr", "add", f"{c}/64", "dev", "h0", "nodad"], check=True)
    ports = random.Random(seed).sample(range(1024, 65535), 40)
    flows = [(clients[i % len(clients)], p) for i, p in enumerate(ports)]
    rules = [f"ip6 saddr {c} tcp sport {p} jhash ip6 saddr . th sport mod {buckets} seed {seed:#x} "
             f"{bucket_of6(c, p, buckets, seed)} counter" for c, p in flows]
    _load_counted_rules(b, rules)
    code = ("import socket\n"
            f"for c, p in {flows!r}:\n"
            "    s = socket.socket(socket.AF_INET6); s.settimeout(0.3); s.bind((c, p))\n"
            "    try: s.connect(('2001:db8:77::2', 9))\n"
            "    except OSError: pass\n"
            "    s.close()\n")
    subprocess.run(["ip", "netns", "exec", a, "python3", "-c", code], check=True, timeout=60)
    hits = _counters(b)
    assert len(hits) == len(flows)
    missed = [f for f, h in zip(flows, hits) if h == 0]
    assert missed == [], f"kernel put these flows in other buckets than Python predicted: {missed}"


@pytest.mark.parametrize("buckets, seed", [(4096, 0x1234ABCD), (64, 7)])
def test_python_address6_bucket_equals_kernel_jhash(pair6, buckets, seed):
    """ICMPv6 echo is hashed on the client address alone (a 16-byte jhash key)."""
    a, b = pair6
    clients = [f"2001:db8:77::{i:x}" for i in range(16, 36)] + ["2001:db8:77:0:abcd:ef01:2345:6789"]
    for c in clients:
        subprocess.run(["ip", "-n", a, "addr", "add", f"{c}/64", "dev", "h0", "nodad"], check=True)
    rules = [f"ip6 saddr {c} icmpv6 type echo-request jhash ip6 saddr mod {buckets} seed {seed:#x} "
             f"{bucket_of_address6(c, buckets, seed)} counter" for c in clients]
    _load_counted_rules(b, rules)
    for c in clients:
        subprocess.run(["ip", "netns", "exec", a, "ping", "-6", "-n", "-c", "1", "-W", "1", "-I", c,
                        "2001:db8:77::2"], capture_output=True, timeout=10)
    hits = _counters(b)
    missed = [c for c, h in zip(clients, hits) if h == 0]
    assert len(hits) == len(clients) and missed == [], f"kernel put these clients elsewhere: {missed}"


@pytest.mark.parametrize("buckets, seed", [(4096, 0x1234ABCD), (64, 7)])
def test_python_network6_bucket_equals_kernel_jhash(pair6, buckets, seed):
    """Network affinity: ``jhash @nh,64,64`` hashes the client's /64 (an 8-byte key).

    Clients come from eleven /64s of 2001:db8:77::/48, two per /64. Each also
    gets a rule for the masked form ``jhash ip6 saddr & ffff:ffff:ffff:ffff::``,
    which hashes the 16-byte ``prefix::`` instead, so the test tells the two
    key lengths apart.
    """
    import ipaddress
    a, b = pair6
    nets = [f"2001:db8:77:{n:x}" for n in (0, 1, 2, 3, 0x10, 0x77, 0x100, 0xabc, 0xfffe, 0xffff, 0x8000)]
    clients = [f"{n}:{iid}" for n in nets for iid in (":5", "ffff:1:2:77")]
    for n in nets:
        assert bucket_of_network6(f"{n}::5", buckets, seed) == bucket_of_network6(f"{n}:ffff:1:2:77", buckets, seed)
    masked = {c: bucket_of_address6(str(ipaddress.IPv6Network(f"{c}/64", strict=False).network_address),
                                    buckets, seed) for c in clients}
    assert any(masked[c] != bucket_of_network6(c, buckets, seed) for c in clients), "test cannot tell 8 from 16 bytes"
    for c in clients:
        subprocess.run(["ip", "-n", a, "addr", "add", f"{c}/48", "dev", "h0", "nodad"], check=True)
    subprocess.run(["ip", "-n", b, "route", "add", "2001:db8:77::/48", "dev", "h1"], check=True)
    rules = []
    for c in clients:
        rules.append(f"ip6 saddr {c} icmpv6 type echo-request jhash @nh,64,64 mod {buckets} seed {seed:#x} "
                     f"{bucket_of_network6(c, buckets, seed)} counter")
        rules.append(f"ip6 saddr {c} icmpv6 type echo-request jhash ip6 saddr & ffff:ffff:ffff:ffff:: "
                     f"mod {buckets} seed {seed:#x} {masked[c]} counter")
    _load_counted_rules(b, rules)
    for c in clients:
        subprocess.run(["ip", "netns", "exec", a, "ping", "-6", "-n", "-c", "1", "-W", "1", "-I", c,
                        "2001:db8:77::2"], capture_output=True, timeout=10)
    hits = _counters(b)
    assert len(hits) == 2 * len(clients)
    missed = [c for c, h in zip(clients, hits[0::2]) if h == 0]
    assert missed == [], f"kernel put these clients in other /64 buckets than Python predicted: {missed}"
    missed = [c for c, h in zip(clients, hits[1::2]) if h == 0]
    assert missed == [], f"masked form: kernel put these clients elsewhere: {missed}"
