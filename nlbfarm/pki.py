"""A throwaway PKI made with the ``openssl`` CLI: CAs and leaf certificates.

For the lab (``Lab(tls=True)``) and the TLS tests. Each certificate is an EC
P-256 key and a certificate valid for a few days, written under one
directory; keys are unencrypted files of mode 600. Leaf certificates carry
the subjectAltName and extendedKeyUsage the caller asks for, which is what
etcd (``--client-cert-auth``), gRPC and farmd's peers check.

This is a test and lab tool, not a way to run a farm's PKI: nothing here
renews, revokes or protects a CA key.

``Pki`` is the fixed set the integration tests use (see its docstring);
``Authority`` makes any other set (the lab's) with ``make_ca`` and ``make_leaf``.
"""
from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nlbfarm.errors import PkiError

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
# extendedKeyUsage values: a node's API certificate serves and is a client (peers,
# farmctl); an etcd member's serves clients and, in a cluster, its peers.
SERVER_AND_CLIENT = "serverAuth,clientAuth"
CLIENT_ONLY = "clientAuth"
OPENSSL_TIMEOUT_S = 30


@dataclass(frozen=True)
class Cert:
    crt: str
    key: str


def san(names: list[str] | tuple[str, ...]) -> str:
    """openssl's subjectAltName value for addresses and DNS names: ``IP:10.0.0.1,DNS:n1``."""
    out = []
    for n in names:
        try:
            out.append(f"IP:{ipaddress.ip_address(n)}")
        except ValueError:
            out.append(f"DNS:{n}")
    # A name given twice (an address both as peer_listen and loopback) is one SAN.
    return ",".join(dict.fromkeys(out))


def leaf_extensions(san_value: str, eku: str) -> str:
    """The x509 extension file of a leaf certificate (not a CA; signs TLS handshakes)."""
    return (f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={eku}\nsubjectAltName={san_value}\n")


class Authority:
    """Makes keys, CAs and leaf certificates under ``root`` with the openssl CLI."""

    def __init__(self, root: Path, days: int = 2):
        self.root = Path(root)
        self.days = days
        if shutil.which(OPENSSL) is None:
            raise PkiError(f"openssl is not installed (looked for {OPENSSL}); it makes the test certificates")
        # 0700: openssl writes each key with the default umask before _key's chmod.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _run(self, *args: str) -> None:
        try:
            cp = subprocess.run([OPENSSL, *args], cwd=self.root, capture_output=True, text=True,
                                timeout=OPENSSL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise PkiError(f"openssl {args[0]} did not finish within {OPENSSL_TIMEOUT_S}s") from None
        if cp.returncode != 0:
            raise PkiError(f"openssl {' '.join(args)} failed rc={cp.returncode}: {cp.stderr.strip()[-500:]}")

    def _key(self, name: str) -> str:
        key = str(self.root / f"{name}.key")
        self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        Path(key).chmod(0o600)
        return key

    def make_ca(self, name: str, cn: str) -> Cert:
        """A self-signed CA: ``<name>.crt`` and ``<name>.key``."""
        key = self._key(name)
        crt = str(self.root / f"{name}.crt")
        self._run("req", "-x509", "-new", "-key", key, "-out", crt, "-days", str(self.days), "-subj", f"/CN={cn}",
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return Cert(crt, key)

    def make_leaf(self, name: str, cn: str, ca: Cert, san_value: str, eku: str) -> Cert:
        """A certificate signed by ``ca``; ``san_value`` as from ``san()``, ``eku`` e.g. SERVER_AND_CLIENT."""
        key = self._key(name)
        csr = str(self.root / f"{name}.csr")
        crt = str(self.root / f"{name}.crt")
        ext = self.root / f"{name}.ext"
        ext.write_text(leaf_extensions(san_value, eku))
        self._run("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={cn}")
        self._run("x509", "-req", "-in", csr, "-CA", ca.crt, "-CAkey", ca.key, "-CAcreateserial",
                  "-out", crt, "-days", str(self.days), "-extfile", str(ext))
        return Cert(crt, key)


class Pki(Authority):
    """The integration tests' PKI (one per session):

    * ``ca``: the farm's CA; ``other_ca``: a CA nobody trusts;
    * ``etcd``: etcd's server certificate (IP SAN 127.0.0.1);
    * ``client``: a client certificate for etcd (CN ``farmd-client``, which is
      not an etcd user: the certificate alone grants nothing once auth is on);
    * ``node``: a farm node's certificate for the gRPC API, valid for server and
      client authentication (IP SAN 127.0.0.1), as peers and farmctl use it;
    * ``stranger``: a client certificate signed by ``other_ca``.
    """

    def __init__(self, root: Path):
        super().__init__(root)
        self.ca = self.make_ca("ca", "nlbfarm test CA")
        self.other_ca = self.make_ca("other-ca", "untrusted test CA")
        self.etcd = self.make_leaf("etcd", "etcd-server", self.ca, "IP:127.0.0.1,DNS:localhost", SERVER_AND_CLIENT)
        self.client = self.make_leaf("client", "farmd-client", self.ca, "DNS:farmd-client", CLIENT_ONLY)
        self.node = self.make_leaf("node", "n1", self.ca, "IP:127.0.0.1,DNS:n1.farm.test", SERVER_AND_CLIENT)
        self.stranger = self.make_leaf("stranger", "stranger", self.other_ca, "DNS:stranger", CLIENT_ONLY)
