"""TLS for nlbfarm's gRPC connections, and what a failed TLS connection means.

* ``server_credentials`` / ``ClientTLS.channel``: the API server's listeners
  (``status.tls_*``), the agent's peer probes and farmctl build their gRPC
  credentials here, so all three agree on what the options mean.
* ``classify`` turns gRPC's transport error text into one named problem
  (plaintext against TLS, an untrusted server, a missing client
  certificate, ...); ``probe`` finds the problem with a direct TLS handshake
  when gRPC's text does not tell (a gRPC server that refuses a client
  certificate just closes the connection). Callers word the problem with
  their own option names (farmctl's ``--tls-ca``, farmd's ``etcd.ca_file``).

Key files are only ever handed to gRPC or ``ssl``; nothing here logs or
returns their content.
"""
from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from nlbfarm.errors import ConfigError

# Problems classify() and probe() name.
NEEDS_TLS = "needs-tls"            # a plaintext client, a TLS server
NOT_TLS = "not-tls"                # a TLS client, a plaintext server
UNTRUSTED = "untrusted-server"     # the server's certificate is not signed by our CA (or expired)
NAME_MISMATCH = "name-mismatch"    # the server's certificate does not name the address we dialled
CERT_REQUIRED = "cert-required"    # mutual TLS, and we sent no client certificate
CERT_REFUSED = "cert-refused"      # mutual TLS, and the server refused our client certificate


def read_file(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from None


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None,
                       field: str = "status"):
    """gRPC server credentials; with ``client_ca_file`` clients must present a certificate it signed."""
    import grpc
    cert = read_file(cert_file, f"{field}.tls_cert_file")
    key = read_file(key_file, f"{field}.tls_key_file")
    ca = read_file(client_ca_file, f"{field}.tls_client_ca_file") if client_ca_file else None
    try:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)
    except Exception as exc:  # grpc checks the PEM only superficially here
        raise ConfigError(f"{field}: unusable TLS certificate or key: {exc}") from None


@dataclass(frozen=True)
class ClientTLS:
    """How a gRPC client speaks TLS. ``ca_file`` verifies the server (None: gRPC's default
    roots); ``cert_file``/``key_file`` are the client certificate for mutual TLS;
    ``server_name`` replaces the dialled host in the certificate name check."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    # How the options are called where they came from, for error messages.
    names: tuple[str, str, str] = ("--tls-ca", "--tls-cert", "--tls-key")

    def credentials(self):
        import grpc
        ca_opt, cert_opt, key_opt = self.names
        ca = read_file(self.ca_file, ca_opt) if self.ca_file else None
        cert = read_file(self.cert_file, cert_opt) if self.cert_file else None
        key = read_file(self.key_file, key_opt) if self.key_file else None
        return grpc.ssl_channel_credentials(ca, key, cert)

    def channel(self, target: str, options: list | tuple = ()):
        import grpc
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(target, self.credentials(), options=opts)


def channel(target: str, tls: ClientTLS | None, options: list | tuple = ()):
    """A gRPC channel to ``target``: TLS when ``tls`` is given, else plaintext."""
    import grpc
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return tls.channel(target, options)


_CLIENT_CERT_WORDS = ("TSI_DATA_CORRUPTED", "Unwrap failed", "CERTIFICATE_REQUIRED", "BAD_CERTIFICATE",
                      "UNKNOWN_CA", "HANDSHAKE_FAILURE", "certificate required", "bad certificate")


def classify(details: str, tls: bool, has_cert: bool) -> str | None:
    """The TLS problem named by a gRPC transport error's text, if it names one."""
    d = details or ""
    if "CERTIFICATE_VERIFY_FAILED" in d or "certificate verify failed" in d:
        return UNTRUSTED
    if "Hostname Verification Check failed" in d or "Peer name" in d or "No match found for server name" in d:
        return NAME_MISMATCH
    if tls and ("WRONG_VERSION_NUMBER" in d or "Handshake read failed" in d):
        return NOT_TLS
    if tls and any(w in d for w in _CLIENT_CERT_WORDS):
        return CERT_REFUSED if has_cert else CERT_REQUIRED
    return None


def split_target(target: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` -> (host, port); None for other gRPC target forms."""
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        port = rest[1:] if sep and rest.startswith(":") else ""
    else:
        host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        return None
    return host, int(port)


# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers
# with its own SETTINGS once it has accepted the TLS session.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def probe(target: str, tls: ClientTLS | None, timeout: float = 2.0) -> str | None:
    """Find out with one direct TLS handshake why a connection to ``target`` failed.

    Returns one of the problems above, or None when TLS is not the problem
    (nothing listens, or the server accepts a session with our settings).
    The handshake does not verify the server: it only asks whether the
    server speaks TLS and whether it accepts our client certificate.
    """
    hp = split_target(target)
    if hp is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    has_cert = bool(tls and tls.cert_file)
    if has_cert:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError):
            return None  # reported by gRPC itself when it loads them
    try:
        sock = socket.create_connection(hp, timeout=timeout)
    except OSError:
        return None
    refused = CERT_REFUSED if has_cert else CERT_REQUIRED
    with sock:
        try:
            conn = ctx.wrap_socket(sock)
        except ssl.SSLError as exc:
            if exc.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST",
                              "UNEXPECTED_RECORD", "PACKET_LENGTH_TOO_LONG"):
                return NOT_TLS if tls else None
            # An alert during the handshake: the server speaks TLS and refused us.
            return refused if tls else NEEDS_TLS
        except OSError:  # closed during the handshake: not a TLS server
            return NOT_TLS if tls else None
        with conn:
            if tls is None:
                return NEEDS_TLS
            try:
                conn.sendall(_H2_PREFACE)
                answer = conn.recv(64)
            except ssl.SSLError:
                return refused  # an alert after the handshake (TLS 1.3 refuses certificates here)
            except OSError:
                return refused
            return None if answer else refused
