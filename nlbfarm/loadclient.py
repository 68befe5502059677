"""A bounded HTTP client for labs: opens new connections to the VIP and records who answered.

Every run is bounded by ``--count`` connections and ``--duration`` seconds and
stops by itself. Each connection is written as one JSON line:
``{"t": start, "port": local_port, "node": "n1" | null, "error": null | "...", "ms": latency}``.
The local port is bound before connecting so a failed attempt is still attributable.
IPv4 or IPv6 follows ``--vip``; ``--sources`` must then be of the same family.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import threading
import time


_ANY = ("0.0.0.0", "::")


def ip_version(addr: str) -> int | None:
    """4 or 6 for an IP literal, None for anything else (a host name keeps the IPv4 behaviour)."""
    try:
        return ipaddress.ip_address(addr).version
    except ValueError:
        return None


def one_request(vip: str, port: int, timeout: float, source: str | None = None) -> dict:
    t0 = time.time()
    v6 = ip_version(vip) == 6
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    rec = {"t": t0, "port": 0, "node": None, "error": None, "ms": 0.0}
    if source is None or source in _ANY:
        source = "::" if v6 else "0.0.0.0"
    else:
        rec["src"] = source
    try:
        s.bind((source, 0))
        rec["port"] = s.getsockname()[1]
        s.connect((vip, port))
        host = f"[{vip}]" if v6 else vip
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            rec["error"] = "bad response: " + head[:40].decode(errors="replace")
        else:
            rec["node"] = body.decode().strip()
    except OSError as exc:
        rec["error"] = type(exc).__name__ + (f": {exc.strerror}" if getattr(exc, "strerror", None) else "")
    finally:
        s.close()
        rec["ms"] = round((time.time() - t0) * 1000, 2)
    return rec


def run(vip: str, port: int, count: int, duration: float, interval: float, workers: int,
        timeout: float, out, stop: threading.Event | None = None, sources: list[str] | None = None) -> list[dict]:
    sources = sources or [None]
    stop = stop or threading.Event()
    deadline = time.monotonic() + duration
    lock = threading.Lock()
    issued = [0]
    results: list[dict] = []

    def worker():
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if issued[0] >= count:
                    return
                issued[0] += 1
                source = sources[issued[0] % len(sources)]
            rec = one_request(vip, port, timeout, source)
            with lock:
                results.append(rec)
                if out is not None:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
            if interval:
                time.sleep(interval)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + timeout + 5)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nlbfarm-loadclient")
    ap.add_argument("--vip", required=True)
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--count", type=int, default=1000, help="at most this many connections")
    ap.add_argument("--duration", type=float, default=30.0, help="stop after this many seconds")
    ap.add_argument("--interval", type=float, default=0.0, help="pause per worker between connections")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1.0, help="connect/read timeout per connection")
    ap.add_argument("--out", help="JSON lines file (default: stdout)")
    ap.add_argument("--sources", help="comma-separated client addresses to connect from, in turn")
    args = ap.parse_args(argv)
    if not 0 < args.count <= 1_000_000 or not 0 < args.duration <= 3600:
        ap.error("--count must be 1..1000000 and --duration 0..3600 s")
    vip_version = ip_version(args.vip)
    for src in args.sources.split(",") if args.sources and vip_version else []:
        if ip_version(src) not in (None, vip_version):
            ap.error(f"--sources: {src} is an IPv{ip_version(src)} address but --vip {args.vip} is IPv{vip_version}")
    out = open(args.out, "a", buffering=1) if args.out else sys.stdout
    stop = threading.Event()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    res = run(args.vip, args.port, args.count, args.duration, args.interval, args.workers,
              args.timeout, out, stop, args.sources.split(",") if args.sources else None)
    failed = sum(1 for r in res if r["error"])
    print(f"loadclient: {len(res)} connections, {failed} failed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
