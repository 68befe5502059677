"""A minimal process supervisor for the lab: restart the command whenever it exits.

It stands in for systemd's ``Restart=always`` on lab hosts (there is no
systemd inside a network namespace). The child's pid is kept in ``--pidfile``
so a test can kill exactly the child; SIGTERM stops the supervisor and its child.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

from nlbfarm.logs import setup_logging

log = logging.getLogger("nlbfarm.supervise")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nlbfarm-supervise")
    ap.add_argument("--pidfile", required=True)
    ap.add_argument("--delay", type=float, default=1.0, help="seconds before a restart")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    setup_logging("info", "kv")  # its lines share the child's log: the same logfmt
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        ap.error("no command given")
    stopping = False
    child: subprocess.Popen | None = None

    def on_term(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stopping:
        child = subprocess.Popen(cmd)
        with open(args.pidfile + ".tmp", "w") as f:
            f.write(str(child.pid))
        os.replace(args.pidfile + ".tmp", args.pidfile)
        rc = child.wait()
        if stopping:
            log.info("child exited cmd=%s rc=%d", cmd[0], rc)
        else:
            log.warning("child exited cmd=%s rc=%d restart_in=%gs", cmd[0], rc, args.delay)
        if not stopping:
            time.sleep(args.delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
