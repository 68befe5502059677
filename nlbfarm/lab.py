"""A whole farm on one machine: network namespaces on one bridge.

Hosts (network namespaces): ``<prefix>-lan`` holds the bridge (the switch),
``<prefix>-etcd`` runs etcd, ``<prefix>-client`` is the client, and
``<prefix>-n1``... are the nodes, each running farmd and the lab HTTP app.
Addresses come from 198.18.0.0/24 (RFC 2544's benchmarking range); the root
namespace gets no address or route into the lab, so lab traffic cannot leave
the machine. ``farmctl lab``, the demo and the lab tests all use this module.

Processes are started detached (their own session) so ``farmctl lab up`` can
return; their pids and everything else ``lab status`` reports live in
``/run/nlbfarm/lab/<prefix>/lab.json``. ``down()`` works without that file:
it kills every process inside the lab's namespaces and deletes them, which is
what cleans up after a crashed run.

``Lab(tls=True)`` runs the farm as the README's "Security" section sets one
up: a throwaway PKI in ``<state dir>/tls`` (``nlbfarm.pki``), etcd serving
only https with ``--client-cert-auth`` and authentication on (user ``farm``,
whose role is limited to the farm's prefix), agents that present a client
certificate and a password file to etcd, and mutual TLS on every agent's API
and peer listeners. The lab's own helpers (snapshot, convergence waits,
farmctl) then use the same certificates; ``lab.json`` records that the lab
is a TLS lab, so a ``Lab(prefix=...)`` attached to it later agrees.

``Lab(mgmt=True)`` adds a second, management network: bridge ``br1`` in the
lan namespace, ``eth1`` on etcd and on every node (MGMT_SUBNET), and the
agents' etcd endpoint on it, so a node whose LAN link goes down still reaches
etcd. ``Lab(peer_wildcard=True)`` makes every agent bind its peer listener on
the wildcard address and advertise its LAN address (``status.peer_advertise``).
"""
from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator
from pathlib import Path
from typing import Callable

import yaml

from nlbfarm import pki
from nlbfarm.coordinator.cluster import ClusterSnapshot, build_snapshot
from nlbfarm.errors import LabError, PkiError
from nlbfarm.node import iplib

STATE_ROOT = Path(os.environ.get("NLBFARM_LAB_DIR", "/run/nlbfarm/lab"))
SUBNET = "198.18.0"          # /24, RFC 2544 benchmarking range
VIP = f"{SUBNET}.100"
ETCD_ADDR = f"{SUBNET}.2"
CLIENT_ADDR = f"{SUBNET}.3"
GRPC_LISTEN = "127.0.0.1:7400"
PEER_PORT = 7401
ETCD_MEMBER_ADDRS = [ETCD_ADDR, f"{SUBNET}.4", f"{SUBNET}.5"]
APP_PORT = 80
UDP_PORT = 5300  # the lab app's UDP echo
CLUSTER_NAME = "lab"
ETCD_PREFIX = "/nlbfarm"
# Lab(mgmt=True): the management network (still RFC 2544's 198.18.0.0/15).
MGMT_SUBNET = "198.18.1"
MGMT_ETCD_ADDR = f"{MGMT_SUBNET}.2"
# IPv6 (Lab(ipv6=True)): 2001:db8::/32 is the documentation prefix. The lab
# /64 is on-link for everyone; nodes also reach 2001:db8::/48 on-link, so a
# client may add sources from other /64s (for /64 network-affinity tests).
SUBNET6 = "2001:db8::"
VIP6 = f"{SUBNET6}100"
CLIENT_ADDR6 = f"{SUBNET6}3"
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
# Lab(tls=True): etcd's farm user and role (read-write on ETCD_PREFIX/ only),
# and the names of the files in <state dir>/tls.
ETCD_USER = "farm"
ETCD_ROLE = "farm"
ETCD_CA = "etcd-ca"          # signs etcd's server certificate and the agents' client certificate
ETCD_SERVER = "etcd-server"
ETCD_CLIENT = "etcd-client"  # CN is not an etcd user: the certificate alone grants nothing
FARM_CA = "farm-ca"          # signs the nodes' API certificates (status.tls_client_ca_file)


def node_addr(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


def node_addr6(i: int) -> str:
    return f"{SUBNET6}{10 + i}"


def mgmt_addr(i: int) -> str:
    """Node i's address on the management network (Lab(mgmt=True))."""
    return f"{MGMT_SUBNET}.{10 + i}"


def etcd_tls_args(cert: str, key: str, ca: str) -> list[str]:
    """etcd's flags for https client URLs that require a client certificate signed by ``ca``."""
    return ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth"]


def client_urls(addrs: list[str], tls: bool, port: int = 2379) -> list[str]:
    """etcd client URLs; etcdctl needs the https scheme to speak TLS."""
    scheme = "https" if tls else "http"
    return [f"{scheme}://{a}:{port}" for a in addrs]


def node_cert_names(addr: str, addr6: str | None = None) -> list[str]:
    """What a node's API certificate must name: its peer_listen address (peers dial it) and
    127.0.0.1 (farmctl dials status.listen on loopback)."""
    return [addr, "127.0.0.1", *([addr6] if addr6 else [])]


def build_switch(lan: str) -> None:
    """The lab's switch: bridge br0 in namespace ``lan``."""
    iplib.ensure_netns(lan)
    iplib.set_link_up("lo", lan)
    iplib.ensure_bridge("br0", lan)
    iplib.set_link_up("br0", lan)


def plug_host(lan: str, ns: str, port: str, cidrs: list[str], port_up: bool = True,
              ifname: str = "eth0", bridge: str = "br0") -> None:
    """A host on the switch: namespace ``ns`` with ``ifname`` and ``cidrs``, its cable ``port`` on ``bridge``.

    IPv6 addresses skip duplicate address detection: a lab needs no DAD delay.
    ``port_up=False`` leaves the cable unplugged (the switch port down).
    """
    iplib.ensure_netns(ns)
    iplib.set_link_up("lo", ns)
    iplib.ensure_veth_pair(port, ifname, netns=lan, peer_netns=ns)
    iplib.set_master(port, bridge, lan)
    if port_up:
        iplib.set_link_up(port, lan)
    else:
        iplib.set_link_down(port, lan)
    for cidr in cidrs:
        iplib.add_address(ifname, cidr, ns, nodad=":" in cidr)
    iplib.set_link_up(ifname, ns)


@dataclass
class LabTiming:
    lease_ttl: int = 3
    fence_timeout: float = 0.4
    keepalive_interval: float = 0.25
    leave_timeout: float = 10.0
    drain_timeout: float = 60.0
    stop_drain_timeout: float = 30.0
    etcd_timeout: float = 0.5  # farmd's etcd.timeout (its default is 1.0)


@dataclass
class Lab:
    prefix: str = "nlbf"
    state_root: Path = STATE_ROOT
    python: str = sys.executable
    timing: LabTiming = field(default_factory=LabTiming)
    buckets: int = 4096
    progress: Callable[[str], None] = lambda msg: None
    # 1 or 3 etcd members (all in the <prefix>-etcd namespace, one address each).
    etcd_members: int = 1
    # Run every agent under a supervisor that restarts it, like systemd's Restart=always.
    supervise: bool = False
    supervise_delay: float = 1.0  # seconds before the supervisor restarts a dead agent
    # The application on each node: "python" (the lab app, started by the lab)
    # or "nginx" (Debian's nginx, started and health-checked by farmd's farm module).
    app: str = "python"
    # nginx farm module: check interval and fall/rise counts.
    check_interval: float = 0.5
    check_fall: int = 2
    check_rise: int = 2
    # Per node: fields that replace the nginx module's (e.g. on_failure),
    # "extra_checks" appended to its checks. Applied when the agent (re)starts.
    module_overrides: dict = field(default_factory=dict)
    # node -> weight (default 1; 0 = standby).
    weights: dict = field(default_factory=dict)
    mac_mode: str = "multicast"
    # Extra VIPs (after VIP), port rules and the unmatched policy (config syntax).
    extra_vips: tuple = ()
    rules: tuple = ()
    unmatched: str = "drop"
    # Dual stack: IPv6 addresses on every host, VIP6 as a second VIP, and the
    # app answering on IPv6 too.
    ipv6: bool = False
    # argv put in front of the agent's command inside its namespace, e.g. a
    # setpriv that leaves farmd only the capabilities the systemd unit grants.
    agent_wrapper: tuple = ()
    # Every agent keeps its hand-off state file (node.state_dir) in <lab>/run, so
    # restarts are hitless; False sets node.state_dir "" (restarts register anew).
    hitless: bool = True
    # etcd with https, client certificates and authentication; mutual TLS on the
    # agents' API and peer listeners (see the module docstring).
    tls: bool = False
    # Every agent binds status.peer_listen on 0.0.0.0 and advertises its LAN
    # address:port (status.peer_advertise).
    peer_wildcard: bool = False
    # A second (management) network that reaches etcd; the agents' etcd
    # endpoint is there (see the module docstring). One plaintext etcd member.
    mgmt: bool = False

    def __post_init__(self):
        if self.app not in ("python", "nginx"):
            raise LabError(f"app must be python or nginx, got {self.app!r}")
        if self.etcd_members not in (1, 3):
            raise LabError(f"etcd_members must be 1 or 3, got {self.etcd_members}")
        if self.mgmt and (self.tls or self.etcd_members != 1):
            raise LabError("mgmt=True supports one plaintext etcd member only")
        if not _PREFIX_RE.match(self.prefix):
            raise LabError(f"lab prefix {self.prefix!r} must be 1-8 lowercase letters or digits, "
                           "starting with a letter (it becomes part of interface names)")
        self.dir = Path(self.state_root) / self.prefix

    # ---- names -------------------------------------------------------------

    @property
    def vips(self) -> list[str]:
        return [VIP, *([VIP6] if self.ipv6 else []), *self.extra_vips]

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def _state_file(self) -> Path:
        return self.dir / "lab.json"

    def load_state(self) -> dict:
        try:
            return json.loads(self._state_file().read_text())
        except FileNotFoundError:
            raise LabError(f"no lab {self.prefix!r} is up (no {self._state_file()}); "
                           f"start one with: farmctl lab up --prefix {self.prefix}") from None

    def _save_state(self, st: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=2))
        tmp.replace(self._state_file())

    @property
    def token_file(self) -> Path:
        """The agents' API token: farmctl needs it for drain and undrain."""
        return self.dir / "token"

    def _write_token(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24) + "\n")

    @property
    def farmctl_bin(self) -> str:
        return str(Path(self.python).with_name("farmctl"))

    def farmctl(self, node: str, *args: str, timeout: float = 120, config: bool = True) -> subprocess.CompletedProcess:
        """farmctl inside a node's namespace, with the lab's token.

        In a TLS lab farmctl reads the node's farmd.yaml ($NLBFARM_CONFIG, as
        ``--config``): it dials status.listen with the node's certificate and key
        and verifies the agent against status.tls_client_ca_file. An explicit
        ``--config`` or ``--tls-*`` in ``args`` still wins; ``config=False``
        leaves farmctl with only ``args`` (to see what it does without them).
        """
        from nlbfarm.cli import CLIENT_KEYS
        env = dict(os.environ, NLBFARM_TOKEN_FILE=str(self.token_file))
        if self.tls_active:
            if config:
                env["NLBFARM_CONFIG"] = str(self.config_path(node))
            else:  # nor from our own environment
                for k in ("config", *(k for k in CLIENT_KEYS if k != "token_file")):
                    env.pop(f"NLBFARM_{k.upper()}", None)
        return self.run(node, [self.farmctl_bin, *args], timeout=timeout, check=False, env=env)

    def node_names(self) -> list[str]:
        return list(self.load_state()["nodes"])

    # ---- TLS (Lab(tls=True)) -------------------------------------------------

    @property
    def tls_active(self) -> bool:
        """Is this a TLS lab? As recorded in lab.json when it is up, else as asked (``tls``)."""
        try:
            return bool(self.load_state().get("tls"))
        except (LabError, ValueError):
            return self.tls

    @property
    def mgmt_active(self) -> bool:
        """Has this lab a management network? As recorded in lab.json when it is up, else as asked."""
        try:
            return bool(self.load_state().get("mgmt"))
        except (LabError, ValueError):
            return self.mgmt

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    def tls_cert(self, name: str) -> pki.Cert:
        """A certificate of the lab's PKI by file name (ETCD_CA, ETCD_CLIENT, FARM_CA, "n1", ...)."""
        return pki.Cert(str(self.tls_dir / f"{name}.crt"), str(self.tls_dir / f"{name}.key"))

    @property
    def etcd_password_file(self) -> Path:
        """The farm user's etcd password (mode 600): farmd's etcd.password_file."""
        return self.tls_dir / "etcd-password"

    @property
    def etcd_root_password_file(self) -> Path:
        """etcd's root password (mode 600): etcd refuses `auth enable` without a root user."""
        return self.tls_dir / "etcd-root-password"

    def etcd_password(self) -> str:
        try:
            return self.etcd_password_file.read_text().strip()
        except OSError as exc:
            raise LabError(f"cannot read the lab's etcd password {self.etcd_password_file}: {exc.strerror}") from None

    @staticmethod
    def _write_secret(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("pw-" + secrets.token_hex(16) + "\n")

    def make_pki(self, names: list[str]) -> None:
        """Two CAs (etcd's and the farm API's), etcd's server certificate, the agents' etcd
        client certificate, one API certificate per node, and the etcd passwords.

        Two CAs so that a node's API certificate (clientAuth too) is no client
        certificate for etcd, and the agents' etcd certificate opens no agent API.
        """
        self.progress(f"making a throwaway PKI in {self.tls_dir}")
        try:
            ca = pki.Authority(self.tls_dir)
            etcd_ca = ca.make_ca(ETCD_CA, f"nlbfarm lab {self.prefix} etcd CA")
            # 127.0.0.1: the first member also listens on loopback (etcdctl in its namespace).
            etcd_names = [*ETCD_MEMBER_ADDRS[:self.etcd_members], "127.0.0.1"]
            ca.make_leaf(ETCD_SERVER, "etcd", etcd_ca, pki.san(etcd_names), pki.SERVER_AND_CLIENT)
            ca.make_leaf(ETCD_CLIENT, f"nlbfarm-lab-{self.prefix}-agent", etcd_ca, f"DNS:{ETCD_CLIENT}",
                         pki.CLIENT_ONLY)
            ca.make_ca(FARM_CA, f"nlbfarm lab {self.prefix} farm CA")
        except PkiError as exc:
            raise LabError(f"cannot make the lab's TLS certificates in {self.tls_dir}: {exc}") from None
        for n in names:
            self.make_node_cert(n)
        self._write_secret(self.etcd_password_file)
        self._write_secret(self.etcd_root_password_file)

    def make_node_cert(self, name: str) -> pki.Cert:
        """The node's API certificate, signed by the farm CA (serverAuth and clientAuth)."""
        i = int(name[1:])
        names = node_cert_names(node_addr(i), node_addr6(i) if self.ipv6 else None)
        try:
            return pki.Authority(self.tls_dir).make_leaf(name, name, self.tls_cert(FARM_CA), pki.san(names),
                                                         pki.SERVER_AND_CLIENT)
        except PkiError as exc:
            raise LabError(f"cannot make {name}'s TLS certificate in {self.tls_dir}: {exc}") from None

    def etcdctl_argv(self, *args: str, endpoints: list[str] | None = None) -> list[str]:
        """etcdctl towards the lab's etcd (run it in the etcd namespace with ``etcdctl_env()``):
        in a TLS lab with https URLs, the etcd CA and the agents' client certificate."""
        tls = self.tls_active
        if endpoints is None:
            endpoints = self.etcd_endpoints(tls)
        argv = ["etcdctl", "--endpoints", ",".join(endpoints)]
        if tls:
            c = self.tls_cert(ETCD_CLIENT)
            argv += ["--cacert", self.tls_cert(ETCD_CA).crt, "--cert", c.crt, "--key", c.key]
        return [*argv, *args]

    def etcdctl_env(self, user: bool = True) -> dict | None:
        """The environment for etcdctl (None: inherit ours, as a plain lab always did). In a TLS
        lab whose etcd has authentication on: the farm user and its password, in the
        environment rather than in argv so that the password shows neither in `ps` nor in a
        LabError that quotes the command."""
        if not self.tls_active:
            return None
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
        env["ETCDCTL_API"] = "3"
        if user and self.load_state()["etcd"].get("auth"):
            env["ETCDCTL_USER"] = ETCD_USER
            env["ETCDCTL_PASSWORD"] = self.etcd_password()
        return env

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 10, user: bool = True,
                **kw) -> subprocess.CompletedProcess:
        """etcdctl ``args`` in the etcd namespace, with whatever the lab's etcd requires."""
        return self.run("etcd", self.etcdctl_argv(*args), timeout=timeout, check=check,
                        env=self.etcdctl_env(user), **kw)

    def enable_etcd_auth(self) -> None:
        """etcd's authentication, as the README's minimal set-up: root, the farm user with a role
        limited to the farm's prefix, then `auth enable`. Passwords go in on stdin."""
        self.progress(f"etcd: user {ETCD_USER}, role {ETCD_ROLE} on {ETCD_PREFIX}/, auth enable")
        root_pw = self.etcd_root_password_file.read_text().strip()
        self.etcdctl("user", "add", "root", "--interactive=false", input=root_pw + "\n", user=False)
        self.etcdctl("user", "add", ETCD_USER, "--interactive=false", input=self.etcd_password() + "\n",
                     user=False)
        self.etcdctl("role", "add", ETCD_ROLE, user=False)
        self.etcdctl("role", "grant-permission", ETCD_ROLE, "--prefix=true", "readwrite", f"{ETCD_PREFIX}/",
                     user=False)
        self.etcdctl("user", "grant-role", ETCD_USER, ETCD_ROLE, user=False)
        self.etcdctl("auth", "enable", user=False)
        st = self.load_state()
        st["etcd"]["auth"] = True
        self._save_state(st)

    # ---- process helpers ---------------------------------------------------

    def run(self, host: str, argv: list[str], timeout: float = 30, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        try:
            cp = subprocess.run(["ip", "netns", "exec", self.ns(host), *argv], capture_output=True,
                                text=True, timeout=timeout, **kw)
        except subprocess.TimeoutExpired:
            raise LabError(f"{' '.join(argv)} in {self.ns(host)} did not finish within {timeout:.0f}s") from None
        except OSError as exc:
            raise LabError(f"cannot run {argv[0]} in {self.ns(host)}: {exc.strerror}") from None
        if check and cp.returncode != 0:
            raise LabError(f"{' '.join(argv)} in {self.ns(host)} failed rc={cp.returncode}: "
                           f"{(cp.stderr or cp.stdout).strip()[-500:]}")
        return cp

    def spawn(self, host: str, argv: list[str], logname: str) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.dir / logname, "ab")
        # `ip netns exec` execs the command, so the pid is the command's own.
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], stdin=subprocess.DEVNULL,
                             stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        return p.pid

    @staticmethod
    def _alive(pid: int | None) -> bool:
        if not pid:
            return False
        try:
            # A zombie (exited, not yet reaped by us) counts as dead.
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False

    def _signal(self, pid: int | None, sig: int, wait: float = 5.0) -> bool:
        if not self._alive(pid):
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + wait
        while self._alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.02)
        return True

    # ---- up / down -------------------------------------------------------

    def lab_namespaces(self) -> list[str]:
        pat = re.compile(rf"^{re.escape(self.prefix)}-(lan|etcd|client|n\d+)$")
        return sorted(n for n in iplib.list_netns() if pat.match(n))

    def down(self, keep_logs: bool = False) -> list[str]:
        """Remove everything of this lab, including what a crashed run left behind.

        ``keep_logs`` leaves the state directory (logs, configs) for a post-mortem.
        """
        removed = []
        namespaces = self.lab_namespaces()
        for ns in namespaces:
            cp = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in (int(p) for p in cp.stdout.split() if p.isdigit()):
                self._signal(pid, signal.SIGKILL, wait=3)
        for ns in namespaces:
            if iplib.delete_netns(ns):
                removed.append(ns)
        if self.dir.exists() and not keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)
        return removed

    @contextmanager
    def running(self, nodes: int = 3, wait: float = 60.0, converge: list[str] | None = None) -> Iterator["Lab"]:
        """``up()`` for the duration of a block; ``down()`` afterwards, even on failure, and check it."""
        try:
            self.up(nodes=nodes, wait=wait, converge=converge)
            yield self
        finally:
            self.down()
        left = self.lab_namespaces()
        if left:
            raise LabError(f"lab {self.prefix} left namespaces behind: {' '.join(left)}")

    def up(self, nodes: int = 3, wait: float = 60.0, converge: list[str] | None = None) -> dict:
        """Build the lab; ``converge``: the nodes that must end up serving (default: all)."""
        if not 1 <= nodes <= 64:
            raise LabError(f"--nodes must be from 1 to 64, got {nodes}")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces and nftables)")
        for tool in ("etcd", "nft", "ip"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} is not installed; run `make venv` (it installs the Debian packages)")
        leftovers = self.down()
        if leftovers:
            self.progress(f"removed leftovers of an earlier lab: {' '.join(leftovers)}")
        names = [f"n{i}" for i in range(1, nodes + 1)]
        try:
            self._build_network(names)
            st = {"prefix": self.prefix, "vip": VIP, "url": f"http://{VIP}:{APP_PORT}/",
                  **({"vip6": VIP6, "url6": f"http://[{VIP6}]:{APP_PORT}/"} if self.ipv6 else {}),
                  "subnet": f"{SUBNET}.0/24", "cluster": CLUSTER_NAME, "nodes": names,
                  "etcd": {"endpoint": ",".join(self.etcd_endpoints(self.tls)), "netns": self.ns("etcd"),
                           "pids": {}},
                  "pids": {}, "dir": str(self.dir), "app": self.app,
                  **({"tls": True} if self.tls else {}), **({"mgmt": True} if self.mgmt else {})}
            self._save_state(st)
            self._write_token()
            if self.tls:
                self.make_pki(names)
            self.start_etcd()
            if self.tls:
                # Before any agent starts: a farmd whose user does not exist yet would
                # only log refusals until it does.
                self.enable_etcd_auth()
            for n in names:
                self.start_node(n)
            self.progress(f"waiting for {nodes} nodes to converge")
            if converge is None:
                self.wait_converged(names, timeout=wait)
            else:
                self.wait_serving(converge, timeout=wait)
        except BaseException:
            self.down(keep_logs=True)  # the error message points at these logs
            raise
        self.progress(f"lab {self.prefix} is up: VIP {VIP}{' and ' + VIP6 if self.ipv6 else ''}, {nodes} nodes"
                      f"{', TLS and etcd authentication' if self.tls else ''}")
        return self.status()

    def _build_network(self, names: list[str]) -> None:
        lan = self.ns("lan")
        self.progress(f"creating namespaces {self.prefix}-{{lan,etcd,client,{','.join(names)}}}")
        build_switch(lan)
        hosts = [("etcd", ETCD_ADDR), ("client", CLIENT_ADDR)] + [
            (n, node_addr(i)) for i, n in enumerate(names, 1)]
        for host, addr in hosts:
            cidrs = [f"{addr}/24"]
            if self.ipv6 and host != "etcd":
                addr6, plen = ((CLIENT_ADDR6, 64) if host == "client" else (node_addr6(int(host[1:])), 48))
                cidrs.append(f"{addr6}/{plen}")
            plug_host(lan, self.ns(host), f"p-{host}", cidrs)
        for addr in ETCD_MEMBER_ADDRS[1:self.etcd_members]:
            iplib.add_address("eth0", f"{addr}/24", self.ns("etcd"))
        if self.mgmt:
            iplib.ensure_bridge("br1", lan)
            iplib.set_link_up("br1", lan)
            mgmt_hosts = [("etcd", MGMT_ETCD_ADDR)] + [(n, mgmt_addr(i)) for i, n in enumerate(names, 1)]
            for host, addr in mgmt_hosts:
                plug_host(lan, self.ns(host), f"m-{host}", [f"{addr}/24"], ifname="eth1", bridge="br1")

    # ---- processes -------------------------------------------------------

    def etcd_endpoints(self, tls: bool = False) -> list[str]:
        """The etcd members' client endpoints; with ``tls`` as https URLs (the scheme is how
        etcdctl knows to speak TLS)."""
        addrs = ETCD_MEMBER_ADDRS[:self.etcd_members]
        return client_urls(addrs, True) if tls else [f"{a}:2379" for a in addrs]

    def etcd_names(self) -> list[str]:
        return [f"etcd{i}" for i in range(1, self.etcd_members + 1)]

    def start_etcd(self, member: str | None = None, wait: bool = True) -> None:
        """Start every etcd member (or just ``member``), keeping any data already on disk."""
        st = self.load_state()
        names = self.etcd_names()
        tls = bool(st.get("tls"))
        # Peers stay plaintext even in a TLS lab: every member is in the etcd namespace,
        # so peer traffic never crosses the lab's switch.
        cluster = ",".join(f"{n}=http://{a}:2380" for n, a in zip(names, ETCD_MEMBER_ADDRS))
        tls_args = []
        if tls:
            server = self.tls_cert(ETCD_SERVER)
            tls_args = etcd_tls_args(server.crt, server.key, self.tls_cert(ETCD_CA).crt)
        for name, addr in zip(names, ETCD_MEMBER_ADDRS):
            if member is not None and name != member:
                continue
            [url] = client_urls([addr], tls)
            self.progress(f"starting {name} in {self.ns('etcd')} on {url}")
            local = "," + client_urls(["127.0.0.1"], tls)[0] if addr == ETCD_ADDR else ""
            if addr == ETCD_ADDR and st.get("mgmt"):
                local += "," + client_urls([MGMT_ETCD_ADDR], tls)[0]
            pid = self.spawn("etcd", [
                "etcd", "--name", name, "--data-dir", str(self.dir / f"{name}-data"),
                "--listen-client-urls", f"{url}{local}",
                "--advertise-client-urls", url,
                "--listen-peer-urls", f"http://{addr}:2380",
                "--initial-advertise-peer-urls", f"http://{addr}:2380",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                *tls_args, "--log-level", "warn"], f"{name}.log")
            st["etcd"]["pids"][name] = pid
        self._save_state(st)
        if wait:
            self.wait_etcd()

    def wait_etcd(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cp = self.etcdctl("endpoint", "health", check=False, timeout=10)
            if cp.returncode == 0 or (self.etcd_members == 3 and cp.stdout.count("is healthy") >= 2):
                return
            time.sleep(0.2)
        raise LabError(f"etcd did not become healthy; see {self.dir}/etcd*.log")

    def etcd_pid(self, member: str = "etcd1") -> int | None:
        return self.load_state()["etcd"]["pids"].get(member)

    def stop_etcd(self, member: str | None = None, sig: int = signal.SIGTERM) -> None:
        for name in self.etcd_names():
            if member is None or name == member:
                self._signal(self.etcd_pid(name), sig, wait=10)

    def etcd_leader(self) -> str | None:
        """Name of the current etcd leader, from etcdctl's status table."""
        cp = self.etcdctl("endpoint", "status", "-w", "json", check=False, timeout=10)
        try:
            rows = json.loads(cp.stdout or "[]")
        except ValueError:
            return None
        for row in rows:
            st = row.get("Status", {})
            if st.get("header", {}).get("member_id") == st.get("leader"):
                addr = row["Endpoint"].split("//")[-1].split(":")[0]
                return self.etcd_names()[ETCD_MEMBER_ADDRS.index(addr)]
        return None

    def fence_open(self, name: str) -> bool:
        """Is the node's kernel fence open right now (its element not expired)?"""
        cp = self.run(name, ["nft", "-j", "list", "set", "inet", "nlbfarm", "fence"], check=False)
        return cp.returncode == 0 and bool(json.loads(cp.stdout)["nftables"][1]["set"].get("elem"))

    # ---- faults --------------------------------------------------------------

    def cut_link(self, name: str) -> None:
        """The node's LAN cable is pulled: its switch port goes down."""
        iplib.set_link_down(f"p-{name}", self.ns("lan"))

    def restore_link(self, name: str) -> None:
        iplib.set_link_up(f"p-{name}", self.ns("lan"))

    def cut_etcd(self, name: str, reset: bool = False) -> None:
        """Drop the node's traffic to and from etcd; its LAN stays intact.

        ``reset`` answers the node's etcd packets with TCP resets instead, so its
        open streams (the watch) break at once rather than stall.
        """
        addrs = ", ".join(ETCD_MEMBER_ADDRS[:self.etcd_members] + ([MGMT_ETCD_ADDR] if self.mgmt_active else []))
        verdict = "reject with tcp reset" if reset else "drop"
        rules = ("table inet labfault {\n"
                 " chain out {\n type filter hook output priority 0; policy accept;\n"
                 f" ip daddr {{ {addrs} }} tcp dport 2379 {verdict}\n }}\n"
                 " chain in {\n type filter hook input priority 0; policy accept;\n"
                 f" ip saddr {{ {addrs} }} tcp sport 2379 drop\n }}\n}}\n")
        self.run(name, ["nft", "-f", "-"], input=rules)

    def restore_etcd(self, name: str) -> None:
        self.run(name, ["nft", "delete", "table", "inet", "labfault"], check=False)

    @property
    def run_dir(self) -> Path:
        """Where the agents keep their hand-off state files (systemd's RuntimeDirectory)."""
        return self.dir / "run"

    def node_config(self, name: str) -> dict:
        i = int(name[1:])
        t = self.timing
        cfg = {
            "node": {"id": name, "interface": "eth0", "weight": self.weights.get(name, 1),
                     "addresses": [node_addr(i)], "state_dir": str(self.run_dir) if self.hitless else ""},
            "cluster": {"name": CLUSTER_NAME, "vips": self.vips, "buckets": self.buckets,
                        "mac_mode": self.mac_mode, "rules": [dict(r) for r in self.rules],
                        "unmatched": self.unmatched},
            "etcd": {"endpoints": [f"{MGMT_ETCD_ADDR}:2379"] if self.mgmt_active else self.etcd_endpoints(),
                     "prefix": ETCD_PREFIX, "timeout": t.etcd_timeout, "retry_deadline": 5.0},
            "timing": {"lease_ttl": t.lease_ttl, "fence_timeout": t.fence_timeout,
                       "keepalive_interval": t.keepalive_interval, "leave_timeout": t.leave_timeout,
                       "drain_timeout": t.drain_timeout, "stop_drain_timeout": t.stop_drain_timeout},
            "status": {"listen": GRPC_LISTEN, "peer_listen": f"{node_addr(i)}:{PEER_PORT}",
                       "token_file": str(self.token_file)},
            **({"module": self.nginx_module(name)} if self.app == "nginx" else {}),
        }
        if self.peer_wildcard:
            cfg["status"].update(peer_listen=f"0.0.0.0:{PEER_PORT}", peer_advertise=f"{node_addr(i)}:{PEER_PORT}")
        if self.tls_active:
            cfg["etcd"].update(self.etcd_tls_config())
            cfg["status"].update(self.status_tls_config(name))
        return cfg

    def etcd_tls_config(self) -> dict:
        """farmd's etcd section in a TLS lab: https endpoints, the CA, the client certificate,
        the farm user and its password file."""
        client = self.tls_cert(ETCD_CLIENT)
        return {"endpoints": self.etcd_endpoints(tls=True),
                "ca_file": self.tls_cert(ETCD_CA).crt, "cert_file": client.crt, "key_file": client.key,
                "username": ETCD_USER, "password_file": str(self.etcd_password_file)}

    def status_tls_config(self, name: str) -> dict:
        """Mutual TLS on the node's API and peer listeners: its own certificate, the farm CA."""
        own = self.tls_cert(name)
        return {"tls_cert_file": own.crt, "tls_key_file": own.key, "tls_client_ca_file": self.tls_cert(FARM_CA).crt}

    # ---- nginx as the farm module ------------------------------------------

    def nginx_conf(self, name: str) -> Path:
        return self.dir / f"{name}.nginx.conf"

    def nginx_pidfile(self, name: str) -> Path:
        return self.dir / f"{name}.nginx.pid"

    def nginx_module(self, name: str) -> dict:
        conf = self.nginx_conf(name)
        common = {"interval": self.check_interval, "timeout": min(0.5, self.check_interval),
                  "rise": self.check_rise, "fall": self.check_fall}
        over = dict(self.module_overrides.get(name, {}))
        extra = [{**common, **c} for c in over.pop("extra_checks", [])]
        return {"name": "nginx", "start": f"nginx -c {conf}", "stop": f"nginx -c {conf} -s quit && while [ -e {self.nginx_pidfile(name)} ]; do sleep 0.1; done",
                "command_timeout": 10, "on_failure": "withdraw",
                "checks": [{"name": "http", "type": "http", "url": f"http://127.0.0.1:{APP_PORT}/",
                            "body_match": f"^{name}$", **common},
                           {"name": "master", "type": "process", "pid_file": str(self.nginx_pidfile(name)),
                            **common}] + extra, **over}

    def write_nginx_conf(self, name: str) -> None:
        tmp = self.dir / f"{name}.nginx-tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        temps = "\n".join(f"  {k}_temp_path {tmp}/{k};" for k in ("client_body", "proxy", "fastcgi",
                                                                    "uwsgi", "scgi"))
        self.nginx_conf(name).write_text(f"""# nginx of lab node {name}: the farm module's application
daemon on;
worker_processes 1;
pid {self.nginx_pidfile(name)};
error_log {self.dir}/{name}.nginx.error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
{temps}
  server {{
    listen {APP_PORT};
{f"    listen [::]:{APP_PORT};" if self.ipv6 else ""}
    location / {{ default_type text/plain; return 200 "{name}\\n"; }}
  }}
}}
""")

    def stop_nginx(self, name: str) -> None:
        """Stop the node's nginx behind farmd's back, as a crash or an operator would."""
        self.run(name, ["nginx", "-c", str(self.nginx_conf(name)), "-s", "stop"])

    def start_nginx(self, name: str) -> None:
        self.run(name, ["nginx", "-c", str(self.nginx_conf(name))])

    def config_path(self, name: str) -> Path:
        return self.dir / f"{name}.yaml"

    def accept_log(self, name: str) -> Path:
        return self.dir / f"{name}.accept.log"

    def start_app(self, name: str) -> None:
        st = self.load_state()
        pid = self.spawn(name, [self.python, "-m", "nlbfarm.node.app", "--name", name,
                                "--listen", f"0.0.0.0:{APP_PORT}", "--accept-log", str(self.accept_log(name)),
                                "--udp-listen", f"0.0.0.0:{UDP_PORT}",
                                *(["--listen6", f"[::]:{APP_PORT}", "--udp-listen6", f"[::]:{UDP_PORT}"]
                                  if self.ipv6 else [])],
                         f"{name}.app.log")
        st["pids"].setdefault(name, {})["app"] = pid
        self._save_state(st)

    def start_agent(self, name: str) -> None:
        st = self.load_state()
        if st.get("tls") and not Path(self.tls_cert(name).crt).exists():
            self.make_node_cert(name)  # a node added after up()
        path = self.config_path(name)
        path.write_text(yaml.safe_dump(self.node_config(name), sort_keys=False))
        agent = [*self.agent_wrapper, self.python, "-m", "nlbfarm.node.agent", "--config", str(path)]
        if self.supervise:
            pidfile = self.dir / f"{name}.agent.pid"
            pidfile.unlink(missing_ok=True)
            sup = self.spawn(name, [self.python, "-m", "nlbfarm.supervise", "--pidfile", str(pidfile),
                                    "--delay", str(self.supervise_delay), "--", *agent], f"{name}.agent.log")
            st["pids"].setdefault(name, {})["supervisor"] = sup
            deadline = time.monotonic() + 10
            while not pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            pid = int(pidfile.read_text())
        else:
            pid = self.spawn(name, agent, f"{name}.agent.log")
        st["pids"].setdefault(name, {})["agent"] = pid
        self._save_state(st)

    def start_node(self, name: str) -> None:
        if self.app == "nginx":
            self.progress(f"starting {name}: farmd, whose farm module starts nginx on :{APP_PORT}")
            self.write_nginx_conf(name)
        else:
            self.progress(f"starting {name}: app on :{APP_PORT} and farmd")
            self.start_app(name)
        self.start_agent(name)

    def pid(self, name: str, what: str) -> int | None:
        if what == "agent" and self.supervise:
            # the supervisor restarts the agent under a new pid
            try:
                return int((self.dir / f"{name}.agent.pid").read_text())
            except (FileNotFoundError, ValueError):
                return None
        if what == "app" and self.app == "nginx":
            try:
                return int(self.nginx_pidfile(name).read_text())
            except (FileNotFoundError, ValueError):
                return None
        return self.load_state()["pids"].get(name, {}).get(what)

    def kill(self, name: str, what: str = "agent", sig: int = signal.SIGKILL, wait: float = 15.0) -> bool:
        return self._signal(self.pid(name, what), sig, wait)

    def kill_node(self, name: str) -> None:
        """kill -9 of agent and app (and supervisor), as a crashed server would."""
        self.kill(name, "supervisor")
        self.kill(name, "agent")
        self.kill(name, "app")

    def alive(self, name: str, what: str = "agent") -> bool:
        return self._alive(self.pid(name, what))

    # ---- observation -------------------------------------------------------

    def snapshot(self) -> ClusterSnapshot:
        """The cluster as stored in etcd, read with etcdctl inside the etcd namespace."""
        cp = self.etcdctl("get", "--prefix", f"{ETCD_PREFIX}/{CLUSTER_NAME}/", "-w", "json", timeout=10)
        d = json.loads(cp.stdout)
        items = {}
        for kv in d.get("kvs", []):
            try:
                key = base64.b64decode(kv["key"]).decode()
            except UnicodeDecodeError:
                continue  # not UTF-8: the agents skip such keys too
            items[key] = (base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))
        return build_snapshot(f"{ETCD_PREFIX}/{CLUSTER_NAME}", items, int(d["header"]["revision"]))

    def member_lease(self, name: str) -> int | None:
        """The lease of ``members/<name>`` in etcd right now (None: no such key)."""
        cp = self.etcdctl("get", f"{ETCD_PREFIX}/{CLUSTER_NAME}/members/{name}", "-w", "json", timeout=10)
        kvs = json.loads(cp.stdout).get("kvs", [])
        return int(kvs[0].get("lease", 0)) if kvs else None

    def node_mac(self, name: str) -> str:
        """The MAC of the node's LAN interface (the source of every frame it sends there)."""
        return iplib.link_mac("eth0", self.ns(name)).lower()

    @staticmethod
    def rss_kb(pid: int | None) -> int | None:
        """VmRSS of a process in kB (None: gone)."""
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, TypeError):
            return None
        return None

    @staticmethod
    def converged(snap: ClusterSnapshot, names: list[str]) -> bool:
        """Table holds exactly ``names`` and every one of them accepts its whole share."""
        if set(snap.candidates()) != set(names):
            return False
        return Lab.serving(snap, names)

    @staticmethod
    def serving(snap: ClusterSnapshot, names: list[str]) -> bool:
        """Exactly ``names`` own buckets and accept all of them (other members may idle: standby)."""
        if snap.table is None:
            return False
        counts = snap.counts()
        if set(counts) != set(names):
            return False
        g = snap.table.generation
        return all((a := snap.applied.get(n)) is not None and a.generation == g
                   and a.accepting == counts[n] for n in names)

    def wait_converged(self, names: list[str], timeout: float = 30.0) -> ClusterSnapshot:
        return self._wait_table(self.converged, names, timeout)

    def wait_serving(self, names: list[str], timeout: float = 30.0) -> ClusterSnapshot:
        return self._wait_table(self.serving, names, timeout)

    def _wait_table(self, done, names: list[str], timeout: float) -> ClusterSnapshot:
        deadline = time.monotonic() + timeout
        snap = None
        while time.monotonic() < deadline:
            try:
                snap = self.snapshot()
                if done(snap, names):
                    return snap
            except (LabError, ValueError):
                pass
            time.sleep(0.1)
        raise LabError(f"lab did not converge on {names} within {timeout:.0f}s; last view: "
                       f"{snap.counts() if snap else 'none'} (logs in {self.dir})")

    def status(self) -> dict:
        st = self.load_state()
        hosts = {"lan": {"netns": self.ns("lan"), "address": None},
                 "etcd": {"netns": self.ns("etcd"), "address": ETCD_ADDR},
                 "client": {"netns": self.ns("client"), "address": CLIENT_ADDR}}
        agents = {}
        for n in st["nodes"]:
            i = int(n[1:])
            hosts[n] = {"netns": self.ns(n), "address": node_addr(i),
                        **({"address6": node_addr6(i)} if self.ipv6 else {}),
                        **({"mgmt_address": mgmt_addr(i)} if st.get("mgmt") else {})}
            agents[n] = {"netns": self.ns(n), "grpc": GRPC_LISTEN, "metrics": "127.0.0.1:9740",
                         "agent_running": self.alive(n, "agent"), "app_running": self.alive(n, "app"),
                         "config": str(self.config_path(n))}
        if "vip6" in st:
            hosts["client"]["address6"] = CLIENT_ADDR6
        return {"prefix": self.prefix, "vip": st["vip"], "url": st["url"], "subnet": st["subnet"],
                **{k: st[k] for k in ("vip6", "url6") if k in st},
                "etcd": {"endpoint": st["etcd"]["endpoint"], "netns": self.ns("etcd"),
                         "running": all(self._alive(p) for p in st["etcd"]["pids"].values())},
                "hosts": hosts, "agents": agents, "dir": st["dir"], "token_file": str(self.token_file),
                "app": st.get("app", "python"),
                **({"tls": self.tls_status()} if st.get("tls") else {})}

    def tls_status(self) -> dict:
        """Where a TLS lab's certificates are, for `farmctl lab status` (no secret, only paths)."""
        client = self.tls_cert(ETCD_CLIENT)
        return {"dir": str(self.tls_dir), "etcd_ca": self.tls_cert(ETCD_CA).crt, "etcd_cert": client.crt,
                "etcd_key": client.key, "etcd_user": ETCD_USER, "etcd_password_file": str(self.etcd_password_file),
                "farm_ca": self.tls_cert(FARM_CA).crt}

    def client_cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns("client"), *argv]

    def holdclient_argv(self, conns: int, duration: float, out: Path, lifetime: float = 10.0,
                        period: float = 0.5, timeout: float = 15.0, vip: str = VIP) -> list[str]:
        return self.client_cmd([self.python, "-m", "nlbfarm.holdclient", "--vip", vip, "--port", str(APP_PORT),
                                "--conns", str(conns), "--duration", str(duration), "--lifetime", str(lifetime),
                                "--period", str(period), "--timeout", str(timeout), "--out", str(out)])

    def loadclient_argv(self, count: int, duration: float, out: Path, workers: int = 4,
                        interval: float = 0.0, timeout: float = 1.0, vip: str = VIP,
                        sources: list[str] | None = None) -> list[str]:
        return self.client_cmd([self.python, "-m", "nlbfarm.loadclient", "--vip", vip, "--port", str(APP_PORT),
                                "--count", str(count), "--duration", str(duration), "--workers", str(workers),
                                "--interval", str(interval), "--timeout", str(timeout), "--out", str(out),
                                *(["--sources", ",".join(sources)] if sources else [])])
