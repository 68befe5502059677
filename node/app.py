"""A tiny HTTP application for labs and demos: answers every request with its node name.

A connection that starts with ``HOLD\n`` stays open instead: every ``PING n``
line is answered with ``PONG n <node>``, so tests can hold long-lived
connections and see whether one ever breaks.

It logs every accepted connection (client address and port) to ``--accept-log``
at accept time, so tests can prove each client connection reached exactly one
node. Stands in for the farm's real application (nginx, an API...).
"""
from __future__ import annotations

import argparse
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


def serve_udp(addr, node_name: str) -> None:
    """Answer every datagram with "<node> <length>": tells a test who got it, and whether whole."""
    sk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sk.bind(addr)
    while True:
        data, peer = sk.recvfrom(65535)
        sk.sendto(f"{node_name} {len(data)}\n".encode(), peer)


class AppServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, addr, node_name: str, accept_log):
        self.node_name = node_name
        self.accept_log = accept_log
        self._log_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def verify_request(self, request, client_address) -> bool:
        if self.accept_log is not None:
            with self._log_lock:
                self.accept_log.write(f"{time.time():.6f} {client_address[0]} {client_address[1]}\n")
                self.accept_log.flush()
        return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nlbfarm-app", description="lab HTTP app that answers its node name")
    ap.add_argument("--name", required=True)
    ap.add_argument("--listen", default="0.0.0.0:80")
    ap.add_argument("--accept-log", help="append 'time client_ip client_port' per accepted connection")
    ap.add_argument("--udp-listen", help="also answer UDP datagrams here with '<name> <length>'")
    args = ap.parse_args(argv)
    if args.udp_listen:
        uhost, _, uport = args.udp_listen.rpartition(":")
        threading.Thread(target=serve_udp, args=((uhost, int(uport)), args.name), daemon=True).start()
    host, _, port = args.listen.rpartition(":")
    log = open(args.accept_log, "a", buffering=1) if args.accept_log else None
    srv = AppServer((host, int(port)), args.name, log)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown).start())
    srv.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
