#!/usr/bin/env python3
"""Write the hash lock of each nlbfarm release in a wheelhouse: WHEELHOUSE/nlbfarm-<version>.lock.

    python deploy/scripts/wheelhouse_lock.py WHEELHOUSE [VERSION ...]

For every nlbfarm wheel in WHEELHOUSE (or only the VERSIONs given), pip's own
resolver picks the wheels that install ``nlbfarm==<version>`` from that
directory alone (no index, nothing already installed counted), and the lock
lists each of them as ``name==version --hash=sha256:...``. The Ansible role
installs with ``--require-hashes -r`` that file: a node gets exactly the
wheels the controller built, or nothing. Run it where the nodes' Python and
CPU are (the wheels are platform-specific), after ``pip wheel``; ``make
wheelhouse`` does both.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

WHEEL_NAME = re.compile(r"^nlbfarm-(?P<version>[^-]+)-py3-none-any\.whl$")


def releases(wheelhouse: Path) -> list[str]:
    return sorted(m.group("version") for p in wheelhouse.iterdir() if (m := WHEEL_NAME.match(p.name)))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(wheelhouse: Path, version: str, python: str = sys.executable) -> list[tuple[str, str, Path]]:
    """(name, version, wheel file) of everything ``nlbfarm==version`` installs from the wheelhouse."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cp = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                             "--no-index", "--find-links", str(wheelhouse), "--only-binary", ":all:",
                             "--disable-pip-version-check", "--report", str(report), f"nlbfarm=={version}"],
                            capture_output=True, text=True,
                            # no pip.conf: its find-links or index must not add wheels from elsewhere
                            env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
        if cp.returncode != 0:
            raise SystemExit(f"wheelhouse_lock: nlbfarm=={version} does not install from {wheelhouse} alone:\n"
                             f"{cp.stderr.strip()}")
        items = json.loads(report.read_text())["install"]
    out = []
    for item in items:
        url = urlparse(item["download_info"]["url"])
        path = Path(unquote(url.path))
        if url.scheme != "file" or path.parent.resolve() != wheelhouse.resolve():
            raise SystemExit(f"wheelhouse_lock: {item['download_info']['url']} is not a file of {wheelhouse}")
        out.append((item["metadata"]["name"], item["metadata"]["version"], path))
    return sorted(out, key=lambda t: t[0].lower())


def lock_text(wheels: list[tuple[str, str, Path]]) -> str:
    lines = ["# Written by deploy/scripts/wheelhouse_lock.py: every wheel nlbfarm installs, pinned by hash.",
             "# Install with: pip install --no-index --find-links <wheelhouse> --require-hashes -r <this file>"]
    lines += [f"{name}=={version} --hash=sha256:{sha256(path)}" for name, version, path in wheels]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    wheelhouse = Path(argv[0])
    if not wheelhouse.is_dir():
        print(f"wheelhouse_lock: {wheelhouse} is not a directory", file=sys.stderr)
        return 2
    versions = argv[1:] or releases(wheelhouse)
    if not versions:
        print(f"wheelhouse_lock: {wheelhouse} holds no nlbfarm wheel (pip wheel -w {wheelhouse} . first)",
              file=sys.stderr)
        return 2
    for version in versions:
        lock = wheelhouse / f"nlbfarm-{version}.lock"
        lock.write_text(lock_text(resolve(wheelhouse, version)))
        print(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
