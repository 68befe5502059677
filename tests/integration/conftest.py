"""A throwaway PKI made with openssl at test time, for the TLS tests.

``pki`` (one per session) holds:

* ``ca``: the farm's CA; ``other_ca``: a CA nobody trusts;
* ``etcd``: etcd's server certificate (IP SAN 127.0.0.1);
* ``client``: a client certificate for etcd (CN ``farmd-client``, which is
  not an etcd user: the certificate alone grants nothing once auth is on);
* ``node``: a farm node's certificate for the gRPC API, valid for server and
  client authentication (IP SAN 127.0.0.1), as peers and farmctl use it;
* ``stranger``: a client certificate signed by ``other_ca``.

Each is a ``Cert`` with ``crt`` and ``key`` paths (keys mode 600).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


@dataclass(frozen=True)
class Cert:
    crt: str
    key: str


class Pki:
    def __init__(self, root: Path):
        self.root = root
        self.ca = self._ca("ca", "nlbfarm test CA")
        self.other_ca = self._ca("other-ca", "untrusted test CA")
        self.etcd = self._leaf("etcd", "etcd-server", self.ca, "IP:127.0.0.1,DNS:localhost",
                               "serverAuth,clientAuth")
        self.client = self._leaf("client", "farmd-client", self.ca, "DNS:farmd-client", "clientAuth")
        self.node = self._leaf("node", "n1", self.ca, "IP:127.0.0.1,DNS:n1.farm.test", "serverAuth,clientAuth")
        self.stranger = self._leaf("stranger", "stranger", self.other_ca, "DNS:stranger", "clientAuth")

    def _run(self, *args: str) -> None:
        cp = subprocess.run([OPENSSL, *args], cwd=self.root, capture_output=True, text=True, timeout=30)
        if cp.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed: {cp.stderr}")

    def _key(self, name: str) -> str:
        key = str(self.root / f"{name}.key")
        self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        Path(key).chmod(0o600)
        return key

    def _ca(self, name: str, cn: str) -> Cert:
        key = self._key(name)
        crt = str(self.root / f"{name}.crt")
        self._run("req", "-x509", "-new", "-key", key, "-out", crt, "-days", "2", "-subj", f"/CN={cn}",
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return Cert(crt, key)

    def _leaf(self, name: str, cn: str, ca: Cert, san: str, eku: str) -> Cert:
        key = self._key(name)
        csr = str(self.root / f"{name}.csr")
        crt = str(self.root / f"{name}.crt")
        ext = self.root / f"{name}.ext"
        ext.write_text(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                       f"extendedKeyUsage={eku}\nsubjectAltName={san}\n")
        self._run("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={cn}")
        self._run("x509", "-req", "-in", csr, "-CA", ca.crt, "-CAkey", ca.key, "-CAcreateserial",
                  "-out", crt, "-days", "2", "-extfile", str(ext))
        return Cert(crt, key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    if not shutil.which(OPENSSL):
        pytest.skip("openssl not found")
    return Pki(tmp_path_factory.mktemp("pki"))
