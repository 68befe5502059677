"""A tiny HTTP application for labs and demos: answers every request with its node name.

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
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            body = (self.server.node_name + "\n").encode()
            hdr = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                   f"X-Served-By: {self.server.node_name}\r\nConnection: close\r\n\r\n").encode()
            sock.sendall(hdr + body)
        except OSError:
            pass


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
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    log = open(args.accept_log, "a", buffering=1) if args.accept_log else None
    srv = AppServer((host, int(port)), args.name, log)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown).start())
    srv.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
