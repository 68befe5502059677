"""Long-lived connections for fault tests: bounded, and they stop by themselves.

Keeps ``--conns`` connections open to the VIP at all times until ``--duration``
is over. Each connection says ``HOLD``, then sends ``PING n`` every ``--period``
seconds for ``--lifetime`` seconds and expects ``PONG n <node>`` back from the
same node, then closes cleanly and is replaced by a new one. A connection is
*broken* if it is reset, times out, or gets an answer from another node.
Results go to ``--out`` as one JSON line per connection:
``{"t0", "t1", "node", "ok", "error", "pings"}``.
IPv4 or IPv6 follows ``--vip``.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import socket
import sys
import time


def vip_family(vip: str) -> int:
    """AF_INET/AF_INET6 for an IP literal; 0 (let the resolver choose, as before) for a host name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(vip).version == 6 else socket.AF_INET
    except ValueError:
        return 0


async def one(vip: str, port: int, lifetime: float, period: float, timeout: float) -> dict:
    rec = {"t0": time.time(), "t1": None, "node": None, "ok": False, "error": None, "pings": 0}
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(vip, port, family=vip_family(vip)), timeout)
        writer.write(b"HOLD\n")
        await writer.drain()
        hello = await asyncio.wait_for(reader.readline(), timeout)
        if not hello.startswith(b"HELD "):
            raise ConnectionError(f"unexpected greeting {hello[:40]!r}")
        rec["node"] = hello.split()[1].decode()
        end = time.monotonic() + lifetime
        n = 0
        while time.monotonic() < end:
            n += 1
            writer.write(f"PING {n}\n".encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout)
            parts = line.split()
            if len(parts) != 3 or parts[0] != b"PONG" or parts[1] != str(n).encode():
                raise ConnectionError(f"bad answer {line[:60]!r}" if line else "connection closed by peer")
            if parts[2].decode() != rec["node"]:
                raise ConnectionError(f"answered by {parts[2].decode()} instead of {rec['node']}")
            rec["pings"] = n
            await asyncio.sleep(period)
        rec["ok"] = True
    except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        rec["t1"] = time.time()
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except (OSError, asyncio.TimeoutError):
                pass
    return rec


async def run(vip, port, conns, lifetime, period, duration, timeout, out, ramp) -> list[dict]:
    results: list[dict] = []
    deadline = time.monotonic() + duration
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def slot(i: int):
        await asyncio.sleep(ramp * i / max(conns, 1))
        while not stop.is_set() and time.monotonic() + lifetime < deadline:
            rec = await one(vip, port, lifetime, period, timeout)
            results.append(rec)
            out.write(json.dumps(rec) + "\n")
            out.flush()

    await asyncio.gather(*(slot(i) for i in range(conns)))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nlbfarm-holdclient")
    ap.add_argument("--vip", required=True)
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--conns", type=int, default=200, help="connections kept open at once")
    ap.add_argument("--lifetime", type=float, default=10.0, help="seconds each connection lives")
    ap.add_argument("--period", type=float, default=0.5, help="seconds between pings")
    ap.add_argument("--duration", type=float, default=60.0, help="no connection starts that would end later")
    ap.add_argument("--ramp", type=float, default=2.0, help="spread the first connections over this long")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not 0 < args.conns <= 2000 or not 0 < args.duration <= 3600:
        ap.error("--conns must be 1..2000 and --duration 0..3600 s")
    with open(args.out, "a", buffering=1) as out:
        res = asyncio.run(run(args.vip, args.port, args.conns, args.lifetime, args.period, args.duration,
                              args.timeout, out, args.ramp))
    broken = sum(1 for r in res if not r["ok"])
    print(f"holdclient: {len(res)} connections, {broken} broken", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
