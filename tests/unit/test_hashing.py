import pytest

from nlbfarm.coordinator.hashing import bucket_of, jhash_8, reciprocal_scale


def test_bucket_range_and_determinism():
    seen = {bucket_of("198.18.0.3", p, 64, 7) for p in range(1000, 3000)}
    assert seen <= set(range(64)) and len(seen) == 64
    assert bucket_of("198.18.0.3", 40000, 4096, 1) == bucket_of("198.18.0.3", 40000, 4096, 1)


def test_seed_changes_the_mapping():
    a = [bucket_of("198.18.0.3", p, 4096, 1) for p in range(100)]
    b = [bucket_of("198.18.0.3", p, 4096, 2) for p in range(100)]
    assert a != b


def test_reciprocal_scale_is_multiply_shift():
    assert reciprocal_scale(0xFFFFFFFF, 4096) == 4095
    assert reciprocal_scale(0, 4096) == 0


def test_bad_input():
    with pytest.raises(ValueError):
        jhash_8(b"short", 0)
    with pytest.raises(ValueError):
        bucket_of("198.18.0.3", 70000, 64, 0)


def test_jhash_short_lengths():
    from nlbfarm.coordinator.hashing import bucket_of_address, jhash_short
    key = bytes(range(1, 9))
    assert jhash_short(key, 5) == jhash_8(key, 5)
    for bad in (b"", bytes(13)):
        with pytest.raises(ValueError):
            jhash_short(bad, 0)
    assert 0 <= bucket_of_address("198.18.0.3", 4096, 0x1234) < 4096


def test_bucket_of_network_groups_a_24():
    from nlbfarm.coordinator.hashing import bucket_of_address, bucket_of_network, jhash_short, network_hash_payload
    for b, seed in ((4096, 0x1234ABCD), (64, 7)):
        assert bucket_of_network("198.18.80.5", b, seed) == bucket_of_network("198.18.80.250", b, seed)
        assert all(0 <= bucket_of_network(f"198.18.{n}.1", b, seed) < b for n in range(256))
    assert len({bucket_of_network(f"198.18.{n}.1", 4096, 7) for n in range(256)}) > 200
    # the key is the first three octets, 3 bytes long (not a.b.c.0 as 4 bytes)
    assert bucket_of_network("198.18.80.5", 2**32, 7) == jhash_short(bytes([198, 18, 80]), 7)
    assert [bucket_of_network(f"198.18.{n}.9", 4096, 7) for n in range(20)] != \
        [bucket_of_address(f"198.18.{n}.0", 4096, 7) for n in range(20)]
    assert network_hash_payload() == {"payload": {"base": "nh", "offset": 96, "len": 24}}


def test_jhash_bytes_equals_jhash_short_up_to_12_bytes():
    import random

    from nlbfarm.coordinator.hashing import jhash_bytes, jhash_short
    rnd = random.Random(1)
    for n in range(1, 13):
        for _ in range(20):
            key, seed = rnd.randbytes(n), rnd.getrandbits(32)
            assert jhash_bytes(key, seed) == jhash_short(key, seed)
    with pytest.raises(ValueError):
        jhash_bytes(b"", 0)


def test_jhash_bytes_long_keys():
    from nlbfarm.coordinator.hashing import jhash_bytes
    # keys past 12 bytes go through __jhash_mix: every byte and the length matter
    key = bytes(range(1, 21))
    h = jhash_bytes(key, 7)
    assert 0 <= h <= 0xFFFFFFFF
    assert all(jhash_bytes(key[:i] + bytes([key[i] ^ 1]) + key[i + 1:], 7) != h for i in range(20))
    assert jhash_bytes(key + b"\0", 7) != h and jhash_bytes(key[:13], 7) != jhash_bytes(key[:12], 7)
    assert len({jhash_bytes(bytes(n), 0) for n in range(1, 40)}) == 39


def test_bucket_of6_pinned_to_the_kernel():
    """Buckets the kernel computed for these packets (nft counters in a veth namespace pair)."""
    from nlbfarm.coordinator.hashing import bucket_of6, bucket_of_address6, bucket_of_network6
    # jhash ip6 saddr . th sport: 20-byte key (address, port, two zero bytes)
    assert bucket_of6("2001:db8:77::1", 40000, 64, 7) == 20
    assert bucket_of6("2001:db8:77::1", 40000, 4096, 0x1234ABCD) == 2143
    # jhash ip6 saddr: 16 bytes; jhash @nh,64,64: 8 bytes
    assert bucket_of_address6("2001:db8:77::1", 64, 7) == 57
    assert bucket_of_network6("2001:db8:77::1", 64, 7) == 54
    assert bucket_of6("2001:db8:77::1", 40000, 64, 7) == bucket_of6("2001:db8:77:0::1", 40000, 64, 7)
    with pytest.raises(ValueError):
        bucket_of6("2001:db8:77::1", 70000, 64, 0)
    with pytest.raises(ValueError):
        bucket_of6("198.18.0.3", 1000, 64, 0)


def test_bucket_of_network6_groups_a_64():
    from nlbfarm.coordinator.hashing import (bucket_of_address6, bucket_of_network6, jhash_bytes,
                                             network6_hash_payload)
    for b, seed in ((4096, 0x1234ABCD), (64, 7)):
        for net in ("2001:db8:77:0", "2001:db8:77:5", "2001:db8:ffff:ffff"):
            got = {bucket_of_network6(f"{net}:{iid}", b, seed)
                   for iid in (":1", ":5", "ffff:ffff:ffff:ffff", "8000::", "1:2:3:4")}
            assert len(got) == 1 and 0 <= got.pop() < b
    assert len({bucket_of_network6(f"2001:db8:77:{n:x}::1", 4096, 7) for n in range(256)}) > 200
    # the key is the 8-byte /64 prefix (not prefix:: as 16 bytes)
    assert bucket_of_network6("2001:db8:77:5::9", 2**32, 7) == \
        jhash_bytes(bytes.fromhex("20010db800770005"), 7)
    assert [bucket_of_network6(f"2001:db8:77:{n:x}::9", 4096, 7) for n in range(20)] != \
        [bucket_of_address6(f"2001:db8:77:{n:x}::", 4096, 7) for n in range(20)]
    assert network6_hash_payload() == {"payload": {"base": "nh", "offset": 64, "len": 64}}
