"""The hand-written LeaseKeepAlive codec against etcd's generated protobuf classes."""
from __future__ import annotations

import pytest

from nlbfarm.coordinator.etcd._lib import etcdrpc
from nlbfarm.coordinator.etcd.keepalive import decode_response, encode_request

LEASE_IDS = [0, 1, 127, 128, 300, 0x694D8A2B1C3F0012, 2 ** 63 - 1]


@pytest.mark.parametrize("lease_id", LEASE_IDS)
def test_request_bytes_are_what_protobuf_writes(lease_id):
    assert encode_request(lease_id) == etcdrpc.LeaseKeepAliveRequest(ID=lease_id).SerializeToString()


@pytest.mark.parametrize("lease_id", LEASE_IDS)
@pytest.mark.parametrize("ttl", [0, -1, 1, 3, 30, 2 ** 40])
def test_response_decodes_as_protobuf_reads_it(lease_id, ttl):
    header = etcdrpc.ResponseHeader(cluster_id=0xCDF818194E3A8C32, member_id=0x8E9E05C52164694D,
                                    revision=123456789, raft_term=7)
    raw = etcdrpc.LeaseKeepAliveResponse(header=header, ID=lease_id, TTL=ttl).SerializeToString()
    assert decode_response(raw) == (lease_id, ttl)


def test_unknown_fields_are_skipped():
    raw = etcdrpc.LeaseKeepAliveResponse(ID=5, TTL=3).SerializeToString()
    # field 9, varint; field 10, fixed64; field 11, fixed32; field 12, bytes
    extra = b"\x48\x01" + b"\x51" + bytes(8) + b"\x5d" + bytes(4) + b"\x62\x02ab"
    assert decode_response(extra + raw) == (5, 3)


@pytest.mark.parametrize("raw", [b"\x10", b"\x10\xff", b"\x0a\x05ab", b"\x13", b"\x10" + b"\xff" * 11,
                                 b"\x00" * 5000])
def test_malformed_answers_raise(raw):
    with pytest.raises(ValueError):
        decode_response(raw)
