"""The hardened systemd unit: deploy/systemd/farmd.service and the Ansible role's template.

Both must pass ``systemd-analyze verify`` without a single message, keep
Restart=always, grant exactly CAP_NET_ADMIN and CAP_NET_RAW, and make the file
system read-only (ProtectSystem=strict). systemd need not be running:
``verify`` only loads the unit. It checks that ExecStart's program exists, so
the test points the unit at a stub executable.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "farmd.service"
ROLE = REPO / "deploy" / "ansible" / "roles" / "nlbfarm"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (Debian package systemd)")


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def check_hardening(text: str) -> None:
    d = directives(text)
    assert d["Restart"] == ["always"]
    assert d["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert d["AmbientCapabilities"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert "User" not in d  # uid 0 with two capabilities, see the unit's comment
    # farmd writes net.ipv4.conf.<if>.arp_announce: /proc/sys must stay writable
    assert "ProtectKernelTunables" not in d
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET",
                                                           "AF_UNIX"}
    assert any("--check" in v for v in d["ExecStartPre"])
    stop = int(d["TimeoutStopSec"][0])
    assert stop > 30 + 10  # stop_drain_timeout + leave_timeout defaults


def verify(unit: Path) -> str:
    cp = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))
    return f"rc={cp.returncode} {cp.stdout}{cp.stderr}".strip()


def stub_farmd(root: Path) -> Path:
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    farmd = venv / "bin" / "farmd"
    farmd.write_text("#!/bin/sh\nexit 0\n")
    farmd.chmod(0o755)
    return venv


def test_repo_unit_is_hardened():
    check_hardening(UNIT.read_text())


@needs_analyze
def test_repo_unit_verifies_clean(tmp_path):
    venv = stub_farmd(tmp_path)
    unit = tmp_path / "farmd.service"
    unit.write_text(UNIT.read_text().replace("/opt/nlbfarm/.venv", str(venv)))
    assert verify(unit) == "rc=0"


@needs_analyze
@pytest.mark.skipif(shutil.which("ansible") is None, reason="ansible is not installed "
                    "(deploy/scripts/install-debian-deps.sh installs ansible-core)")
@pytest.mark.parametrize("extra", [{}, {"nlbfarm_read_write_paths": ["/var/lib/myapp", "/run/myapp"]}])
def test_role_template_renders_to_a_clean_unit(tmp_path, extra):
    """The role's template, rendered by Ansible with the role's defaults and example paths."""
    import json
    venv = stub_farmd(tmp_path)
    out = tmp_path / "farmd.service"
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "deploy" / "ansible" / "ansible.cfg"),
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "atmp"), ANSIBLE_NOCOLOR="1")
    cp = subprocess.run(
        ["ansible", "localhost", "-c", "local", "-i", "localhost,", "-m", "ansible.builtin.template",
         "-a", f"src={ROLE / 'templates' / 'farmd.service.j2'} dest={out} mode=0644",
         "-e", f"@{ROLE / 'defaults' / 'main.yml'}",
         "-e", json.dumps({"nlbfarm_venv": str(venv), "nlbfarm_config_file": "/etc/nlbfarm/farmd.yaml", **extra})],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO / "deploy" / "ansible")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    text = out.read_text()
    check_hardening(text)
    assert f"ExecStart={venv}/bin/farmd --config /etc/nlbfarm/farmd.yaml" in text
    if extra:
        assert directives(text)["ReadWritePaths"] == ["/var/lib/myapp /run/myapp"]
    assert verify(out) == "rc=0"
    # Everything but the managed-by comment and the parameters matches the repository's unit.
    repo = {k: v for k, v in directives(UNIT.read_text()).items() if k not in ("ExecStartPre", "ExecStart")}
    mine = {k: v for k, v in directives(text).items() if k not in ("ExecStartPre", "ExecStart", "ReadWritePaths")}
    assert mine == repo
