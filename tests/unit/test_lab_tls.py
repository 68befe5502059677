"""The lab's TLS pieces that need no namespace or etcd: nlbfarm.pki, and what Lab(tls=True)
writes into farmd's configuration (which farmd's own parser must accept)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
import yaml

from nlbfarm import pki
from nlbfarm.cli import read_client_config, render_lab_status
from nlbfarm.config import parse_config
from nlbfarm.errors import LabError, PkiError
from nlbfarm.lab import ETCD_CA, ETCD_CLIENT, ETCD_SERVER, FARM_CA, Lab, client_urls, etcd_tls_args, node_cert_names

needs_openssl = pytest.mark.skipif(shutil.which(pki.OPENSSL) is None, reason="openssl not found")


def test_san_names_addresses_and_dns_names_once():
    assert pki.san(["198.18.0.11", "127.0.0.1", "127.0.0.1", "n1.farm", "2001:db8::11"]) == \
        "IP:198.18.0.11,IP:127.0.0.1,DNS:n1.farm,IP:2001:db8::11"


def test_leaf_extensions_carry_san_and_eku():
    ext = pki.leaf_extensions("IP:127.0.0.1", pki.SERVER_AND_CLIENT)
    assert "extendedKeyUsage=serverAuth,clientAuth\n" in ext and "subjectAltName=IP:127.0.0.1\n" in ext
    assert "basicConstraints=CA:FALSE" in ext


def test_small_lab_helpers():
    assert client_urls(["198.18.0.2", "198.18.0.4"], True) == ["https://198.18.0.2:2379", "https://198.18.0.4:2379"]
    assert client_urls(["198.18.0.2"], False) == ["http://198.18.0.2:2379"]
    assert etcd_tls_args("s.crt", "s.key", "ca.crt") == ["--cert-file", "s.crt", "--key-file", "s.key",
                                                         "--trusted-ca-file", "ca.crt", "--client-cert-auth"]
    assert node_cert_names("198.18.0.11") == ["198.18.0.11", "127.0.0.1"]
    assert node_cert_names("198.18.0.11", "2001:db8::11")[-1] == "2001:db8::11"


def test_a_plain_lab_writes_no_tls(tmp_path):
    cfg = Lab(prefix="tu", state_root=tmp_path).node_config("n1")
    assert "ca_file" not in cfg["etcd"] and "tls_cert_file" not in cfg["status"]
    assert cfg["etcd"]["endpoints"] == ["198.18.0.2:2379"]
    lab = Lab(prefix="tu", state_root=tmp_path)
    assert lab.etcdctl_env() is None
    assert lab.etcdctl_argv("get", "x") == ["etcdctl", "--endpoints", "198.18.0.2:2379", "get", "x"]


@needs_openssl
def test_pki_leaf_is_signed_and_names_what_was_asked(tmp_path):
    a = pki.Authority(tmp_path)
    ca = a.make_ca("ca", "test CA")
    leaf = a.make_leaf("n1", "n1", ca, pki.san(["198.18.0.11", "127.0.0.1"]), pki.SERVER_AND_CLIENT)
    assert stat.S_IMODE(os.stat(leaf.key).st_mode) == 0o600
    subprocess.run([pki.OPENSSL, "verify", "-CAfile", ca.crt, leaf.crt], check=True, capture_output=True)
    text = subprocess.run([pki.OPENSSL, "x509", "-in", leaf.crt, "-noout", "-text"], check=True,
                          capture_output=True, text=True).stdout
    assert "IP Address:198.18.0.11, IP Address:127.0.0.1" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text


@needs_openssl
def test_pki_error_names_the_openssl_problem(tmp_path):
    a = pki.Authority(tmp_path)
    with pytest.raises(PkiError, match=r"openssl x509 .* failed rc=\d+"):
        a.make_leaf("x", "x", pki.Cert(str(tmp_path / "none.crt"), str(tmp_path / "none.key")), "DNS:x",
                    pki.CLIENT_ONLY)


@needs_openssl
def test_a_tls_lab_config_is_accepted_by_farmd_and_farmctl(tmp_path):
    lab = Lab(prefix="tu", state_root=tmp_path, tls=True)
    lab.make_pki(["n1", "n2"])
    for name in ("etcd-password", "etcd-root-password"):
        assert stat.S_IMODE(os.stat(lab.tls_dir / name).st_mode) == 0o600
    cfg = lab.node_config("n2")
    parsed = parse_config(cfg)  # farmd --check: every file readable, TLS settings consistent
    assert parsed.etcd.tls and parsed.etcd.username == "farm" and parsed.status.tls
    assert cfg["etcd"]["endpoints"] == ["https://198.18.0.2:2379"]
    assert cfg["status"]["tls_cert_file"] == lab.tls_cert("n2").crt
    assert cfg["status"]["tls_client_ca_file"] == lab.tls_cert(FARM_CA).crt
    lab.dir.mkdir(parents=True, exist_ok=True)
    lab.config_path("n2").write_text(yaml.safe_dump(cfg))
    # farmctl --config n2.yaml: the node's certificate and key, the farm CA, loopback.
    assert read_client_config(str(lab.config_path("n2"))) == {
        "target": "127.0.0.1:7400", "token_file": str(lab.token_file), "tls_ca": lab.tls_cert(FARM_CA).crt,
        "tls_cert": lab.tls_cert("n2").crt, "tls_key": lab.tls_cert("n2").key}
    text = subprocess.run([pki.OPENSSL, "x509", "-in", lab.tls_cert("n2").crt, "-noout", "-text"],
                          check=True, capture_output=True, text=True).stdout
    assert "IP Address:198.18.0.12, IP Address:127.0.0.1" in text
    text = subprocess.run([pki.OPENSSL, "x509", "-in", lab.tls_cert(ETCD_SERVER).crt, "-noout", "-text"],
                          check=True, capture_output=True, text=True).stdout
    assert "IP Address:198.18.0.2, IP Address:127.0.0.1" in text
    # Two CAs: the agents' etcd client certificate is not one of the farm CA.
    bad = subprocess.run([pki.OPENSSL, "verify", "-CAfile", lab.tls_cert(FARM_CA).crt, lab.tls_cert(ETCD_CLIENT).crt],
                         capture_output=True)
    assert bad.returncode != 0
    subprocess.run([pki.OPENSSL, "verify", "-CAfile", lab.tls_cert(ETCD_CA).crt, lab.tls_cert(ETCD_CLIENT).crt],
                   check=True, capture_output=True)


def test_lab_status_rendering_points_farmctl_at_the_nodes_config():
    st = {"prefix": "nlbf", "vip": "198.18.0.100", "url": "http://198.18.0.100:80/", "subnet": "198.18.0.0/24",
          "etcd": {"endpoint": "https://198.18.0.2:2379", "netns": "nlbf-etcd", "running": True},
          "hosts": {"n1": {"netns": "nlbf-n1", "address": "198.18.0.11"}},
          "agents": {"n1": {"grpc": "127.0.0.1:7400", "agent_running": True, "app_running": True,
                            "config": "/run/nlbfarm/lab/nlbf/n1.yaml"}},
          "token_file": "/run/nlbfarm/lab/nlbf/token",
          "tls": {"dir": "/run/nlbfarm/lab/nlbf/tls", "etcd_user": "farm", "farm_ca": "/x/farm-ca.crt",
                  "etcd_password_file": "/run/nlbfarm/lab/nlbf/tls/etcd-password"}}
    out = render_lab_status(st)
    assert "farmctl status --netns nlbf-n1 --config /run/nlbfarm/lab/nlbf/n1.yaml" in out
    assert "user farm (password in /run/nlbfarm/lab/nlbf/tls/etcd-password)" in out
    del st["tls"]
    assert "NLBFARM_TOKEN_FILE=/run/nlbfarm/lab/nlbf/token farmctl drain n2 --netns nlbf-n1" in render_lab_status(st)


def test_lab_error_for_a_missing_password(tmp_path):
    with pytest.raises(LabError, match="cannot read the lab's etcd password .*etcd-password"):
        Lab(prefix="tu", state_root=tmp_path, tls=True).etcd_password()
