"""A bounded UDP probe for labs: who answers each datagram, and how many answer.

Sends one datagram of ``--size`` bytes from each of ``--count`` sockets (so
from as many source ports) to VIP:PORT, then collects replies for
``--wait`` seconds. Prints JSON: one record per source port with every reply
("<node> <length received>"). A datagram larger than the path MTU leaves the
client in fragments; a whole length in the reply means one node got them all.
IPv4 or IPv6 follows ``--vip``; over IPv6 the sending host fragments too.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import select
import socket
import sys
import time


def _is_v6(vip: str) -> bool:
    """True for an IPv6 literal; anything else (IPv4, a host name) keeps the IPv4 behaviour."""
    try:
        return ipaddress.ip_address(vip).version == 6
    except ValueError:
        return False


def probe(vip: str, port: int, count: int, size: int, wait: float) -> list[dict]:
    v6 = _is_v6(vip)
    socks = []
    try:
        for _ in range(count):
            sk = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sk)
            # Let the kernel fragment: no path-MTU discovery refusal for big datagrams.
            if v6:
                sk.bind(("::", 0))
                sk.setsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_MTU_DISCOVER", 23),
                              getattr(socket, "IPV6_PMTUDISC_DONT", 0))
            else:
                sk.bind(("0.0.0.0", 0))
                sk.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MTU_DISCOVER", 10),
                              getattr(socket, "IP_PMTUDISC_DONT", 0))
            sk.setblocking(False)
        payload = b"x" * size
        for sk in socks:
            sk.sendto(payload, (vip, port))
        replies: dict[int, list[str]] = {sk.getsockname()[1]: [] for sk in socks}
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(socks, [], [], left)
            for sk in ready:
                data, _ = sk.recvfrom(65535)
                replies[sk.getsockname()[1]].append(data.decode().strip())
        return [{"port": p, "replies": r} for p, r in replies.items()]
    finally:
        for sk in socks:
            sk.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nlbfarm-udpprobe")
    ap.add_argument("--vip", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--size", type=int, default=4000)
    ap.add_argument("--wait", type=float, default=2.0)
    a = ap.parse_args(argv)
    if not 1 <= a.count <= 1000 or not 1 <= a.size <= 65000 or not 0 < a.wait <= 30:
        ap.error("count 1..1000, size 1..65000, wait 0..30 s")
    print(json.dumps(probe(a.vip, a.port, a.count, a.size, a.wait)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
