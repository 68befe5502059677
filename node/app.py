"""A tiny HTTP application for labs and demos: answers every request with its node name.

A connection that starts with ``HOLD\n`` stays open instead: every ``PING n``
line is answered with ``PONG n <node>``, so tests can hold long-lived
connections and see whether one ever breaks.

It logs every accepted connection (client address and port) to ``--accept-log``
at accept time, so tests can prove each client connection reached exactly one
node. A connection whose client had already closed or reset it while it waited
in the accept queue is logged with a fourth field, ``gone``: it belongs to an
attempt that has ended, not to a later one that reuses the port. Stands in for the farm's real application (nginx, an API...).

IPv6: ``--listen6``/``--udp-listen6`` (``[addr]:port``, e.g. ``[::]:80``) serve
the same handlers on AF_INET6 sockets with IPV6_V6ONLY set, so IPv4 clients
still arrive through the IPv4 listeners and every logged client address is
plain (never ``::ffff:``-mapped); IPv6 clients are logged in compressed form.
"""
from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import socketserver
import sys
import threading
import time


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) < 65536:
                if data.startswith(b"HOLD\n"):
                    return self._hold(sock, data[5:])
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"HOLD\n"):
                return self._hold(sock, data[5:])
            body = (self.server.node_name + "\n").encode()
            hdr = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                   f"X-Served-By: {self.server.node_name}\r\nConnection: close\r\n\r\n").encode()
            sock.sendall(hdr + body)
        except OSError:
            pass


    def _hold(self, sock: socket.socket, pending: bytes) -> None:
        """Long-lived mode: answer "PING n" lines with "PONG n <node>" until the client closes."""
        sock.settimeout(120)
        name = self.server.node_name
        sock.sendall(f"HELD {name}\n".encode())
        buf = pending
        try:
            while True:
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"PING "):
                        sock.sendall(b"PONG " + line[5:] + f" {name}\n".encode())
                chunk = sock.recv(4096)
                if not chunk:
                    return
                buf += chunk
        except OSError:
            return


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` -> (host, port); the brackets are dropped."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [address]:port, got {text!r}")
    else:
        host, _, port = text.rpartition(":")
    return host, int(port)


def _family(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, else AF_INET (hostnames and '' keep the IPv4 behaviour)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def serve_udp(addr, node_name: str, family: socket.AddressFamily | None = None) -> None:
    """Answer every datagram with "<node> <length>": tells a test who got it, and whether whole."""
    sk = _udp_socket(addr, family)
    _udp_loop(sk, node_name)


def _udp_socket(addr, family: socket.AddressFamily | None = None) -> socket.socket:
    family = family or _family(addr[0])
    sk = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sk.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sk.bind(addr)
    return sk


def _udp_loop(sk: socket.socket, node_name: str) -> None:
    while True:
        data, peer = sk.recvfrom(65535)
        sk.sendto(f"{node_name} {len(data)}\n".encode(), peer)


class AppServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, addr, node_name: str, accept_log, family: socket.AddressFamily | None = None,
                 log_lock: threading.Lock | None = None):
        self.node_name = node_name
        self.accept_log = accept_log
        self._log_lock = log_lock or threading.Lock()  # shared when several servers log to one file
        self.address_family = family or _family(addr[0])
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # IPv4 keeps going through the IPv4 listener: no ::ffff:-mapped clients here.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    def verify_request(self, request, client_address) -> bool:
        if self.accept_log is not None:
            gone = " gone" if _peer_gone(request) else ""
            with self._log_lock:
                self.accept_log.write(f"{time.time():.6f} {client_address[0]} {client_address[1]}{gone}\n")
                self.accept_log.flush()
        return True


_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info


def _peer_gone(sock: socket.socket) -> bool:
    """Whether the client closed or reset this connection before it was accepted."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != _TCP_ESTABLISHED
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nlbfarm-app", description="lab HTTP app that answers its node name")
    ap.add_argument("--name", required=True)
    ap.add_argument("--listen", default="0.0.0.0:80", help="HTTP address:port ('' for none when --listen6 is given)")
    ap.add_argument("--accept-log", help="append 'time client_ip client_port' per accepted connection")
    ap.add_argument("--udp-listen", help="also answer UDP datagrams here with '<name> <length>'")
    ap.add_argument("--listen6", help="also serve HTTP on this IPv6 [address]:port, e.g. [::]:80 (IPv6 only)")
    ap.add_argument("--udp-listen6", help="also answer UDP datagrams on this IPv6 [address]:port (IPv6 only)")
    args = ap.parse_args(argv)
    addrs = {}
    for opt, want in (("listen", 4), ("udp_listen", 4), ("listen6", 6), ("udp_listen6", 6)):
        text = getattr(args, opt)
        if not text:
            continue
        try:
            host, port = parse_hostport(text)
        except ValueError:
            ap.error(f"--{opt.replace('_', '-')}: expected {'[address]' if want == 6 else 'address'}:port, "
                     f"got {text!r}")
        if want == 6:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                ap.error(f"--{opt.replace('_', '-')}: {host!r} is not an IPv6 address")
        addrs[opt] = (host, port)
    if "listen" not in addrs and "listen6" not in addrs:
        ap.error("nothing to serve: give --listen and/or --listen6")
    family = {"listen": None, "udp_listen": None, "listen6": socket.AF_INET6, "udp_listen6": socket.AF_INET6}
    for opt in ("udp_listen", "udp_listen6"):
        if opt in addrs:
            threading.Thread(target=serve_udp, args=(addrs[opt], args.name, family[opt]), daemon=True).start()
    log = open(args.accept_log, "a", buffering=1) if args.accept_log else None
    lock = threading.Lock()
    servers = [AppServer(addrs[o], args.name, log, family[o], lock) for o in ("listen", "listen6") if o in addrs]

    def stop(*_):
        for srv in servers:
            threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    extra = [threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
             for srv in servers[1:]]
    for t in extra:
        t.start()
    servers[0].serve_forever(poll_interval=0.2)
    for t in extra:
        t.join(5)
    for srv in servers:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
