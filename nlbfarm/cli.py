"""farmctl: the operator CLI.

Exit codes: 0 healthy / done, 1 the farm answered but is not healthy,
2 bad arguments or the agent refused the call, 3 a lab operation failed,
4 nothing answered at the agent's address, 130 interrupted (Ctrl-C).
Errors are one line on stderr (NLBFARM_DEBUG=1 adds the traceback of an
unexpected one); progress goes to stderr, results to stdout.

Changes (drain, undrain) send the agent's API token: --token-file, else the
file named by $NLBFARM_TOKEN_FILE, else the configuration file's token_file,
else /etc/nlbfarm/token when it exists. The token is sent in plaintext only
to a loopback target or inside a lab namespace (--netns); to any other target
farmctl refuses unless the connection speaks TLS or --insecure-send-token is
given.

Connection (an agent whose API speaks TLS): each of --tls-ca, --tls-cert,
--tls-key, --tls-server-name and --target is taken from the command line,
else from $NLBFARM_TLS_CA, $NLBFARM_TLS_CERT, $NLBFARM_TLS_KEY,
$NLBFARM_TLS_SERVER_NAME, else from the configuration file: --config, else
$NLBFARM_CONFIG, else /etc/nlbfarm/farmctl.yaml when it exists. That file is
either a farmctl.yaml (keys target, tls_ca, tls_cert, tls_key,
tls_server_name, token_file) or farmd's own farmd.yaml, from whose status
section farmctl takes listen, token_file and, for mutual TLS, the node's
certificate and key as its client certificate and tls_client_ca_file as the
CA of the agent's certificate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

from nlbfarm.errors import AgentUnreachable, FarmError, LabError

EXIT_OK, EXIT_UNHEALTHY, EXIT_ERROR, EXIT_LAB, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
DEFAULT_TOKEN_FILE = "/etc/nlbfarm/token"
DEFAULT_CONFIG_FILE = "/etc/nlbfarm/farmctl.yaml"
DEFAULT_TARGET = "127.0.0.1:7400"
# farmctl.yaml keys; each has an --option and an $NLBFARM_ variable of the same name.
CLIENT_KEYS = ("target", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token_file")
# Member states that mean a node that should serve does not.
UNHEALTHY_STATES = ("starting", "failed", "stopped")
# The namespace _reexec_in_netns ran this command in: the command inside no
# longer sees --netns, and must know it for the token check (_inside_netns).
NETNS_ENV = "NLBFARM_NETNS"
NETNS_DIR = "/run/netns"  # where `ip netns` keeps its named namespaces


def _reexec_in_netns(netns: str, argv: list[str]) -> None:
    """Run this same command inside a network namespace (setns before any thread exists)."""
    from nlbfarm.node import iplib
    if netns not in iplib.list_netns():
        print(f"farmctl: network namespace {netns!r} does not exist", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    os.execvpe("ip", ["ip", "netns", "exec", netns, sys.executable, "-m", "nlbfarm.cli", *argv],
               {**os.environ, NETNS_ENV: netns})


def _inside_netns() -> str | None:
    """The namespace --netns re-executed farmctl into, if this process really runs in it.

    Checked, not trusted: a $NLBFARM_NETNS left in an environment outside the
    namespace does not count (same device and inode as `ip netns identify`).
    """
    name = os.environ.get(NETNS_ENV)
    if not name or "/" in name:
        return None
    try:
        ns, mine = os.stat(os.path.join(NETNS_DIR, name)), os.stat("/proc/self/ns/net")
    except OSError:
        return None
    return name if (ns.st_dev, ns.st_ino) == (mine.st_dev, mine.st_ino) else None


def _strip_netns(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--netns":
            skip = True
            continue
        if a.startswith("--netns="):
            continue
        out.append(a)
    return out


# ---- connection: target and TLS ------------------------------------------------


@dataclass(frozen=True)
class Connection:
    """Where farmctl talks to and how: ``tls`` is None for plaintext."""

    target: str = DEFAULT_TARGET
    tls: object = None  # nlbfarm.tls.ClientTLS
    token_file: str | None = None  # from the configuration file
    # Where each TLS setting came from (an option, a variable, a file key), for messages.
    sources: dict = field(default_factory=dict, compare=False)

    def name(self, key: str) -> str:
        return self.sources.get(key) or "--" + key.replace("_", "-")


def _as_conn(target) -> Connection:
    return target if isinstance(target, Connection) else Connection(target=target)


def _local_target(listen: str | None) -> str | None:
    """farmd's status.listen as an address to dial: a wildcard bind is reached on loopback."""
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    if port == "0":
        return None
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"{host}:{port}"


def read_client_config(path: str) -> dict:
    """The connection settings in a farmctl.yaml, or in a farmd.yaml's status section."""
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise FarmError(f"cannot read configuration {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise FarmError(f"configuration {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FarmError(f"configuration {path}: the top level must be a mapping")
    if "status" in data or "node" in data or "etcd" in data:  # farmd's configuration
        st = data.get("status") or {}
        if not isinstance(st, dict):
            raise FarmError(f"configuration {path}: status must be a mapping")
        out = {"target": _local_target(st.get("listen")), "token_file": st.get("token_file")}
        if st.get("tls_cert_file"):
            if st.get("tls_client_ca_file"):
                # Mutual TLS: the node's certificate (signed by the farm CA, like
                # its peers') is farmctl's client certificate too.
                out.update(tls_ca=st["tls_client_ca_file"], tls_cert=st["tls_cert_file"],
                           tls_key=st.get("tls_key_file"))
            else:
                out["tls_needs_ca"] = True
        return {k: v for k, v in out.items() if v}
    unknown = sorted(set(data) - set(CLIENT_KEYS))
    if unknown:
        raise FarmError(f"configuration {path}: unknown key {', '.join(map(str, unknown))} "
                        f"(known: {', '.join(CLIENT_KEYS)})")
    for k, v in data.items():
        if v is not None and not isinstance(v, str):
            raise FarmError(f"configuration {path}: {k} must be a string")
    return {k: v for k, v in data.items() if v}


def connection(args) -> Connection:
    """The target and TLS settings: options, else $NLBFARM_* variables, else the configuration file."""
    from nlbfarm.tls import ClientTLS
    path = getattr(args, "config", None) or os.environ.get("NLBFARM_CONFIG")
    if not path and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    file_cfg = read_client_config(path) if path else {}
    values, sources = {}, {}
    for key in CLIENT_KEYS:
        opt, env = getattr(args, key, None), f"NLBFARM_{key.upper()}"
        if opt:
            values[key], sources[key] = opt, "--" + key.replace("_", "-")
        elif key not in ("token_file",) and os.environ.get(env):
            values[key], sources[key] = os.environ[env], f"${env}"
        elif file_cfg.get(key):
            values[key], sources[key] = file_cfg[key], f"{key} in {path}"
    ca, cert, key = values.get("tls_ca"), values.get("tls_cert"), values.get("tls_key")
    if bool(cert) != bool(key):
        raise FarmError("--tls-cert and --tls-key go together: the client certificate and its key "
                        f"(got only {sources.get('tls_cert') or sources.get('tls_key')})")
    if file_cfg.get("tls_needs_ca") and not ca:
        raise FarmError(f"{path}: the agent speaks TLS (status.tls_cert_file) but the file does not name the CA "
                        "that signed its certificate (status.tls_client_ca_file is unset): give --tls-ca")
    tls = None
    if ca or cert:
        tls = ClientTLS(ca_file=ca, cert_file=cert, key_file=key, server_name=values.get("tls_server_name"),
                        names=(sources.get("tls_ca", "--tls-ca"), sources.get("tls_cert", "--tls-cert"),
                               sources.get("tls_key", "--tls-key")))
    elif values.get("tls_server_name"):
        raise FarmError(f"{sources['tls_server_name']} needs TLS: give --tls-ca")
    return Connection(target=values.get("target") or DEFAULT_TARGET, tls=tls,
                      token_file=file_cfg.get("token_file") if "token_file" in file_cfg else None,
                      sources=sources)


def tls_hint(conn: Connection, problem: str | None) -> str | None:
    """What to do about a TLS problem found on the way to the agent."""
    from nlbfarm import tls as t
    where = f"the agent at {conn.target}"
    ca = f"{conn.tls.ca_file} ({conn.name('tls_ca')})" if conn.tls and conn.tls.ca_file else "gRPC's default roots"
    cert = f"{conn.tls.cert_file} ({conn.name('tls_cert')})" if conn.tls and conn.tls.cert_file else ""
    return {
        t.NEEDS_TLS: f"{where} speaks TLS and farmctl connected in plaintext: give the CA that signed its "
                     "certificate with --tls-ca (or $NLBFARM_TLS_CA, or --config)",
        t.NOT_TLS: f"{where} speaks plaintext (its status.tls_* are unset) and farmctl used TLS: drop "
                   f"{conn.name('tls_ca')} and the other TLS settings",
        t.UNTRUSTED: f"{where} presented a certificate that is not signed by the CA in {ca}, "
                     "or that has expired",
        t.NAME_MISMATCH: f"{where} presented a certificate that does not name {conn.target.rpartition(':')[0]}: "
                         "give --tls-server-name with a name from its subjectAltName",
        t.CERT_REQUIRED: f"{where} requires a client certificate (mutual TLS: its status.tls_client_ca_file is "
                         "set): give --tls-cert and --tls-key (or $NLBFARM_TLS_CERT and $NLBFARM_TLS_KEY)",
        t.CERT_REFUSED: f"{where} refused the client certificate {cert}: it is not signed by "
                        "the agent's status.tls_client_ca_file, has expired, or is not for client authentication",
    }.get(problem)


def rpc_failure(conn: Connection, method: str, exc, what: str | None = None) -> FarmError:
    """A FarmError for a failed call; a TLS mismatch is named with what to change."""
    import grpc

    from nlbfarm import tls as t
    code, details = exc.code(), exc.details() or ""
    what = what or f"{method} on {conn.target} failed"
    if code == grpc.StatusCode.UNAVAILABLE:
        problem = t.classify(details, conn.tls is not None, bool(conn.tls and conn.tls.cert_file))
        if problem is None:
            problem = t.probe(conn.target, conn.tls)
        hint = tls_hint(conn, problem)
        if hint:
            return FarmError(f"{what}: {hint} ({code.name}: {details})")
        return AgentUnreachable(f"{what}: nothing answers there ({code.name}: {details}); is farmd running "
                                "and is this its status.listen?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return AgentUnreachable(f"{what}: no answer in time ({code.name}: {details})")
    return FarmError(f"{what}: {code.name}: {details}")


def _channel(conn: Connection):
    from nlbfarm.tls import channel
    return channel(conn.target, conn.tls)


_INT64_TYPES = (3, 4, 6, 16, 18)  # FieldDescriptor.TYPE_INT64, UINT64, FIXED64, SFIXED64, SINT64


def message_dict(msg) -> dict:
    """A reply as a dict with every field, named as in the proto. 64-bit integers are numbers:
    proto3's JSON mapping writes them as strings, which scripts then have to convert."""
    from google.protobuf.json_format import MessageToDict
    d = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(msg.DESCRIPTOR, d)


def _numbers(desc, d: dict) -> dict:
    for f in desc.fields:
        if f.name not in d:
            continue
        v = d[f.name]
        if f.type in _INT64_TYPES:
            d[f.name] = [int(x) for x in v] if isinstance(v, list) else int(v)
        elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, dict):
                    _numbers(f.message_type, item)
    return d


def fetch_status(target, timeout: float) -> dict:
    import grpc

    from nlbfarm.proto import farm_pb2, farm_pb2_grpc
    conn = _as_conn(target)
    with _channel(conn) as ch:
        stub = farm_pb2_grpc.FarmStub(ch)
        try:
            resp = stub.GetStatus(farm_pb2.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise rpc_failure(conn, "GetStatus", exc, f"cannot get status from {conn.target}") from None
    return message_dict(resp)


def _stub(target):
    from nlbfarm.proto import farm_pb2_grpc
    ch = _channel(_as_conn(target))
    return ch, farm_pb2_grpc.FarmStub(ch)


def token_metadata(args) -> tuple:
    """('authorization', 'Bearer ...') from --token-file / $NLBFARM_TOKEN_FILE / the configuration
    file's token_file / the default file."""
    conn = getattr(args, "conn", None)
    path = (getattr(args, "token_file", None) or os.environ.get("NLBFARM_TOKEN_FILE")
            or (conn.token_file if conn else None))
    if not path:
        if not os.path.exists(DEFAULT_TOKEN_FILE):
            return ()
        path = DEFAULT_TOKEN_FILE
    try:
        token = open(path).read().strip()
    except OSError as exc:
        raise FarmError(f"cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise FarmError(f"token file {path} is empty")
    return (("authorization", f"Bearer {token}"),)


def _is_loopback(target: str) -> bool:
    """``target`` is on this machine's loopback: 127.0.0.0/8, ::1, localhost, or a unix socket."""
    import ipaddress

    from nlbfarm.tls import split_target
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host_port = split_target(target)
    if host_port is None:  # another gRPC target form (dns:///...): not known to be local
        return False
    host = host_port[0].lower()
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def plaintext_token_problem(conn: Connection, netns: str | None) -> str | None:
    """Why sending the token to ``conn`` would show it to the network, or None.

    ``netns``: farmctl runs inside that namespace (--netns). That counts as
    local: --netns is for the lab's namespaces, which `farmctl lab up` makes on
    this machine, joined by veth pairs and a bridge that never leave it.
    """
    if conn.tls is not None or netns or _is_loopback(conn.target):
        return None
    return (f"refusing to send the API token in plaintext to {conn.target}, which is not a loopback "
            "address: anyone on the network path could read it and drain the farm. Speak TLS to the agent "
            "with --tls-ca (or $NLBFARM_TLS_CA, or --config), or pass --insecure-send-token if you really "
            "mean to send it unencrypted")


def change_metadata(args) -> tuple:
    """token_metadata(args) for Drain and Undrain, refused before connecting when it would
    cross the network in clear (exit 2), unless --insecure-send-token."""
    metadata = token_metadata(args)
    problem = plaintext_token_problem(args.conn, _inside_netns()) if metadata else None
    if problem:
        if not getattr(args, "insecure_send_token", False):
            raise FarmError(problem)
        print(f"farmctl: warning: sending the API token in plaintext to {args.conn.target} "
              "(--insecure-send-token): anyone on the network path can read it", file=sys.stderr)
    return metadata


def _rpc(target, method: str, request, timeout: float, metadata: tuple = ()):
    import grpc
    conn = _as_conn(target)
    ch, stub = _stub(conn)
    with ch:
        try:
            return getattr(stub, method)(request, timeout=timeout, metadata=metadata or None)
        except grpc.RpcError as exc:
            raise rpc_failure(conn, method, exc) from None


def member_of(st: dict, node: str) -> dict | None:
    return next((m for m in st.get("members", []) if m["id"] == node), None)


def drain_progress(st: dict, node: str) -> tuple[bool, str]:
    m = member_of(st, node)
    if m is None:
        return False, f"{node} is not a member"
    buckets, dbuckets = int(m.get("buckets", 0)), int(m.get("draining_buckets", 0))
    conns = int(m.get("draining_connections", 0))
    done = m.get("state") == "draining" and buckets == 0 and dbuckets == 0
    return done, (f"{node}: state {m.get('state')}, {buckets} buckets owned, {dbuckets} draining "
                  f"with {conns} connections left")


def cmd_drain(args) -> int:
    from nlbfarm.proto import farm_pb2
    metadata = change_metadata(args)
    resp = _rpc(args.conn, "Drain", farm_pb2.DrainRequest(node_id=args.node, timeout_s=args.timeout or 0),
                args.rpc_timeout, metadata)
    if not args.wait:
        print(json.dumps({"node": args.node, "message": resp.message}) if args.json else resp.message)
        return EXIT_OK
    deadline = time.monotonic() + args.wait_timeout
    last = ""
    while True:
        st = fetch_status(args.conn, args.rpc_timeout)
        done, line = drain_progress(st, args.node)
        if line != last:
            print(line, file=sys.stderr, flush=True)  # progress; the result goes to stdout
            last = line
        if done:
            if args.json:
                print(json.dumps({"node": args.node, "drained": True, "status": member_of(st, args.node)}))
            else:
                print(f"{args.node} is drained: it serves no connection")
            return EXIT_OK
        if time.monotonic() > deadline:
            print(f"farmctl: {args.node} not drained after {args.wait_timeout:.0f}s ({line})", file=sys.stderr)
            return EXIT_UNHEALTHY
        time.sleep(0.5)


# Bounds on --from-file: what one batch reads and asks.
MAX_FROM_FILE = 8 << 20
MAX_CLIENTS = 100_000
# Source ports sampled for a client given without a port: spread over the
# whole range Linux, Windows and BSD clients pick ephemeral ports from.
SAMPLE_PORTS = tuple(range(1024, 65536, 1009))


def parse_client(text: str) -> tuple[str, int | None]:
    """CLIENT[:PORT] -> (ip, port or None); the bucket depends on address and port.

    IPv6 clients are written as ``2001:db8::3`` or, with a port, ``[2001:db8::3]:40000``.
    """
    import ipaddress
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise FarmError(f"{text!r}: write an IPv6 client with a port as [ADDRESS]:PORT")
        port = rest[1:] if rest else None
    elif text.count(":") > 1:  # a bare IPv6 address
        host, port = text, None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, None
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise FarmError(f"{text!r}: {host!r} is not an IP address") from None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise FarmError(f"{text!r}: port must be 1..65535")
    return host, int(port)


def cmd_which(args) -> int:
    """One client, or many (--from-file, one CLIENT:PORT per line) over a single connection."""
    from nlbfarm.proto import farm_pb2
    if args.from_file:
        try:
            with (open(args.from_file) if args.from_file != "-" else sys.stdin) as f:
                lines = f.read(MAX_FROM_FILE + 1).split()
        except OSError as exc:
            raise FarmError(f"cannot read --from-file {args.from_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise FarmError(f"--from-file {args.from_file} is not text") from None
        if len(lines) > MAX_CLIENTS:
            raise FarmError(f"--from-file {args.from_file}: more than {MAX_CLIENTS} clients; split it")
        clients = [parse_client(x) for x in lines]
    elif args.client:
        clients = [parse_client(args.client)]
    else:
        raise FarmError("give CLIENT:PORT or --from-file FILE")
    import grpc
    ch, stub = _stub(args.conn)
    out = []

    def which(ip, port):
        try:
            return stub.Which(farm_pb2.WhichRequest(client_ip=ip, client_port=port, vip=args.vip or "",
                                                    vip_port=args.port or 0, protocol=args.protocol or ""),
                              timeout=args.rpc_timeout)
        except grpc.RpcError as exc:
            raise rpc_failure(args.conn, "Which", exc) from None

    with ch:
        for ip, port in clients:
            if port is None:
                # No port: the answer is a spread, not one node.
                rs = [which(ip, p) for p in SAMPLE_PORTS]
                spread: dict[str, int] = {}
                for r in rs:
                    spread[r.node_id or "nobody"] = spread.get(r.node_id or "nobody", 0) + 1
                out.append({"client": ip, "port": None, "sampled_ports": len(rs),
                            "nodes": dict(sorted(spread.items())), "generation": rs[-1].generation})
                continue
            r = which(ip, port)
            out.append({"client": f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", "bucket": r.bucket, "node": r.node_id,
                        "generation": r.generation, "draining_on": list(r.draining_on), "rule": r.rule})
    if args.json:
        print(json.dumps(out if args.from_file else out[0], indent=None if args.from_file else 2))
    else:
        for o in out:
            if "nodes" in o:
                print(f"{o['client']} (no port given): the bucket depends on the client's source port; of "
                      f"{o['sampled_ports']} sampled ports: "
                      + ", ".join(f"{n} {c}" for n, c in o["nodes"].items())
                      + f" (table generation {o['generation']})")
                continue
            extra = f" (old connections still on {','.join(o['draining_on'])})" if o["draining_on"] else ""
            print(f"{o['client']} -> bucket {o['bucket']} -> {o['node'] or 'nobody'} "
                  f"(table generation {o['generation']}; rule: {o['rule']}){extra}")
    return EXIT_OK


def cmd_members(args) -> int:
    st = fetch_status(args.conn, args.rpc_timeout)
    problems = farm_problems(st)
    if args.json:
        print(json.dumps(st["members"], indent=2))
    else:
        print("\n".join(render_status(st).split("\n")[4:]))
    return EXIT_UNHEALTHY if problems else EXIT_OK


def fetch_node(target, timeout: float) -> dict:
    from nlbfarm.proto import farm_pb2
    return message_dict(_rpc(target, "GetNode", farm_pb2.GetNodeRequest(), timeout))


def render_node(v: dict) -> str:
    ranges = ", ".join(f"{r['first']}-{r['last']}" if r["first"] != r["last"] else str(r["first"])
                       for r in v["accepting_ranges"]) or "none"
    lines = [f"node {v['node_id']} ({v['version']}): {v['state']} - {v['state_reason']}",
             f"table generation {v['generation']}, applied {v['applied_generation']}; accepting "
             f"{v['accepting_buckets']} of {v['owned_buckets']} owned buckets ({ranges})",
             f"draining {v['draining_buckets']} buckets with {v['draining_connections']} connections; "
             f"fence {'open' if v['fence_open'] else 'CLOSED'}; etcd {v['etcd_state']}, last keepalive "
             f"{float(v['last_keepalive_age_s']):.1f} s ago, lease {v['lease_id'] or '-'}",
             f"last cycle: {v['last_cycle']}", ""]
    if v["checks"]:
        lines.append(f"module {v['module']} ({v['restarts_in_window']} restarts in window)")
        lines.append(f"{'CHECK':<16} {'TYPE':<8} {'STATE':<8} {'FOR':>7} {'FLIPS':>5}  LAST RESULT")
        for c in v["checks"]:
            lines.append(f"{c['name']:<16} {c['type']:<8} {c['state']:<8} {float(c['since_s']):>6.0f}s "
                         f"{int(c['transitions']):>5}  {c['detail']}")
        lines.append("")
    lines.append(f"{'VIP':<16} {'RULE':<16} {'PACKETS':>12} {'BYTES':>14}")
    for c in v["counters"]:
        lines.append(f"{c['vip']:<16} {c['rule']:<16} {int(c['packets']):>12} {int(c['bytes']):>14}")
    return "\n".join(lines)


def cmd_node(args) -> int:
    v = fetch_node(args.conn, args.rpc_timeout)
    if args.json:
        print(json.dumps(v, indent=2))
    else:
        print(render_node(v))
    ok = v["state"] in ("active", "draining") and v["fence_open"] and all(
        c["state"] == "passing" for c in v["checks"])
    return EXIT_OK if ok else EXIT_UNHEALTHY


def render_event(e: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(float(e["time"])))
    who = f" {e['node_id']}" if e.get("node_id") else ""
    return f"{when} {e['kind']:<17}{who}: {e['message']}"


def cmd_version(args) -> int:
    """This farmctl's version and, unless --client, the version of the agent it talks to."""
    from nlbfarm import __version__
    out = {"client": __version__}
    if not args.json:
        print(f"farmctl {__version__}", flush=True)  # even when the agent does not answer
    if not args.client:
        v = fetch_node(args.conn, args.rpc_timeout)
        out["agent"] = {"node_id": v["node_id"], "version": v["version"], "target": args.conn.target}
        if not args.json:
            print(f"farmd {v['version']} on {v['node_id']} ({args.conn.target})")
    if args.json:
        print(json.dumps(out, indent=2))
    return EXIT_OK


def cmd_events(args) -> int:
    """Recent events; with --follow keep printing new ones (until --for seconds or Ctrl-C)."""
    import grpc

    from nlbfarm.proto import farm_pb2
    ch, stub = _stub(args.conn)
    with ch:
        call = stub.WatchEvents(farm_pb2.WatchEventsRequest(replay=not args.new_only, follow=args.follow),
                                timeout=args.for_seconds if args.follow else args.rpc_timeout)
        try:
            for ev in call:
                e = message_dict(ev)
                print(json.dumps(e) if args.json else render_event(e), flush=True)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and args.follow:
                return EXIT_OK  # --for ran out: the normal end of a bounded follow
            raise rpc_failure(args.conn, "WatchEvents", exc) from None
        except KeyboardInterrupt:
            call.cancel()
            return EXIT_OK
    if args.follow:
        # The agent ended the stream: it is stopping (or restarting).
        print(f"farmctl: the event stream from {args.conn.target} ended: the agent stopped", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_table(args) -> int:
    from nlbfarm.proto import farm_pb2
    t = message_dict(_rpc(args.conn, "GetTable", farm_pb2.GetTableRequest(), args.rpc_timeout))
    if args.json:
        print(json.dumps(t, indent=2))
        return EXIT_OK
    print(f"table generation {t['generation']}, {t['bucket_count']} buckets, {t['unowned']} unowned")
    w = id_width(n["node_id"] for n in t["nodes"])
    for n in t["nodes"]:
        ranges = ", ".join(f"{r['first']}-{r['last']}" if r["first"] != r["last"] else str(r["first"])
                           for r in n["ranges"])
        print(f"{n['node_id']:<{w}} {n['buckets']:>6} buckets: {ranges}")
    return EXIT_OK


def cmd_undrain(args) -> int:
    from nlbfarm.proto import farm_pb2
    metadata = change_metadata(args)
    resp = _rpc(args.conn, "Undrain", farm_pb2.UndrainRequest(node_id=args.node), args.rpc_timeout, metadata)
    print(json.dumps({"node": args.node, "message": resp.message}) if args.json else resp.message)
    return EXIT_OK


def farm_problems(st: dict) -> list[str]:
    """Why the farm, as this node sees it, is not healthy (empty: healthy)."""
    out = []
    g = int(st.get("generation", 0))
    digests = {m.get("rules") for m in st.get("members", []) if m.get("rules")}
    if len(digests) > 1:
        out.append("members disagree on traffic rules (cluster.vips, rules, unmatched): " + ", ".join(
            f"{m['id']}={m['rules']}" for m in st.get("members", []) if m.get("rules")))
    for m in st.get("members", []):
        if m.get("state") in UNHEALTHY_STATES:
            out.append(f"{m['id']} is {m['state']}" + (f": {m['reason']}" if m.get("reason") else ""))
        elif m.get("state") == "active" and int(m.get("applied_generation", 0)) != g:
            out.append(f"{m['id']} has not applied table generation {g} yet")
    return out


def local_problems(st: dict) -> list[str]:
    out = []
    if not st.get("fence_open"):
        out.append("this node's fence is closed")
    if st.get("etcd_state") != "connected":
        out.append(f"etcd {st.get('etcd_state')}")
    g = int(st.get("generation", 0))
    if g == 0:
        out.append("no bucket table yet")
    elif int(st.get("applied_generation", 0)) != g:
        out.append(f"this node applied generation {st.get('applied_generation', 0)}, not {g}")
    if int(st.get("accepting_buckets", 0)) != int(st.get("owned_buckets", 0)):
        out.append(f"accepting {st.get('accepting_buckets', 0)} of {st.get('owned_buckets', 0)} owned buckets")
    return out


def status_healthy(st: dict) -> bool:
    return not local_problems(st) and not farm_problems(st)


def id_width(ids) -> int:
    """The node-id column: as wide as the longest id (node ids may be 64 characters)."""
    return max([12, *(len(i) for i in ids)])


def render_status(st: dict) -> str:
    b = int(st.get("bucket_count", 0)) or 1
    lines = [
        f"node {st['node_id']}  cluster {st['cluster']}  table generation {st.get('generation', 0)}  "
        f"buckets {b}",
        f"local: applied generation {st.get('applied_generation', 0)}, accepting "
        f"{st.get('accepting_buckets', 0)} of {st.get('owned_buckets', 0)} owned buckets, "
        f"fence {'open' if st.get('fence_open') else 'CLOSED'}, etcd {st.get('etcd_state')}",
        f"last cycle: {st.get('last_cycle', '')}",
        "",
    ]
    w = id_width(m["id"] for m in st.get("members", []))
    lines.append(f"{'MEMBER':<{w}} {'STATE':<9} {'WEIGHT':>6} {'BUCKETS':>8} {'SHARE':>7} {'APPLIED':>8} "
                 f"{'DRAINING':>9}  ADDRESSES")
    for m in st.get("members", []):
        n = int(m.get("buckets", 0))
        draining = (f"{int(m.get('draining_connections', 0))} conns" if int(m.get("draining_buckets", 0))
                    else "-")
        lines.append(f"{m['id']:<{w}} {m.get('state', ''):<9} {int(m.get('weight', 0)):>6} {n:>8} "
                     f"{100 * n / b:>6.1f}% {int(m.get('applied_generation', 0)):>8} {draining:>9}  "
                     f"{','.join(m.get('addresses', []))}")
    why = [f"  {m['id']}: {m['reason']}" for m in st.get("members", [])
           if m.get("state") != "active" and m.get("reason")]
    if why:
        lines += ["", "why not active:", *why]
    return "\n".join(lines)


def cmd_status(args) -> int:
    st = fetch_status(args.conn, args.timeout)
    problems = local_problems(st) + farm_problems(st)
    if args.json:
        st["healthy"] = not problems
        st["problems"] = problems
        print(json.dumps(st, indent=2))
    else:
        print(render_status(st))
        print(f"\nhealth: {'ok' if not problems else 'NOT healthy: ' + '; '.join(problems)}")
    return EXIT_OK if not problems else EXIT_UNHEALTHY


def _lab(args):
    from nlbfarm.lab import Lab
    quiet = getattr(args, "json", False)
    return Lab(prefix=args.prefix, ipv6=getattr(args, "ipv6", False), tls=getattr(args, "tls", False),
               progress=(lambda m: None) if quiet else
               (lambda m: print(f"lab: {m}", file=sys.stderr, flush=True)))


def cmd_lab_up(args) -> int:
    lab = _lab(args)
    st = lab.up(nodes=args.nodes)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(render_lab_status(st))
    return EXIT_OK


def render_lab_status(st: dict) -> str:
    lines = [f"lab {st['prefix']}: VIP {st['vip']}  app {st['url']}  subnet {st['subnet']}",
             *([f"IPv6 VIP {st['vip6']}  app {st['url6']}"] if "vip6" in st else []),
             f"etcd {st['etcd']['endpoint']} in {st['etcd']['netns']} "
             f"({'running' if st['etcd']['running'] else 'STOPPED'})", "",
             f"{'HOST':<8} {'NETNS':<14} {'ADDRESS':<14} AGENT (gRPC)"]
    for name, h in st["hosts"].items():
        a = st["agents"].get(name)
        agent = ""
        if a:
            agent = (f"{a['grpc']} {'running' if a['agent_running'] else 'STOPPED'}, app "
                     f"{'running' if a['app_running'] else 'STOPPED'}")
        lines.append(f"{name:<8} {h['netns']:<14} {h['address'] or '-':<14} {agent}")
    if "tls" in st:
        t = st["tls"]
        # The node's farmd.yaml gives farmctl its certificate, key, CA and token (mutual TLS).
        n1 = st["agents"]["n1"]["config"] if "n1" in st["agents"] else "<node>.yaml"
        lines.append(f"\nTLS: certificates in {t['dir']}; etcd https with client certificates, user "
                     f"{t['etcd_user']} (password in {t['etcd_password_file']}); agents' API mutual TLS "
                     f"(CA {t['farm_ca']})")
        lines.append(f"query a node: farmctl status --netns {st['prefix']}-n1 --config {n1}")
        lines.append(f"drain a node: farmctl drain n2 --netns {st['prefix']}-n1 --config {n1}")
        return "\n".join(lines)
    lines.append(f"\nquery a node: farmctl status --netns {st['prefix']}-n1")
    lines.append(f"drain a node: NLBFARM_TOKEN_FILE={st['token_file']} farmctl drain n2 --netns {st['prefix']}-n1")
    return "\n".join(lines)


def cmd_lab_status(args) -> int:
    lab = _lab(args)
    st = lab.status()
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(render_lab_status(st))
    ok = st["etcd"]["running"] and all(a["agent_running"] and a["app_running"] for a in st["agents"].values())
    return EXIT_OK if ok else EXIT_UNHEALTHY


def cmd_lab_down(args) -> int:
    lab = _lab(args)
    removed = lab.down()
    print(f"lab {args.prefix}: removed {len(removed)} namespaces" + (f" ({' '.join(removed)})" if removed else ""))
    return EXIT_OK


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= v <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 86400 seconds")
    return v


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(every option string, the ones that take a value)."""
    opts, valued = [], []
    for a in p._actions:
        if a.option_strings and a.help != argparse.SUPPRESS:
            opts += a.option_strings
            if a.nargs != 0:
                valued += a.option_strings
    return opts, valued


def completion_script(ap: argparse.ArgumentParser, shell: str) -> str:
    """A bash completion function built from the parser: commands, subcommands, options, choices."""
    cases, valued = [], set(_options(ap)[1])

    def add(key: str, p: argparse.ArgumentParser):
        opts, val = _options(p)
        valued.update(val)
        words = [*_subcommands(p), *opts]
        choices = [c for a in p._actions if not a.option_strings and a.choices and not
                   isinstance(a, argparse._SubParsersAction) for c in a.choices]
        cases.append(f'        "{key}") words="{" ".join([*words, *choices])}" ;;')
    add("", ap)
    for name, p in _subcommands(ap).items():
        add(name, p)
        for sname, sp in _subcommands(p).items():
            add(f"{name} {sname}", sp)
    return f"""# bash completion for farmctl (farmctl completion bash)
_farmctl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} key="" skip="" w words
    case " {' '.join(sorted(valued))} " in *" $prev "*) COMPREPLY=(); return 0 ;; esac
    for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        if [ -n "$skip" ]; then skip=""; continue; fi
        case "$w" in
            -*=*) ;;
            -*) case " {' '.join(sorted(valued))} " in *" $w "*) skip=1 ;; esac ;;
            *) case "$key" in "" | lab) key="${{key:+$key }}$w" ;; esac ;;
        esac
    done
    case "$key" in
{chr(10).join(cases)}
        *) words="" ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _farmctl farmctl
"""


def build_parser() -> argparse.ArgumentParser:
    from nlbfarm import __version__
    ap = argparse.ArgumentParser(
        prog="farmctl", description="operate an nlbfarm farm", formatter_class=argparse.RawDescriptionHelpFormatter,
        # The connection flags live here too: an abbreviation such as lab up's --tls must not be
        # read as a prefix of --tls-ca at this level.
        allow_abbrev=False,
        epilog="""examples:
  farmctl status                           the farm as the local agent (127.0.0.1:7400) sees it
  farmctl --target 10.0.0.11:7400 members  connection flags go before or after the command
  farmctl drain web2 --wait                no new connections on web2; return once it serves none
  farmctl which 203.0.113.7:51234          the bucket and node that serve this client
  farmctl events --follow --for 60         joins, leaves, table changes and checks as they happen
  source <(farmctl completion bash)        shell completion

exit codes: 0 healthy or done, 1 the farm answered but is not healthy, 2 bad arguments or the
agent refused the call, 3 a lab operation failed, 4 nothing answered at the agent's address,
130 interrupted. Errors are one line on stderr; progress goes to stderr, results to stdout.""")
    ap.add_argument("--version", action="version", version=f"farmctl {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def connection_opts(p, talks_to_agent=True):
        # SUPPRESS on both levels: an option given before the subcommand is not
        # overwritten by the subcommand's default (argparse copies those over).
        if talks_to_agent:
            p.set_defaults(talks_to_agent=True)
        p.add_argument("--netns", default=argparse.SUPPRESS,
                       help="run inside this network namespace (lab nodes)")
        p.add_argument("--target", default=argparse.SUPPRESS, metavar="HOST:PORT", help=f"the agent's gRPC address (default: $NLBFARM_TARGET, the "
                                        f"configuration file, else {DEFAULT_TARGET})")
        p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="farmctl.yaml or farmd.yaml to take the target, TLS files and token "
                                        f"file from (default: $NLBFARM_CONFIG, else {DEFAULT_CONFIG_FILE} "
                                        "if it exists)")
        p.add_argument("--tls-ca", metavar="FILE", default=argparse.SUPPRESS, help="speak TLS; verify the agent's certificate with this CA file "
                                        "(default: $NLBFARM_TLS_CA)")
        p.add_argument("--tls-cert", metavar="FILE", default=argparse.SUPPRESS, help="client certificate for an agent with mutual TLS "
                                          "(default: $NLBFARM_TLS_CERT)")
        p.add_argument("--tls-key", metavar="FILE", default=argparse.SUPPRESS, help="the client certificate's key (default: $NLBFARM_TLS_KEY)")
        p.add_argument("--tls-server-name", metavar="NAME", default=argparse.SUPPRESS, help="the name to expect in the agent's certificate instead of "
                                                 "the target's host (default: $NLBFARM_TLS_SERVER_NAME)")

    connection_opts(ap, talks_to_agent=False)  # before the subcommand too: farmctl --target X status
    st = sub.add_parser("status", help="members, table generation and buckets per node, from one node")
    connection_opts(st)
    st.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the agent")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)

    def token_opt(p):
        p.add_argument("--token-file", help="file with the agent's API token (default: $NLBFARM_TOKEN_FILE, "
                                            f"else {DEFAULT_TOKEN_FILE})")
        p.add_argument("--insecure-send-token", action="store_true",
                       help="send the token even in plaintext to a target that is not loopback "
                            "(anyone on the network path can read it; prefer --tls-ca)")

    def target_opts(p):
        connection_opts(p)
        p.add_argument("--rpc-timeout", type=float, default=5.0, help="seconds per call")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    dr = sub.add_parser("drain", help="NODE takes no new connections and keeps established ones until "
                                      "they close or the timeout passes")
    dr.add_argument("node")
    dr.add_argument("--timeout", type=_seconds, help="seconds established connections may take "
                                                     "(default: the node's timing.drain_timeout)")
    dr.add_argument("--wait", action="store_true", help="return when the drain is complete")
    dr.add_argument("--wait-timeout", type=_seconds, default=3600, help="give up waiting after this long")
    target_opts(dr)
    token_opt(dr)
    dr.set_defaults(func=cmd_drain)
    mb = sub.add_parser("members", help="members with state, weight, buckets and drain progress")
    target_opts(mb)
    mb.set_defaults(func=cmd_members)
    tb = sub.add_parser("table", help="the bucket table as ranges per node")
    target_opts(tb)
    tb.set_defaults(func=cmd_table)
    wh = sub.add_parser("which", help="the bucket and node that serve CLIENT[:PORT]")
    wh.add_argument("client", nargs="?", help="client ADDRESS:PORT (without a port: the spread over "
                                              "sampled source ports)")
    wh.add_argument("--vip", help="the VIP the client talks to (default: the first)")
    wh.add_argument("--port", type=int, help="the VIP port (default: the VIP's first port rule)")
    wh.add_argument("--protocol", choices=["tcp", "udp"], help="default: the VIP's first port rule's")
    wh.add_argument("--from-file", help="many clients, one ADDRESS:PORT per line ('-' for stdin)")
    target_opts(wh)
    wh.set_defaults(func=cmd_which)
    ud = sub.add_parser("undrain", help="NODE takes buckets again")
    ud.add_argument("node")
    target_opts(ud)
    token_opt(ud)
    ud.set_defaults(func=cmd_undrain)
    nd = sub.add_parser("node", help="one node's own view: state and why, buckets, fence, etcd session, "
                                     "health checks, nft counters")
    target_opts(nd)
    nd.set_defaults(func=cmd_node)
    ev = sub.add_parser("events", help="members joining and leaving, table changes, check transitions")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    ev.add_argument("--for", dest="for_seconds", type=_seconds, default=None,
                    help="with --follow: stop after this many seconds")
    ev.add_argument("--new-only", action="store_true", help="skip the events the node remembers")
    target_opts(ev)
    ev.set_defaults(func=cmd_events)

    vr = sub.add_parser("version", help="the versions of farmctl and of the agent it talks to")
    vr.add_argument("--client", action="store_true", help="only farmctl's own version (no agent call)")
    target_opts(vr)
    vr.set_defaults(func=cmd_version)

    cp = sub.add_parser("completion", help="print a shell completion script",
                        description="Print a completion script for farmctl's commands and options. "
                                    "bash: source <(farmctl completion bash), or save it as "
                                    "/etc/bash_completion.d/farmctl. zsh: autoload bashcompinit && "
                                    "bashcompinit, then the same.")
    cp.add_argument("shell", choices=["bash"])
    cp.set_defaults(func=lambda a: print(completion_script(build_parser(), a.shell), end="") or EXIT_OK)

    lab = sub.add_parser("lab", help="a farm in network namespaces on this machine")
    lsub = lab.add_subparsers(dest="labcmd", required=True, metavar="LABCOMMAND")
    up = lsub.add_parser("up", help="create the lab and start etcd, agents and apps")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--ipv6", action="store_true", help="dual stack: also an IPv6 VIP (2001:db8::100)")
    up.add_argument("--tls", action="store_true", help="etcd over TLS with client certificates and "
                                                       "authentication, mutual TLS on the agents' API")
    up.add_argument("--prefix", default="nlbf", help="namespace name prefix (default %(default)s)")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_lab_up)
    ls = lsub.add_parser("status", help="hosts, addresses, agents of a running lab")
    ls.add_argument("--prefix", default="nlbf")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_lab_status)
    dn = lsub.add_parser("down", help="remove the lab, including leftovers of a crashed run")
    dn.add_argument("--prefix", default="nlbf")
    dn.set_defaults(func=cmd_lab_down)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    if getattr(args, "netns", None):
        _reexec_in_netns(args.netns, _strip_netns(argv))
    try:
        if getattr(args, "talks_to_agent", False):
            args.conn = connection(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("farmctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # farmctl ... | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except LabError as exc:
        return _fail(exc, EXIT_LAB)
    except AgentUnreachable as exc:
        return _fail(exc, EXIT_UNREACHABLE)
    except FarmError as exc:
        return _fail(exc, EXIT_ERROR)
    except Exception as exc:  # noqa: BLE001 - an operator gets one line, never a traceback
        if os.environ.get("NLBFARM_DEBUG"):
            raise
        return _fail(f"unexpected error: {type(exc).__name__}: {exc} (NLBFARM_DEBUG=1 shows where)", EXIT_ERROR)


def _fail(exc, code: int) -> int:
    """One line on stderr: the message, its own line breaks folded."""
    print("farmctl: " + " ".join(str(exc).split()), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
