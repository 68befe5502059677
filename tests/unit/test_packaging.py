"""What a user builds from a fresh clone: the wheel and the sdist have the gRPC stubs, import
and serve; the committed stubs are current; the runtime floors match the generated code."""
from __future__ import annotations

import configparser
import re
import runpy
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUBS = ("farm_pb2.py", "farm_pb2_grpc.py")


def _install_requires() -> dict[str, str]:
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    out = {}
    for line in cp["options"]["install_requires"].splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)$", line)
        if m and not line.strip().startswith("#"):
            out[m.group(1).lower()] = m.group(2).strip()
    return out


def test_committed_stubs_are_what_farm_proto_generates_now(tmp_path):
    gen = runpy.run_path(str(REPO / "deploy" / "scripts" / "gen_proto.py"))
    for path in gen["generate"](tmp_path):
        committed = REPO / "proto" / path.name
        assert committed.exists(), f"proto/{path.name} is not committed: run make proto"
        assert committed.read_text() == path.read_text(), (
            f"proto/{path.name} is stale: run make proto after editing proto/farm.proto")


def test_runtime_floors_cover_what_the_stubs_were_generated_for():
    """A wheel that allows an older grpcio or protobuf than its stubs need fails at import on
    such a host: the generated code checks the runtime version."""
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", (REPO / "proto" / STUBS[1]).read_text()).group(1)
    pb_gen = re.search(r"# Protobuf Python Version: ([0-9.]+)", (REPO / "proto" / STUBS[0]).read_text()).group(1)
    req = _install_requires()
    assert req["grpcio"] == f">= {grpc_gen}" and req["protobuf"] == f">= {pb_gen}", req


def _fresh_clone_files(dest: Path) -> None:
    """What a commit of this working tree holds (tracked and new files, nothing ignored)."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())


def _build(hook: str, src: Path, out: Path) -> Path:
    """A PEP 517 build in a child process, as pip or build would run it (no build isolation:
    the tests run offline; setuptools comes from the venv)."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    cp = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    return out / cp.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    clone = root / "clone"
    _fresh_clone_files(clone)
    sdist = _build("build_sdist", clone, root / "dist")
    with tarfile.open(sdist) as tf:
        tf.extractall(root / "unpacked")  # our own sdist, just built
    (src,) = (root / "unpacked").iterdir()
    wheel = _build("build_wheel", src, root / "wheels")  # from the sdist: it must be complete too
    return root, sdist, wheel


def test_sdist_has_the_sources_stubs_and_license(built):
    _root, sdist, _wheel = built
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"proto/farm.proto", "proto/farm_pb2.py", "proto/farm_pb2_grpc.py", "LICENSE", "setup.cfg",
            "pyproject.toml", "README.md", "node/agent.py", "coordinator/table.py", "nlbfarm/cli.py"} <= names


def test_wheel_from_a_fresh_clone_has_the_stubs_and_license(built):
    _root, _sdist, wheel = built
    import nlbfarm
    assert wheel.name == f"nlbfarm-{nlbfarm.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(f"nlbfarm-{nlbfarm.__version__}.dist-info/entry_points.txt").decode()
    assert {"nlbfarm/proto/farm_pb2.py", "nlbfarm/proto/farm_pb2_grpc.py", "nlbfarm/proto/farm.proto",
            "nlbfarm/farmd.schema.json",
            "nlbfarm/node/agent.py", "nlbfarm/coordinator/table.py", "nlbfarm/cli.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    assert "farmd = nlbfarm.node.agent:main" in entry_points and "farmctl = nlbfarm.cli:main" in entry_points


SERVE = r'''
import sys
target = sys.argv[1]
import nlbfarm
from nlbfarm.proto import farm_pb2, farm_pb2_grpc
for mod in (nlbfarm, farm_pb2, farm_pb2_grpc):  # the wheel's copies, not the checkout's
    assert mod.__file__.startswith(target), mod.__file__
from nlbfarm import cli
from nlbfarm.node.events import EventBus
from nlbfarm.node.status import serve_status

class Agent:
    me, instance, events = "n1", "0123abcd", EventBus()
    def node_view(self, with_counters=True):
        return {"node_id": "n1", "state": "active", "state_reason": "", "generation": 1, "applied_generation": 1,
                "owned_buckets": 0, "accepting_buckets": 0, "draining_buckets": 0, "draining_connections": 0,
                "accepting_ranges": [], "fence_open": True, "etcd_state": "connected",
                "last_keepalive_age_s": 0.1, "lease_id": "1", "counters": [], "checks": [], "module": "",
                "restarts_in_window": 0, "last_cycle": "ok", "vips": [], "version": nlbfarm.__version__}

servers = serve_status(Agent(), "127.0.0.1:0", None, None, None)
port = servers[0].bound_port
sys.exit(cli.main(["version", "--target", f"127.0.0.1:{port}"]))
'''


def test_wheel_from_a_fresh_clone_imports_and_serves_its_api(built):
    root, _sdist, wheel = built
    target = root / "site"
    cp = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                         "--disable-pip-version-check", "--target", str(target), str(wheel)],
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]
    cp = subprocess.run([sys.executable, "-c", SERVE, str(target)], capture_output=True, text=True, timeout=60, cwd=root,
                        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    import nlbfarm
    assert cp.returncode == 0, cp.stderr[-3000:]
    lines = cp.stdout.splitlines()
    assert lines[0] == f"farmctl {nlbfarm.__version__}", lines
    assert re.fullmatch(rf"farmd {re.escape(nlbfarm.__version__)} on n1 \(127\.0\.0\.1:\d+\)", lines[1]), lines
