"""farmd configuration: a YAML file validated as a whole before anything runs.

pydantic does the field checks so every error names its dotted field path;
the cross-field timing rules (the safety argument depends on them) are
checked here too. ``load_config`` either returns a complete, valid ``Config``
or raises ``ConfigError`` listing every problem; it never returns half a config.
"""
from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from typing import Annotated

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from nlbfarm.errors import ConfigError

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def _host_port(v: str, min_port: int = 1) -> str:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not min_port <= int(port) < 65536:
        raise ValueError(f"{v!r} is not host:port")
    return v


def _host_of(v: str) -> str:
    return v.rpartition(":")[0].strip("[]")


def _not_routable(host: str) -> str | None:
    """Why peers could not reach ``host`` as this node's address, or None."""
    if host in ("", "*", "0.0.0.0", "::"):
        return "a wildcard address (listen on every interface)"
    if host == "localhost":
        return "loopback"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a host name: the operator's DNS says where it is
    if ip.is_unspecified:
        return "a wildcard address (listen on every interface)"
    if ip.is_loopback:
        return "loopback"
    return None


def _simple_name(v: str) -> str:
    if not _ID_RE.match(v):
        raise ValueError("must be 1-63 characters of letters, digits, '_', '.', '-'")
    return v


def _one_of(choices: tuple[str, ...]) -> AfterValidator:
    def check(v: str) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {v!r}")
        return v
    return AfterValidator(check)


# A cluster, module or check name: safe in etcd keys, metric labels and logs.
SimpleName = Annotated[str, AfterValidator(_simple_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Strict):
    id: str
    interface: str = "eth0"
    weight: int = Field(default=1, ge=0, le=1000)
    # Addresses peers and operators may use to reach this node; informative.
    addresses: tuple[str, ...] = ()
    # Where farmd keeps the state a restarted farmd adopts (its leases and
    # kernel ruleset: hitless restarts). On tmpfs: it must not outlive a boot.
    # "" turns adoption off: every start registers anew and moves buckets.
    state_dir: str = "/run/nlbfarm"

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError("must be 1-63 characters of letters, digits, '_', '.', '-' "
                             "starting with a letter or digit")
        return v

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, v: str) -> str:
        if v and (not v.startswith("/") or "\0" in v or len(v) > 200):
            raise ValueError("must be an absolute path of at most 200 characters, or \"\" (no adoption)")
        return v

    @field_validator("interface")
    @classmethod
    def _ifname(cls, v: str) -> str:
        if not _IFNAME_RE.match(v):
            raise ValueError("must be a Linux interface name (1-15 characters)")
        return v


MAC_MODES = ("multicast", "unicast-flood")
PROTOCOLS = ("tcp", "udp", "both")
AFFINITIES = ("none", "client", "network")
UNMATCHED = ("drop", "one-node")


def port_range(v: int | str) -> tuple[int, int]:
    """80, "80", "8000-8100" or "all" -> (first, last); ValueError naming the problem."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a port or a range")
    if isinstance(v, int):
        lo = hi = v
    elif v == "all":
        lo, hi = 1, 65535
    else:
        a, sep, b = str(v).partition("-")
        if not a.strip().isdigit() or (sep and not b.strip().isdigit()):
            raise ValueError(f"{v!r} is not a port, a range like 8000-8100, or 'all'")
        lo, hi = int(a), int(b) if sep else int(a)
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"{v!r}: ports must be 1..65535 and the range first <= last")
    return lo, hi


class PortRule(_Strict):
    """Which traffic to a VIP the farm serves, and what keeps a client on one node.

    Windows NLB's port rules: a VIP (or all), a protocol, a port range, an affinity.
    """

    # None: every VIP of the farm.
    vip: str | None = None
    protocol: Annotated[str, _one_of(PROTOCOLS)] = "both"
    # A port (80) or a range ("8000-8100"); "all" is 1-65535.
    ports: int | str = "all"
    # none: client address and port (SafeKit on_port; the best spread).
    # client: client address (SafeKit on_addr, NLB Single): session affinity.
    # network: the client's /24 (IPv4) or /64 (IPv6) (NLB Network): proxy pools.
    affinity: Annotated[str, _one_of(AFFINITIES)] = "none"

    @field_validator("vip")
    @classmethod
    def _vip(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address") from None

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: int | str) -> int | str:
        lo, hi = port_range(v)
        return lo if lo == hi else f"{lo}-{hi}"

    @property
    def port_range(self) -> tuple[int, int]:
        return port_range(self.ports)

    @property
    def protocols(self) -> tuple[str, ...]:
        return ("tcp", "udp") if self.protocol == "both" else (self.protocol,)


class ClusterSection(_Strict):
    name: SimpleName = "default"
    vips: tuple[str, ...] = Field(min_length=1)
    buckets: int = 4096
    # "multicast": clients reach every node through a multicast cluster MAC
    # (NLB multicast). "unicast-flood": through a locally administered unicast
    # MAC no node ever sends from, so switches never learn it and flood it
    # (SafeKit's vmac_invisible); nodes run their NIC promiscuous.
    mac_mode: str = "multicast"
    # "auto" derives the MAC from the first VIP: 03:bf:<IPv4 bytes> for
    # multicast, 02:bf:<IPv4 bytes> for unicast-flood (an IPv6 VIP gives its
    # last four bytes). IPv4 and IPv6 VIPs share the one cluster MAC.
    cluster_mac: str = "auto"
    # Port rules; they may not overlap. Default: every TCP and UDP port of every
    # VIP, affinity none. Identical on every node, like buckets.
    rules: tuple[PortRule, ...] = ()
    # Traffic to a VIP that matches no rule: dropped, or served by one node
    # (the owner of bucket 0: NLB's default host, which moves like any bucket).
    unmatched: Annotated[str, _one_of(UNMATCHED)] = "drop"

    @field_validator("vips")
    @classmethod
    def _vips(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for item in v:
            try:
                addr = ipaddress.ip_address(item)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address") from None
            if addr.is_multicast or addr.is_unspecified or addr.is_loopback or addr.is_link_local:
                raise ValueError(f"{item} cannot be a VIP: it must be a unicast address that is not "
                                 "loopback or link-local")
            out.append(str(addr))
        if len(set(out)) != len(out):
            raise ValueError("contains the same VIP twice")
        return tuple(out)

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, v: int) -> int:
        if v < 64 or v > 65536 or v & (v - 1):
            raise ValueError(f"must be a power of two from 64 to 65536, got {v}")
        return v

    @field_validator("cluster_mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        v = v.lower()
        if v == "auto":
            return v
        if not _MAC_RE.match(v):
            raise ValueError(f"{v!r} is not a MAC address like 03:bf:c6:12:00:64")
        return v

    @field_validator("mac_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in MAC_MODES:
            raise ValueError(f"must be one of {', '.join(MAC_MODES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _rules_fit(self) -> "ClusterSection":
        seen: list[tuple[int, str, str, int, int]] = []
        for i, r in enumerate(self.rules):
            if r.vip is not None and r.vip not in self.vips:
                raise ValueError(f"rules[{i}]: vip {r.vip} is not one of cluster.vips")
            lo, hi = r.port_range
            for vip in ([r.vip] if r.vip else self.vips):
                for proto in r.protocols:
                    for j, v2, p2, lo2, hi2 in seen:
                        if v2 == vip and p2 == proto and lo <= hi2 and lo2 <= hi:
                            raise ValueError(f"rules[{i}] overlaps rules[{j}] ({vip} {proto} "
                                             f"{max(lo, lo2)}-{min(hi, hi2)}); a packet must match one rule")
                    seen.append((i, vip, proto, lo, hi))
        return self

    @property
    def effective_rules(self) -> tuple[PortRule, ...]:
        return self.rules or (PortRule(),)

    @model_validator(mode="after")
    def _mac_fits_mode(self) -> "ClusterSection":
        if self.cluster_mac == "auto":
            return self
        first = int(self.cluster_mac[:2], 16)
        if self.mac_mode == "multicast" and not first & 1:
            raise ValueError(f"cluster_mac {self.cluster_mac} is not a multicast MAC (the first octet must "
                             "be odd) as mac_mode multicast needs")
        if self.mac_mode == "unicast-flood" and (first & 1 or not first & 2):
            raise ValueError(f"cluster_mac {self.cluster_mac} must be a locally administered unicast MAC "
                             "(first octet with bit 1 set and bit 0 clear, e.g. 02:...) for mac_mode "
                             "unicast-flood")
        return self


def _readable_file(v: str, what: str) -> str:
    """An absolute path to a readable, non-empty file; returns its text."""
    if not v.startswith("/"):
        raise ValueError("must be an absolute path")
    try:
        with open(v, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise ValueError(f"cannot read {v}: {exc.strerror}") from None
    if not data.strip():
        raise ValueError(f"{v} is empty; it must hold {what}")
    return data.decode("utf-8", "replace")


def _pem_file(v: str | None, kind: str, what: str) -> str | None:
    """A readable PEM file holding a ``-----BEGIN ...<kind>-----`` block (certificate or key)."""
    if v is None:
        return v
    text = _readable_file(v, what)
    if not re.search(rf"-----BEGIN [A-Z0-9 ]*{kind}-----", text):
        raise ValueError(f"{v} does not hold {what} (no '-----BEGIN ...{kind}-----' block found)")
    return v


def _cert_file(v: str | None) -> str | None:
    return _pem_file(v, "CERTIFICATE", "a PEM certificate")


def _key_file(v: str | None) -> str | None:
    return _pem_file(v, "PRIVATE KEY", "a PEM private key")


class EtcdSection(_Strict):
    endpoints: tuple[str, ...] = Field(min_length=1)
    prefix: str = "/nlbfarm"
    timeout: float = Field(default=1.0, gt=0, le=30)
    # How long a single etcd call may keep retrying before it is reported.
    retry_deadline: float = Field(default=10.0, gt=0, le=600)
    # TLS: ca_file verifies etcd's certificate (TLS is on when it is set);
    # cert_file + key_file are this node's client certificate, for an etcd
    # started with --client-cert-auth.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # etcd authentication (etcdctl auth enable). The password lives in
    # password_file, never in this file: the configuration is not a secret.
    username: str | None = None
    password_file: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inline_password(cls, data: object) -> object:
        if isinstance(data, dict) and "password" in data:
            # Never echo the value: it is a secret.
            raise ValueError("password: the etcd password is not accepted in the configuration; "
                             "write it to a file readable only by farmd and name that file in "
                             "etcd.password_file")
        return data

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for ep in v:
            _host_port(ep)
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or v.endswith("/") and v != "/":
            raise ValueError("must start with '/' and not end with '/'")
        return v

    @field_validator("ca_file", "cert_file")
    @classmethod
    def _certs(cls, v: str | None) -> str | None:
        return _cert_file(v)

    @field_validator("key_file")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        return _key_file(v)

    @field_validator("username")
    @classmethod
    def _username(cls, v: str | None) -> str | None:
        if v is not None and (not v or v != v.strip() or any(c in v for c in "\r\n")):
            raise ValueError("must be a non-empty etcd user name without surrounding spaces")
        return v

    @field_validator("password_file")
    @classmethod
    def _password_file(cls, v: str | None) -> str | None:
        if v is not None:
            _readable_file(v, "the etcd password")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "EtcdSection":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both (a client certificate and "
                             "its key) or neither")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("cert_file needs ca_file: the CA that signed etcd's server certificate")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together: give both or neither")
        schemes = {ep.split("://", 1)[0] for ep in self.endpoints if "://" in ep}
        if "https" in schemes and self.ca_file is None:
            raise ValueError("endpoints use https:// but ca_file is not set: TLS needs the CA that "
                             "signed etcd's certificate")
        if "http" in schemes and self.ca_file is not None:
            raise ValueError("endpoints use http:// but ca_file is set: write host:port or https://")
        return self

    @property
    def tls(self) -> bool:
        return self.ca_file is not None


class TimingSection(_Strict):
    # etcd 3.4 grants at least 1.5 x its election timeout (2 s by default).
    lease_ttl: int = Field(default=3, ge=1, le=300)
    # Seconds, to the millisecond: the fence element is written in nft's text
    # syntax, which carries millisecond timeouts (the JSON API does not).
    # The longest an element outlives the agent: peers that see the agent die
    # (node/liveness.py) take its buckets after this long. The keeper rewrites
    # it every min(0.25, keepalive_interval / 2, fence_timeout / 3) s.
    fence_timeout: float = Field(default=0.4, ge=0.1, le=299)
    keepalive_interval: float = Field(default=0.5, gt=0, le=60)
    # SIGTERM: how long to wait for peers to take over before leaving anyway.
    leave_timeout: float = Field(default=10.0, ge=0, le=3600)
    # How long a released bucket keeps serving its established connections
    # (rebalances and operator drains without their own timeout).
    drain_timeout: float = Field(default=300.0, ge=0, le=86400)
    # SIGTERM: how long established connections may take to finish before the
    # agent leaves. A supervisor's stop timeout must be longer.
    stop_drain_timeout: float = Field(default=30.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _safety(self) -> "TimingSection":
        # The handover argument needs the kernel fence to close before etcd can
        # expire the lease, with room for at least one keepalive in between.
        if self.fence_timeout >= self.lease_ttl:
            raise ValueError(f"fence_timeout ({self.fence_timeout:g} s) must be less than "
                             f"lease_ttl ({self.lease_ttl} s)")
        if self.keepalive_interval * 2 > self.lease_ttl - self.fence_timeout:
            raise ValueError(f"keepalive_interval ({self.keepalive_interval} s) must be at most half of "
                             f"lease_ttl - fence_timeout ({self.lease_ttl - self.fence_timeout:g} s)")
        return self


class StatusSection(_Strict):
    # Loopback by default: the status API is for the operator on the node.
    listen: str = "127.0.0.1:7400"
    # Optional LAN address for peers (read-only calls). Without it a node
    # cannot ask its peers whether etcd is down for everyone, and closes its
    # fence during any etcd outage.
    peer_listen: str | None = None
    # The host:port peers dial to reach peer_listen, published in this node's
    # member record. Needed when peer_listen binds a wildcard or loopback
    # address: peers dialing that address would reach themselves (and a node
    # asking "do you reach etcd?" would hear its own "no"). Default: peer_listen.
    peer_advertise: str | None = None

    @field_validator("peer_listen", "peer_advertise")
    @classmethod
    def _peer_listen(cls, v: str | None) -> str | None:
        return None if v is None else _host_port(v)

    @property
    def peer_address(self) -> str:
        """What peers dial: peer_advertise, else peer_listen ("" without a peer listener)."""
        return self.peer_advertise or self.peer_listen or ""

    # A file holding the token that mutating calls (drain, undrain) must send
    # as "authorization: Bearer <token>". Without it those calls are refused.
    token_file: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _host_port(v, min_port=0)  # port 0: pick a free port (tests)

    @field_validator("token_file")
    @classmethod
    def _token_file(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("must be an absolute path")
        return v

    # TLS on both listeners: this node's certificate and key. Unset: plaintext.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Mutual TLS: clients (farmctl, peers) must present a certificate signed
    # by this CA. Peer probes also verify the other nodes' server
    # certificates against it and present tls_cert_file as their client
    # certificate, so every node's certificate must be signed by this CA and
    # be valid for both server and client authentication.
    tls_client_ca_file: str | None = None

    @field_validator("tls_cert_file", "tls_client_ca_file")
    @classmethod
    def _tls_certs(cls, v: str | None) -> str | None:
        return _cert_file(v)

    @field_validator("tls_key_file")
    @classmethod
    def _tls_key(cls, v: str | None) -> str | None:
        return _key_file(v)

    @model_validator(mode="after")
    def _tls_consistent(self) -> "StatusSection":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: give both (the server "
                             "certificate and its key) or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file: "
                             "clients can only present a certificate to a TLS server")
        if self.peer_advertise and not self.peer_listen:
            raise ValueError("peer_advertise needs peer_listen: it is the address peers dial to reach it")
        if self.peer_listen and not self.peer_advertise:
            why = _not_routable(_host_of(self.peer_listen))
            if why:
                raise ValueError(
                    f"peer_listen {self.peer_listen} is {why}: peers cannot dial it (they would reach "
                    "themselves); set peer_advertise to the LAN host:port peers use to reach this node")
        if self.peer_advertise:
            why = _not_routable(_host_of(self.peer_advertise))
            if why:
                raise ValueError(f"peer_advertise {self.peer_advertise} is {why}: it must be an address "
                                 "peers can dial to reach this node")
        if self.peer_listen and self.tls_cert_file and self.tls_client_ca_file is None:
            raise ValueError("peer_listen with TLS needs tls_client_ca_file: peers verify each other's "
                             "certificates against that CA (and present their own)")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


class MetricsSection(_Strict):
    # Prometheus text exposition at http://<listen>/metrics; null turns it off.
    # Loopback by default, like the status API: bind a LAN address to scrape
    # from a Prometheus server.
    listen: str | None = "127.0.0.1:9740"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        return None if v is None else _host_port(v, min_port=0)


CHECK_TYPES = ("tcp", "http", "https", "process", "command")
# Fields each checker type needs (required) and may take (optional).
_CHECK_FIELDS = {
    "tcp": ({"port"}, {"host"}),
    "http": ({"url"}, {"expect_status", "body_match"}),
    "https": ({"url"}, {"expect_status", "body_match", "insecure", "ca_file"}),
    "process": (set(), {"process", "pid_file"}),
    "command": ({"command"}, set()),
}
_COMMON_CHECK_FIELDS = {"name", "type", "interval", "timeout", "rise", "fall"}


class CheckSpec(_Strict):
    """One health check of the farm module; all must pass for the node to take buckets."""

    name: SimpleName
    type: Annotated[str, _one_of(CHECK_TYPES)]
    interval: float = Field(default=1.0, ge=0.1, le=3600)
    timeout: float = Field(default=0.5, gt=0, le=600)
    # Consecutive results needed to flip: `rise` passes to become healthy,
    # `fall` failures to become failed (HAProxy's and SafeKit's counts).
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=2, ge=1, le=100)
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535)
    url: str | None = None
    expect_status: tuple[int, ...] = ()  # empty: any 2xx or 3xx
    body_match: str | None = None        # a regular expression searched in the body
    insecure: bool = False               # https: do not verify the certificate
    ca_file: str | None = None
    process: str | None = None           # process name (comm) to look for
    pid_file: str | None = None
    command: str | None = None           # run by /bin/sh -c; exit 0 passes

    @field_validator("expect_status")
    @classmethod
    def _status(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        for code in v:
            if not 100 <= code <= 599:
                raise ValueError(f"{code} is not an HTTP status code")
        return v

    @field_validator("body_match")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"is not a valid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _fields_fit_type(self) -> "CheckSpec":
        required, optional = _CHECK_FIELDS[self.type]
        given = {k for k in self.model_fields_set if k not in _COMMON_CHECK_FIELDS}
        missing = sorted(required - given)
        if missing:
            raise ValueError(f"check {self.name!r} of type {self.type} needs {', '.join(missing)}")
        stray = sorted(given - required - optional)
        if stray:
            raise ValueError(f"check {self.name!r} of type {self.type} does not take {', '.join(stray)}")
        if self.type == "process" and (self.process is None) == (self.pid_file is None):
            raise ValueError(f"check {self.name!r} of type process needs exactly one of process, pid_file")
        if self.url is not None:
            scheme = self.url.split("://", 1)[0] if "://" in self.url else ""
            if scheme != self.type:
                raise ValueError(f"check {self.name!r} of type {self.type} needs a {self.type}:// url, "
                                 f"got {self.url!r}")
        if self.timeout > self.interval:
            raise ValueError(f"check {self.name!r}: timeout ({self.timeout} s) must not exceed "
                             f"interval ({self.interval} s)")
        return self


MODULE_ACTIONS = ("withdraw", "restart", "stop")


class ModuleSection(_Strict):
    """The farm module: the application this node serves, its commands and its checks.

    Like SafeKit's start_both/stop_both scripts: `start` and `stop` are shell
    commands that return once the application is started or stopped.
    """

    name: SimpleName = "app"
    start: str | None = None
    stop: str | None = None
    command_timeout: float = Field(default=30.0, gt=0, le=3600)
    checks: tuple[CheckSpec, ...] = ()
    # What a failed check does. Every action first withdraws the node from
    # the table; "restart" then runs stop + start (at most restart_limit times
    # in restart_window s, then it stays withdrawn), "stop" stops the
    # application and keeps the node out until the agent restarts.
    on_failure: Annotated[str, _one_of(MODULE_ACTIONS)] = "withdraw"
    restart_limit: int = Field(default=3, ge=1, le=100)
    restart_window: float = Field(default=600.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _consistent(self) -> "ModuleSection":
        names = [c.name for c in self.checks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"check names must be unique: {', '.join(dup)} used twice")
        if self.on_failure == "restart" and not (self.start and self.stop):
            raise ValueError("on_failure: restart needs both start and stop commands")
        if self.on_failure == "stop" and not self.stop:
            raise ValueError("on_failure: stop needs a stop command")
        return self


class NftSection(_Strict):
    table: str = "nlbfarm"

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z][A-Za-z0-9_]{0,31}$", v):
            raise ValueError("must be a letter followed by up to 31 letters, digits or '_'")
        return v


class Config(_Strict):
    node: NodeSection
    cluster: ClusterSection
    etcd: EtcdSection
    timing: TimingSection = TimingSection()
    status: StatusSection = StatusSection()
    nft: NftSection = NftSection()
    metrics: MetricsSection = MetricsSection()
    module: ModuleSection = ModuleSection()

    @model_validator(mode="after")
    def _etcd_timeout_fits(self) -> "Config":
        # One keepalive attempt must not outlast the window in which the fence
        # may still be extended, or a slow etcd would close a healthy node.
        window = self.timing.lease_ttl - self.timing.fence_timeout
        if self.etcd.timeout * 2 > window:
            raise ValueError(f"etcd.timeout ({self.etcd.timeout} s) must be at most half of "
                             f"timing.lease_ttl - timing.fence_timeout ({window:g} s)")
        from nlbfarm.node.decide import Timing  # the safety argument's own inequalities
        problems = Timing.from_config(self).problems()
        if problems:
            raise ValueError("timing: " + "; ".join(problems))
        return self

    @property
    def key_prefix(self) -> str:
        """Where this cluster lives in etcd: <etcd.prefix>/<cluster.name>."""
        return f"{self.etcd.prefix.rstrip('/')}/{self.cluster.name}"


MAX_CONFIG_BYTES = 1 << 20  # a configuration is a few KB; refuse to parse a runaway file


def yaml_lines(text: str) -> dict[tuple, int]:
    """The line (1-based) of every mapping key and sequence item in a YAML text, by path.

    Raises ConfigError for a key that appears twice in one mapping: PyYAML keeps
    the last one silently, so a second ``timing:`` section would replace the first.
    """
    out: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name in seen:
                    raise ConfigError(f"key {'.'.join(map(str, (*path, name)))!s} appears twice (lines "
                                      f"{seen[name]} and {key.start_mark.line + 1}): YAML would keep only "
                                      "the second")
                seen[name] = key.start_mark.line + 1
                out[(*path, name)] = key.start_mark.line + 1
                walk(value, (*path, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    return out


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int | None:
    """The line of the deepest part of ``loc`` the file has (a missing field: its section)."""
    for n in range(len(loc), 0, -1):
        if tuple(loc[:n]) in lines:
            return lines[tuple(loc[:n])]
    return None


def _format_errors(source: str, exc: ValidationError, lines: dict[tuple, int] | None = None) -> str:
    out = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        line = _line_of(tuple(err["loc"]), lines or {})
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling against the configuration reference)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        msg = msg.removeprefix("Value error, ")
        out.append(f"  {where}: {msg}" + (f" (line {line})" if line is not None else ""))
    return f"invalid configuration in {source}:\n" + "\n".join(out)


def parse_config(data: object, source: str = "<config>", lines: dict[tuple, int] | None = None) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc, lines)) from None


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {p}: {exc.strerror}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"configuration {p} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        lines = yaml_lines(text) if text.strip() else {}
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # its text names the line and column
        raise ConfigError(f"configuration {p} is not valid YAML: {' '.join(str(exc).split())}") from None
    except ConfigError as exc:
        raise ConfigError(f"configuration {p}: {exc}") from None
    return parse_config(data, str(p), lines)


def effective_yaml(cfg: Config) -> str:
    """The configuration as farmd runs it: every field, defaults filled in (farmd --check --print)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def json_schema() -> dict:
    """The JSON Schema of farmd.yaml, from the model (shipped as nlbfarm/farmd.schema.json)."""
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "farmd.yaml: the nlbfarm agent's configuration"
    return schema


SCHEMA_FILE = Path(__file__).with_name("farmd.schema.json")
