"""A throwaway PKI made with openssl at test time (nlbfarm.pki.Pki), for the TLS tests.

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

import pytest

# The PKI itself lives in the project (the lab uses it too); these names stay
# importable from here for the tests that used them.
from nlbfarm.pki import OPENSSL, Cert, Pki  # noqa: F401


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    if not shutil.which(OPENSSL):
        pytest.skip("openssl not found")
    return Pki(tmp_path_factory.mktemp("pki"))
