"""One long-lived LeaseKeepAlive stream per etcd client.

python-etcd3's ``refresh_lease`` opens a new bidirectional stream for every
keepalive (it iterates over a one-item list). At a keepalive every 0.5 s for
two leases that is four stream set-ups and tear-downs a second, and most of
an idle agent's CPU. This stream stays open; each refresh sends one request
per lease and waits for the answers.

The rule that keeps the fence arithmetic sound: an answer that does not come
within the deadline is a failed keepalive, and the stream is thrown away (it
is re-opened on the next refresh). So an answer always belongs to the round
that is waiting for it: a late answer of an earlier round can only arrive on
a stream nobody reads any more.

The two messages are tiny and stable (etcd's v3 API): ``LeaseKeepAliveRequest
{int64 ID = 1}`` and ``LeaseKeepAliveResponse {ResponseHeader header = 1;
int64 ID = 2; int64 TTL = 3}``. They are encoded here by hand: python-etcd3's
generated classes need the pure-Python protobuf runtime, which costs more
than the rest of a keepalive. ``tests/unit/test_keepalive_codec.py`` checks
the codec against those generated classes.
"""
from __future__ import annotations

import queue
import threading
import time

_END = object()  # ends the request iterator: the stream half-closes
_METHOD = "/etcdserverpb.Lease/LeaseKeepAlive"
_MAX_RESPONSE = 4096  # a keepalive answer is a few dozen bytes; refuse anything odd


class KeepAliveTimeout(Exception):
    """No answer within the deadline: the keepalive failed, the stream is dropped."""


class KeepAliveStreamEnded(Exception):
    """etcd (or the channel) ended the stream without an error status."""


# ---- the codec -----------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 on the wire: two's complement, ten bytes when negative
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint in a keepalive answer")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7


def _int64(n: int) -> int:
    n &= (1 << 64) - 1
    return n - (1 << 64) if n >> 63 else n


def encode_request(lease_id: int) -> bytes:
    """``LeaseKeepAliveRequest(ID=lease_id).SerializeToString()``."""
    return b"\x08" + _varint(lease_id) if lease_id else b""


def decode_response(raw: bytes) -> tuple[int, int]:
    """``(ID, TTL)`` of a serialized ``LeaseKeepAliveResponse``; other fields are skipped."""
    if len(raw) > _MAX_RESPONSE:
        raise ValueError(f"keepalive answer of {len(raw)} bytes")
    lease_id = ttl = 0
    pos = 0
    while pos < len(raw):
        key, pos = _read_varint(raw, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(raw, pos)
            if field == 2:
                lease_id = _int64(value)
            elif field == 3:
                ttl = _int64(value)
        elif wire == 2:
            length, pos = _read_varint(raw, pos)
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected wire type {wire} in a keepalive answer")
        if pos > len(raw):
            raise ValueError("truncated keepalive answer")
    return lease_id, ttl


# ---- the stream ------------------------------------------------------------------

class KeepAliveStream:
    """A LeaseKeepAlive stream on one python-etcd3 client's channel.

    One round at a time (the caller holds the store's keepalive lock), read
    by the caller itself: no thread waits on the stream between rounds (a
    thread blocked on a gRPC stream polls). A watchdog thread, asleep unless
    a round is in flight, cancels the call when the answers are late. Any
    failure leaves the stream ``broken``: the owner opens a new one.
    """

    def __init__(self, client, metadata=None):
        self.client = client
        self.broken = False
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        call = client.channel.stream_stream(_METHOD, request_serializer=encode_request,
                                            response_deserializer=decode_response)
        self._call = call(iter(self._requests.get, _END), metadata=metadata)
        self._cv = threading.Condition()
        self._deadline: float | None = None  # of the round in flight
        self._late = False
        threading.Thread(target=self._watchdog, name="etcd-keepalive-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        with self._cv:
            while not self.broken:
                if self._deadline is None:
                    self._cv.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                self._late, self._deadline = True, None
                self._call.cancel()

    def refresh(self, lease_ids, timeout: float) -> dict[int, int]:
        """Send one keepalive per lease; their TTLs (<= 0: the lease is gone) by lease id."""
        if self.broken:
            raise KeepAliveStreamEnded("keepalive stream already failed")
        wanted = set(lease_ids)
        with self._cv:
            self._deadline = time.monotonic() + timeout
            self._cv.notify()
        try:
            for lease_id in lease_ids:
                self._requests.put(lease_id)
            out: dict[int, int] = {}
            while wanted - out.keys():
                try:
                    lease_id, ttl = next(self._call)
                except StopIteration:
                    raise KeepAliveStreamEnded("etcd ended the keepalive stream") from None
                except Exception:
                    with self._cv:
                        late = self._late
                    if late:
                        raise KeepAliveTimeout(f"no keepalive answer within {timeout:.3f} s") from None
                    raise
                if lease_id in wanted:
                    out[lease_id] = ttl
            with self._cv:
                self._deadline = None
            return out
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with self._cv:
            self.broken = True
            self._deadline = None
            self._cv.notify()
        self._requests.put(_END)
        self._call.cancel()
