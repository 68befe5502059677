"""deploy/ansible is ansible-lint clean (production profile), with the config in
deploy/ansible/.ansible-lint, and its playbooks pass ansible-playbook --syntax-check."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "ansible"


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_LOCAL_TEMP=str(tmp_path),
                NO_COLOR="1", ANSIBLE_NOCOLOR="1", HOME=os.environ.get("HOME", str(tmp_path)))


@pytest.mark.skipif(shutil.which("ansible-lint") is None,
                    reason="ansible-lint is not installed (deploy/scripts/install-debian-deps.sh installs it)")
def test_ansible_lint_is_clean(tmp_path):
    assert (ANSIBLE_DIR / ".ansible-lint").is_file()
    cp = subprocess.run(["ansible-lint", "--nocolor", "-p"], cwd=ANSIBLE_DIR, capture_output=True, text=True,
                        timeout=600, env=_env(tmp_path))
    assert cp.returncode == 0, cp.stdout[-4000:] + cp.stderr[-4000:]
    assert "production" in cp.stderr + cp.stdout


@pytest.mark.skipif(shutil.which("ansible-playbook") is None,
                    reason="ansible-playbook is not installed (deploy/scripts/install-debian-deps.sh installs it)")
@pytest.mark.parametrize("playbook", ["install.yml", "upgrade.yml"])
def test_playbook_syntax(tmp_path, playbook):
    cp = subprocess.run(["ansible-playbook", "--syntax-check", "-i", "inventory/example.yml", playbook],
                        cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert cp.returncode == 0, cp.stdout + cp.stderr
