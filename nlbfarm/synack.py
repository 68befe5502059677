"""A bounded TCP handshake capture for labs: who answered each SYN, at the packet level.

Run inside one namespace (the lab's client) on one interface::

    python -m nlbfarm.synack --iface eth0 --duration 60 --max-packets 200000 --out syn.jsonl

It opens an AF_PACKET socket on the interface with a classic BPF filter that
passes only IPv4 TCP segments with SYN set (SYNs and SYN-ACKs), prints
``ready`` on stdout once the filter is attached, and writes one JSON line per
segment: ``{"t", "dir", "src_mac", "dst_mac", "src", "sport", "dst", "dport",
"flags", "seq", "ack"}``, ``t`` being the kernel's receive time, ``dir``
``out`` for a segment this host sent and ``in`` otherwise. It stops after
``--duration`` seconds, ``--max-packets`` segments, or on SIGTERM/SIGINT, and
ends with a summary line on stdout (JSON): segments written and the kernel's drop
count (``PACKET_STATISTICS``), so a reader knows whether the record is whole.
No dependency beyond Python: tcpdump is not needed.

:func:`answers_per_syn` turns the records into "which source MACs answered
this SYN": a SYN is one (client address, client port, initial sequence
number), and a SYN-ACK answers it when its acknowledgement number is that ISN
plus one. Two MACs for one SYN means two nodes accepted the same connection.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import signal
import socket
import struct
import sys
import time
from collections import defaultdict
from pathlib import Path
from nlbfarm.analysis import read_jsonl

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
TCP_SYN, TCP_ACK = 0x02, 0x10


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


# tcpdump's "ip and tcp and (tcp[tcpflags] & tcp-syn != 0)", not fragments.
SYN_FILTER = b"".join([
    _insn(0x28, 0, 0, 12),          # 0  ldh [12]            ethertype
    _insn(0x15, 0, 8, ETH_P_IP),    # 1  jeq #0x800          else drop
    _insn(0x30, 0, 0, 23),          # 2  ldb [23]            IP protocol
    _insn(0x15, 0, 6, 6),           # 3  jeq #6 (TCP)        else drop
    _insn(0x28, 0, 0, 20),          # 4  ldh [20]            flags + fragment offset
    _insn(0x45, 4, 0, 0x1FFF),      # 5  jset #0x1fff        a fragment: drop
    _insn(0xB1, 0, 0, 14),          # 6  ldxb 4*([14]&0xf)   IP header length
    _insn(0x50, 0, 0, 14 + 13),     # 7  ldb [x + 27]        TCP flags
    _insn(0x45, 0, 1, TCP_SYN),     # 8  jset #SYN           accept, else drop
    _insn(0x06, 0, 0, 0x40000),     # 9  ret #262144         accept
    _insn(0x06, 0, 0, 0),           # 10 ret #0              drop
])


def attach_filter(sock: socket.socket, program: bytes = SYN_FILTER) -> None:
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def parse(frame: bytes) -> dict | None:
    """An Ethernet frame -> the TCP handshake fields, or None if it is no IPv4 TCP SYN."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[23] != 6 or len(frame) < 14 + ihl + 20:
        return None
    tcp = 14 + ihl
    sport, dport, seq, ack = struct.unpack_from("!HHII", frame, tcp)
    flags = frame[tcp + 13]
    if not flags & TCP_SYN:
        return None
    return {"dst_mac": _mac(frame[0:6]), "src_mac": _mac(frame[6:12]),
            "src": socket.inet_ntoa(frame[26:30]), "dst": socket.inet_ntoa(frame[30:34]),
            "sport": sport, "dport": dport, "seq": seq, "ack": ack,
            "flags": "SA" if flags & TCP_ACK else "S"}


def capture(iface: str, duration: float, max_packets: int, out, ready=None,
            stop=lambda: False) -> tuple[int, int]:
    """Write SYN and SYN-ACK records to ``out``; returns (written, kernel drops)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        attach_filter(s)
        s.bind((iface, ETH_P_ALL))
        s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)  # reading resets the counters
        if ready is not None:
            ready()
        s.settimeout(0.2)
        deadline = time.monotonic() + duration
        written = 0
        while written < max_packets and time.monotonic() < deadline and not stop():
            try:
                frame, anc, _flags, addr = s.recvmsg(256, socket.CMSG_SPACE(16))
            except socket.timeout:
                continue
            except InterruptedError:
                continue
            t = time.time()
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(data) >= 16:
                    sec, nsec = struct.unpack_from("qq", data)
                    t = sec + nsec / 1e9
            rec = parse(frame)
            if rec is None:
                continue
            rec = {"t": round(t, 6), "dir": "out" if addr[2] == PACKET_OUTGOING else "in", **rec}
            out.write(json.dumps(rec) + "\n")
            written += 1
        _packets, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        return written, drops
    finally:
        s.close()


def read_records(path: str | Path) -> list[dict]:
    return read_jsonl(path)


def answers_per_syn(records: list[dict], vip: str, port: int) -> tuple[dict, dict]:
    """(SYNs, answers) of the client's handshakes with ``vip:port``.

    SYNs: (client ip, client port, ISN) -> kernel times the client sent it
    (retransmissions included). Answers: the same key -> {source MAC: times of
    SYN-ACKs from it}.
    """
    syns: dict[tuple, list[float]] = defaultdict(list)
    answers: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["flags"] == "S" and r["dst"] == vip and r["dport"] == port and r["dir"] == "out":
            syns[(r["src"], r["sport"], r["seq"])].append(r["t"])
        elif r["flags"] == "SA" and r["src"] == vip and r["sport"] == port and r["dir"] == "in":
            answers[(r["dst"], r["dport"], (r["ack"] - 1) % (1 << 32))][r["src_mac"]].append(r["t"])
    return dict(syns), {k: dict(v) for k, v in answers.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nlbfarm-synack")
    ap.add_argument("--iface", default="eth0")
    ap.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    ap.add_argument("--max-packets", type=int, default=200_000, help="stop after this many segments")
    ap.add_argument("--out", required=True, help="JSON lines file")
    args = ap.parse_args(argv)
    if not 0 < args.duration <= 3600 or not 0 < args.max_packets <= 10_000_000:
        ap.error("--duration must be 0..3600 s and --max-packets 1..10000000")
    stopping = [False]

    def on_signal(*_):
        stopping[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(args.out, "w", buffering=1 << 16) as out:
        written, drops = capture(args.iface, args.duration, args.max_packets, out,
                                 ready=lambda: print("ready", flush=True), stop=lambda: stopping[0])
    print(json.dumps({"written": written, "drops": drops}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
