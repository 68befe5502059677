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
