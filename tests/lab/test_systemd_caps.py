"""Least privilege: farmd serves with only CAP_NET_ADMIN and CAP_NET_RAW.

deploy/systemd/farmd.service runs farmd as uid 0 with
``CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW`` and ``NoNewPrivileges``.
There is no systemd here, so setpriv(1) applies the same limits: every agent
of a 2-node lab runs under it. The test checks the agent's capability sets in
/proc, that each node programmed nftables and added the VIP, that a gratuitous
ARP reached the client (CAP_NET_RAW), and that the farm serves. It also shows
what the unit's comment says about farm modules: a child of farmd cannot bind
port 80 (no CAP_NET_BIND_SERVICE), so an application such as nginx must be
started through its own unit (``systemctl start nginx``).

The unit's ``ProtectSystem=strict`` is emulated as well: each agent runs in
its own mount namespace in which every file system except /proc, /sys and
/dev (the API file systems strict leaves writable) is remounted read-only but for the
runtime directory (systemd exempts RuntimeDirectory= from strict), so the farm
serving here also shows that farmd writes no other file.
"""
from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path

import pytest

from nlbfarm.lab import CLIENT_ADDR, VIP, Lab
from nlbfarm.node.dataplane import cluster_mac_for

from labkit import agent_log

CAPS = "net_admin,net_raw"
# The same limits as the unit: bounding set, ambient set, no new privileges.
SETPRIV = ("setpriv", f"--bounding-set=-all,+{CAPS.replace(',', ',+')}",
           f"--inh-caps=-all,+{CAPS.replace(',', ',+')}",
           f"--ambient-caps=-all,+{CAPS.replace(',', ',+')}", "--no-new-privs", "--")
# ProtectSystem=strict without systemd: a private mount namespace whose every
# mount but the API file systems is read-only, then the capability limits. The
# one directory left writable is RuntimeDirectory= (node.state_dir, the hand-off
# state), which systemd exempts from ProtectSystem=strict: a bind mount of its own.
def read_only_fs(runtime_dir: Path) -> tuple[str, ...]:
    rw = shlex.quote(str(runtime_dir))
    return ("unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
            f'mkdir -p {rw} && mount --bind {rw} {rw} || exit 1; '
            'for m in $(cut -d" " -f5 /proc/self/mountinfo | sort -u); do '
            f'case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|{rw}) ;; '
            '*) mount -o remount,bind,ro "$m" 2>/dev/null || true ;; esac; done; exec "$@"',
            "protect-system-strict")


CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
WANT = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)


def unit_caps() -> set[str]:
    from pathlib import Path
    unit = Path(__file__).resolve().parents[2] / "deploy/systemd/farmd.service"
    for line in unit.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return {c.removeprefix("CAP_").lower() for c in line.split("=", 1)[1].split()}
    raise AssertionError("farmd.service has no CapabilityBoundingSet=")


def proc_caps(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                k, v = line.split(":")
                out[k] = int(v, 16)
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("labstate")
    run_dir = Lab(prefix="tcaps", state_root=root).run_dir
    lab = Lab(prefix="tcaps", state_root=root, agent_wrapper=(*read_only_fs(run_dir), *SETPRIV))
    assert lab.run_dir == run_dir
    with lab.running(nodes=2, wait=60):
        yield lab


def test_setpriv_matches_the_unit():
    assert unit_caps() == set(CAPS.split(","))


def test_agent_serves_with_only_net_admin_and_net_raw(lab):
    for n in ("n1", "n2"):
        pid = lab.pid(n, "agent")
        caps = proc_caps(pid)
        assert caps["CapEff"] == WANT and caps["CapPrm"] == WANT and caps["CapBnd"] == WANT, (n, caps)
        # the data plane is in place: farmd's nft tables and the VIP
        cp = lab.run(n, ["nft", "-j", "list", "tables"])
        tables = {(t["table"]["family"], t["table"]["name"]) for t in json.loads(cp.stdout)["nftables"]
                  if "table" in t}
        assert {("inet", "nlbfarm"), ("arp", "nlbfarm")} <= tables
        assert f"{VIP}/32" in lab.run(n, ["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
        log = agent_log(lab, n)
        assert "CAP_NET_RAW" not in log and "Operation not permitted" not in log, log[-2000:]
    # The VIP answers from both nodes.
    seen = set()
    for port in range(40000, 40040):
        cp = lab.run("client", ["curl", "-sS", "--max-time", "3", "--local-port", str(port),
                                f"http://{VIP}/"], check=False)
        if cp.returncode == 0:
            seen.add(cp.stdout.strip())
    assert seen == {"n1", "n2"}


def mounts(pid: int) -> dict[str, set[str]]:
    """Mount point -> its per-mount options, as the process sees them."""
    out = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            out[fields[4]] = set(fields[5].split(","))
    return out


def test_agent_runs_on_a_read_only_file_system(lab):
    """ProtectSystem=strict: farmd serves (previous test) with every file system but /proc, /sys, /dev
    read-only, and RuntimeDirectory= (its hand-off state) the one writable directory."""
    for n in ("n1", "n2"):
        pid = lab.pid(n, "agent")
        seen = mounts(pid)
        writable = sorted(m for m, opts in seen.items() if "rw" in opts and not m.startswith(("/proc", "/sys", "/dev"))
                          and not m.startswith("/run/netns/"))
        assert "ro" in seen["/"] and writable == [str(lab.run_dir)], (n, writable)
        assert list(lab.run_dir.glob(f"farmd-*-{n}.json")), f"{n} wrote no hand-off state"
        assert str(lab.dir).startswith("/") and "ro" in seen[max((m for m in seen if str(lab.dir).startswith(m)),
                                                                 key=len)]
        log = agent_log(lab, n)
        assert "Read-only file system" not in log, log[-2000:]


def test_gratuitous_arp_is_sent(lab):
    """CAP_NET_RAW: a restarted agent announces the VIP with the cluster MAC."""
    lab.run("client", ["sysctl", "-qw", "net.ipv4.conf.eth0.arp_accept=1"])
    lab.run("client", ["ip", "neigh", "flush", "dev", "eth0"])
    lab.kill("n1", "agent", sig=signal.SIGTERM, wait=40)
    lab.wait_converged(["n2"], timeout=20)
    lab.run("client", ["ip", "neigh", "flush", "dev", "eth0"])
    lab.start_agent("n1")
    lab.wait_converged(["n1", "n2"], timeout=30)
    assert proc_caps(lab.pid("n1", "agent"))["CapEff"] == WANT
    # No traffic went to the VIP since the flush: only the GARP can have taught the client.
    neigh = lab.run("client", ["ip", "neigh", "show", VIP, "dev", "eth0"]).stdout
    assert cluster_mac_for(VIP).lower() in neigh.lower(), neigh
    assert CLIENT_ADDR  # the client is the lab's, nothing outside it


def test_module_children_cannot_bind_port_80(lab):
    """What a farm module inherits: no CAP_NET_BIND_SERVICE, so no port below 1024 (81 here; the lab app holds 80) for an app it starts."""
    code = ("import socket; s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', 81))")
    cp = lab.run("n1", [*SETPRIV, "/bin/sh", "-c", f"{lab.python} -c \"{code}\""], check=False)
    assert cp.returncode != 0 and "Permission denied" in cp.stderr, cp.stderr
    cp = lab.run("n1", [lab.python, "-c", code], check=False)
    assert cp.returncode == 0, cp.stderr
