"""The Ansible role and playbooks (deploy/ansible), run for real against lab hosts.

The lab (nlbfarm.lab) provides the switch, etcd, the client and one network
namespace per node with the application on :80 (it stands for the app's own
unit). Nothing of farmd is on the nodes: install.yml installs it from nothing
(venv from Debian's python3, nlbfarm from a wheelhouse built from this
checkout, farmd.yaml validated by farmd --check, the systemd unit rendered and
checked by systemd-analyze verify), with the inventory's hosts being the
namespaces (connection plugin nlbfarm_netns) and nlbfarm_service_manager: lab
(no systemd here; farmd runs under the supervisor with the unit's two
capabilities). Then upgrade.yml rolls a newer build over the farm, one node at
a time, while a client keeps opening new connections and holds long-lived
ones: 0 failed, 0 broken. By default each farmd restarts hitless (its successor
adopts its leases and kernel state: the table generation does not change);
with nlbfarm_upgrade_drain each node is drained first. Finally a refused
configuration and a node that does not come back each abort the rollout
before the next node is touched.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from nlbfarm.analysis import failures
from nlbfarm.lab import ETCD_PREFIX, Lab, LabTiming

from labkit import read_log
from test_faults import HOLD_CONNS, SETTLE_S, Load, check_exactly_once, held_max, split_holds

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
NODES = ["n1", "n2", "n3"]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "nlbfarm", "node", "coordinator", "proto")

pytestmark = pytest.mark.skipif(shutil.which("ansible-playbook") is None,
                                reason="ansible-playbook is not installed "
                                       "(deploy/scripts/install-debian-deps.sh installs ansible-core)")


def base_version() -> str:
    """The checkout's version: setup.cfg takes it from the package (its one source)."""
    m = re.search(r'^__version__ = "([^"]+)"$', (REPO / "nlbfarm" / "__init__.py").read_text(), re.M)
    assert m, "nlbfarm/__init__.py has no __version__"
    return m.group(1)


def build_wheel(src_root: Path, version: str, wheelhouse: Path, deps: bool) -> None:
    """A wheel of this checkout as ``version`` (an upgrade is a newer build)."""
    src = src_root / f"src-{version}"
    src.mkdir(parents=True)
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    init = src / "nlbfarm" / "__init__.py"
    text = init.read_text()
    assert '__version__ = "' in text
    init.write_text("\n".join(f'__version__ = "{version}"' if line.startswith("__version__ =") else line
                              for line in text.splitlines()) + "\n")
    pip = [str(REPO / ".venv" / "bin" / "python"), "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
           "--no-build-isolation", "-w", str(wheelhouse)]
    cp = subprocess.run([*pip, *([] if deps else ["--no-deps"]), str(src)], capture_output=True, text=True,
                        timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]


def lock_wheelhouse(wheelhouse: Path, *versions: str) -> None:
    """nlbfarm-<version>.lock for each release in the wheelhouse, as make wheelhouse writes them."""
    cp = subprocess.run([str(REPO / ".venv" / "bin" / "python"), str(REPO / "deploy/scripts/wheelhouse_lock.py"),
                         str(wheelhouse), *versions], capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]


def inventory(lab: Lab, root: Path, wheelhouse: Path, version: str, hosts: list[str]) -> dict:
    first = lab.node_config(hosts[0])
    t = first["timing"]
    nodes = {}
    for n in hosts:
        c = lab.node_config(n)
        d = root / n
        nodes[n] = {"ansible_netns": lab.ns(n), "nlbfarm_addresses": c["node"]["addresses"],
                    "nlbfarm_peer_listen": c["status"]["peer_listen"],
                    "nlbfarm_install_dir": str(d / "opt/nlbfarm"), "nlbfarm_config_dir": str(d / "etc/nlbfarm"),
                    "nlbfarm_unit_dir": str(d / "etc/systemd/system"), "nlbfarm_run_dir": str(d / "run/nlbfarm"),
                    "nlbfarm_state_dir": str(d / "run/nlbfarm")}
    return {"all": {"children": {"nlbfarm_nodes": {"hosts": nodes, "vars": {
        "ansible_connection": "nlbfarm_netns",
        "ansible_become": False,             # already root in the lab's namespaces; no sudo here
        "ansible_python_interpreter": "/usr/bin/python3",
        "nlbfarm_service_manager": "lab",
        "nlbfarm_apt_update_cache": False,   # lab hosts have no route out
        "nlbfarm_wheelhouse": str(wheelhouse),
        "nlbfarm_version": version,
        "nlbfarm_cluster_name": first["cluster"]["name"],
        "nlbfarm_vips": first["cluster"]["vips"],
        "nlbfarm_buckets": first["cluster"]["buckets"],
        "nlbfarm_etcd_endpoints": first["etcd"]["endpoints"],
        "nlbfarm_etcd": {"prefix": ETCD_PREFIX, "timeout": 0.5, "retry_deadline": 5.0},
        "nlbfarm_timing": t,
        "nlbfarm_token": lab.token_file.read_text().strip(),
        "nlbfarm_healthy_timeout": 60,
        "nlbfarm_drain_wait_timeout": 120,
    }}}}}


def playbook(name: str, inv: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(inv.parent / "ansible-local"),
               ANSIBLE_REMOTE_TEMP=str(inv.parent / "ansible-remote"))
    try:
        return subprocess.run(["ansible-playbook", "-i", str(inv), name, *extra], cwd=ANSIBLE_DIR,
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return subprocess.CompletedProcess(exc.cmd, -1, out + f"\n(ansible-playbook timed out after {timeout:.0f} s)",
                                           "")


def versions(lab: Lab) -> dict[str, str]:
    return {n: m.version for n, m in lab.snapshot().members.items()}


def farmd_pid(tmp: Path, node: str) -> int:
    """The pid of a lab host's farmd, as the lab service manager recorded it."""
    return int((tmp / "hosts" / node / "run/nlbfarm/farmd.pid").read_text())


def ran(stdout: str, task: str) -> list[str]:
    """The headers of the tasks starting with ``task`` that ran (were not skipped), in order."""
    return re.findall(r"^TASK \[(?:nlbfarm : )?(" + re.escape(task) + r"[^\]]*)\][^\n]*\n(?!skipping)",
                      stdout, re.M)


def failed_task(stdout: str, host: str) -> str:
    """The header of the task that failed first on ``host``, from ansible-playbook's output."""
    return stdout.split(f"\nfatal: [{host}]")[0].rsplit("\nTASK [", 1)[-1]


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """Switch, etcd, client and the nodes' application; no farmd anywhere yet."""
    tmp = tmp_path_factory.mktemp("ansible")
    lab = Lab(prefix="tans", state_root=tmp / "labstate",
              timing=LabTiming(drain_timeout=60.0, stop_drain_timeout=20.0, leave_timeout=5.0))
    lab.down()
    try:
        lab._build_network(NODES)
        lab._save_state({"prefix": lab.prefix, "vip": "", "url": "", "subnet": "", "cluster": "lab",
                         "nodes": NODES, "etcd": {"endpoint": ",".join(lab.etcd_endpoints()),
                                                  "netns": lab.ns("etcd"), "pids": {}},
                         "pids": {}, "dir": str(lab.dir), "app": "python"})
        lab._write_token()
        lab.start_etcd()
        for n in NODES:
            lab.start_app(n)
        wheelhouse = tmp / "wheelhouse"
        old, new, newer = base_version(), base_version() + ".post1", base_version() + ".post2"
        build_wheel(tmp, old, wheelhouse, deps=True)
        build_wheel(tmp, new, wheelhouse, deps=False)
        build_wheel(tmp, newer, wheelhouse, deps=False)
        lock_wheelhouse(wheelhouse)
        yield lab, tmp, wheelhouse, old, new, newer
    finally:
        lab.down()
    assert not lab.lab_namespaces()


def write_inventory(farm, version: str, name: str, **group_vars) -> Path:
    lab, tmp, wheelhouse, *_ = farm
    inv = tmp / name
    data = inventory(lab, tmp / "hosts", wheelhouse, version, NODES)
    data["all"]["children"]["nlbfarm_nodes"]["vars"].update(group_vars)
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    return inv


def test_regression_an_install_by_name_from_a_public_index_is_refused(farm):
    """The role's old default (no wheelhouse) ran `pip install nlbfarm==<version>` against
    PyPI, where nobody publishes the name: whoever registers it would run code as root on
    every node. It now refuses before it touches a node."""
    _lab, tmp, _, old, *_ = farm
    inv = write_inventory(farm, old, "inventory-by-name.yml", nlbfarm_wheelhouse="")
    cp = playbook("install.yml", inv, timeout=120)
    (tmp / "by-name.out").write_text(cp.stdout + cp.stderr)
    assert cp.returncode != 0, cp.stdout[-3000:]
    for n in NODES:
        assert failed_task(cp.stdout, n).startswith("nlbfarm : Refuse an install by name from a package index"), \
            cp.stdout[-3000:]
        assert not (tmp / "hosts" / n).exists()
    assert "refusing to install nlbfarm by name from a package index" in cp.stdout, cp.stdout[-3000:]
    assert ran(cp.stdout, "Install from the wheelhouse") == [] and ran(cp.stdout, "Create the venv") == []


@pytest.mark.parametrize("var, value, words", [
    ("nlbfarm_restart_mode", "bounce", "nlbfarm_restart_mode must be one of: restart, reload, got: bounce"),
    ("nlbfarm_vips", {"a": 1}, "nlbfarm_vips"),
])
def test_a_variable_of_the_wrong_type_or_choice_is_refused_by_name(farm, var, value, words):
    """meta/argument_specs.yml: Ansible checks the variables before the role touches a node."""
    _lab, tmp, _, old, *_ = farm
    inv = write_inventory(farm, old, f"inventory-bad-{var}.yml", **{var: value})
    cp = playbook("install.yml", inv, timeout=120)
    assert cp.returncode != 0, cp.stdout[-3000:]
    assert failed_task(cp.stdout, "n1").startswith("nlbfarm : Validating arguments against arg spec 'main'"), \
        cp.stdout[-3000:]
    assert words in cp.stdout, cp.stdout[-3000:]
    assert not any((tmp / "hosts" / n).exists() for n in NODES)


def test_install_from_nothing(farm):
    lab, tmp, _, old, *_ = farm
    for n in NODES:
        assert not (tmp / "hosts" / n).exists()
    inv = write_inventory(farm, old, "inventory-install.yml")
    cp = playbook("install.yml", inv)
    (tmp / "install.out").write_text(cp.stdout + cp.stderr)
    assert cp.returncode == 0, cp.stdout[-6000:] + cp.stderr[-2000:]
    lab.wait_converged(NODES, timeout=30)
    assert set(versions(lab).values()) == {old}
    for n in NODES:
        d = tmp / "hosts" / n
        unit = (d / "etc/systemd/system/farmd.service").read_text()
        assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW" in unit and "ProtectSystem=strict" in unit
        assert f"ExecStart={d}/opt/nlbfarm/.venv/bin/farmd --config {d}/etc/nlbfarm/farmd.yaml" in unit
        cfg = yaml.safe_load((d / "etc/nlbfarm/farmd.yaml").read_text())
        assert cfg["node"]["id"] == n and cfg["node"]["weight"] == 1
        assert cfg["node"]["state_dir"] == str(d / "run/nlbfarm")  # nlbfarm_state_dir: hitless restarts
        # farmd runs with the unit's two capabilities only
        pid = farmd_pid(tmp, n)
        with open(f"/proc/{pid}/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff"))
        assert eff == (1 << 12) | (1 << 13), hex(eff)
    # A second run changes nothing and restarts nothing.
    cp = playbook("install.yml", inv)
    assert cp.returncode == 0, cp.stdout[-4000:]
    recap = [line for line in cp.stdout.splitlines() if line.startswith(tuple(NODES))]
    assert recap and all("failed=0" in line and "changed=0" in line for line in recap), recap
    pids_after = {n: farmd_pid(tmp, n) for n in NODES}
    assert all(lab._alive(p) for p in pids_after.values())


def test_hitless_rolling_upgrade_under_load(farm):
    """The default: each farmd hands its leases and kernel state to the new version's
    process. Nothing moves: the same table generation, the same leases, 0 failed, 0 broken."""
    lab, tmp, _, old, new, _ = farm
    snap = lab.wait_converged(NODES, timeout=30)
    generation, leases = snap.table.generation, {n: lab.member_lease(n) for n in NODES}
    pids = {n: farmd_pid(tmp, n) for n in NODES}
    inv = write_inventory(farm, new, "inventory-hitless.yml")
    load = Load(lab, tmp, duration=HITLESS_LOAD_S)
    try:
        load.wait_until(load.t0 + 10)      # long-lived connections are open on every node
        t = time.time()
        cp = playbook("upgrade.yml", inv, timeout=HITLESS_LOAD_S - 15)
        took = time.time() - t
        (tmp / "hitless.out").write_text(cp.stdout + cp.stderr)
        assert cp.returncode == 0, cp.stdout[-6000:] + cp.stderr[-2000:]
        news, holds = load.finish(settle=SETTLE_S)
    finally:
        load.stop()
    assert set(versions(lab).values()) == {new}, versions(lab)
    snap = lab.wait_converged(NODES, timeout=30)
    assert snap.table.generation == generation, "the upgrade moved buckets"
    assert {n: lab.member_lease(n) for n in NODES} == leases, "a new farmd registered a new lease"
    assert all(farmd_pid(tmp, n) != pids[n] for n in NODES), "a farmd was not restarted"
    # serial: 1, no drain: each node handed over and was back before the next one started
    order = re.findall(r"^TASK \[(?:nlbfarm : )?Upgrade; the new farmd adopts the old one's registration - (n\d)\]",
                       cp.stdout, re.M)
    assert order == NODES, cp.stdout[-3000:]
    assert ran(cp.stdout, "Drain") == [] and ran(cp.stdout, "Undrain") == [], ran(cp.stdout, "Drain")
    for n in NODES:
        log = read_log(tmp / "hosts" / n / "run/nlbfarm/farmd.log")
        assert f"adopted the previous agent's lease node={n}" in log, log[-3000:]
    broken, never = split_holds(holds)
    news = sorted(news + never, key=lambda r: r["t"])
    assert held_max(holds) >= HOLD_CONNS * 0.9
    assert len(news) > 300
    check_exactly_once(lab, news, NODES)
    assert failures(news) == [], failures(news)[:5]
    assert broken == [], broken[:5]
    print(f"hitless rolling upgrade {old} -> {new}: {took:.0f} s, {len(news)} new connections, "
          f"{len(holds)} long-lived, 0 failed, 0 broken, table generation {generation} throughout")


def test_rolling_upgrade_with_drain_under_load(farm):
    """nlbfarm_upgrade_drain (the application restarts too): each node drained, upgraded,
    undrained and back in turn."""
    lab, tmp, _, _, new, newer = farm
    lab.wait_converged(NODES, timeout=30)
    inv = write_inventory(farm, newer, "inventory-upgrade.yml", nlbfarm_upgrade_drain=True)
    load = Load(lab, tmp, duration=UPGRADE_LOAD_S)
    try:
        load.wait_until(load.t0 + 10)      # long-lived connections are open on every node
        t = time.time()
        cp = playbook("upgrade.yml", inv, timeout=UPGRADE_LOAD_S - 15)
        took = time.time() - t
        assert cp.returncode == 0, cp.stdout[-6000:] + cp.stderr[-2000:]
        news, holds = load.finish(settle=SETTLE_S)
    finally:
        load.stop()
    assert set(versions(lab).values()) == {newer}, versions(lab)
    lab.wait_converged(NODES, timeout=30)
    # serial: 1 -- each node was drained, upgraded and back before the next one started
    order = ran(cp.stdout, "Drain, and wait")
    assert [o[-2:] for o in order] == NODES and len(ran(cp.stdout, "Undrain n")) == 3, cp.stdout[-3000:]
    assert ran(cp.stdout, "Upgrade; the new farmd") == [], "the hitless block ran in a drained upgrade"
    broken, never = split_holds(holds)
    news = sorted(news + never, key=lambda r: r["t"])
    assert held_max(holds) >= HOLD_CONNS * 0.9
    assert len(news) > 500
    check_exactly_once(lab, news, NODES)
    assert failures(news) == [], failures(news)[:5]
    assert broken == [], broken[:5]
    print(f"rolling upgrade with drain {new} -> {newer}: {took:.0f} s, {len(news)} new connections, "
          f"{len(holds)} long-lived, 0 failed, 0 broken")


def test_a_refused_configuration_undrains_the_node_and_stops_the_rollout(farm):
    """n1's new configuration fails farmd --check after n1 was drained: the rescue undrains
    it, its old farmd keeps running with the old file and serves again, n2 and n3 are untouched."""
    lab, tmp, *_, newer = farm
    lab.wait_converged(NODES, timeout=30)
    inv = write_inventory(farm, newer, "inventory-refused.yml", nlbfarm_upgrade_drain=True)
    data = yaml.safe_load(inv.read_text())
    n1_vars = data["all"]["children"]["nlbfarm_nodes"]["hosts"]["n1"]
    timing = dict(data["all"]["children"]["nlbfarm_nodes"]["vars"]["nlbfarm_timing"])
    n1_vars["nlbfarm_timing"] = {**timing, "fence_timeout": int(timing["lease_ttl"]) + 1}  # must be < lease_ttl
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    before = {n: (tmp / "hosts" / n / "etc/nlbfarm/farmd.yaml").read_text() for n in NODES}
    pids = {n: farmd_pid(tmp, n) for n in NODES}
    cp = playbook("upgrade.yml", inv, timeout=200)
    (tmp / "refused.out").write_text(cp.stdout + cp.stderr)
    assert cp.returncode != 0, cp.stdout[-3000:]
    fatal = failed_task(cp.stdout, "n1")
    assert fatal.startswith("nlbfarm : Write farmd.yaml, validated by farmd --check"), cp.stdout[-4000:]
    assert "must be less than" in cp.stdout, cp.stdout[-3000:]
    # The drain had happened (the refusal came after it), and the rescue lifted it.
    assert "TASK [nlbfarm : Drain, and wait until the node serves no connection - n1]" in cp.stdout
    assert re.search(r"TASK \[nlbfarm : Undrain after the failed upgrade - n1\][^\n]*\nchanged: \[n1\]",
                     cp.stdout), cp.stdout[-3000:]
    assert "n1" not in lab.snapshot().drains
    for n in NODES:  # nothing restarted, n1's file untouched; n2 and n3 never reached
        assert (tmp / "hosts" / n / "etc/nlbfarm/farmd.yaml").read_text() == before[n]
        assert farmd_pid(tmp, n) == pids[n]
    assert "serves no connection - n2" not in cp.stdout
    lab.wait_converged(NODES, timeout=30)  # n1 takes its share again


def test_a_node_that_does_not_come_back_aborts_the_rollout(farm):
    """n1's new configuration has a health check that never passes: after its hitless restart
    n1 leaves the table, the rollout stops, n2 and n3 are not touched."""
    lab, tmp, *_, newer = farm
    inv = write_inventory(farm, newer, "inventory-broken.yml")
    data = yaml.safe_load(inv.read_text())
    data["all"]["children"]["nlbfarm_nodes"]["hosts"]["n1"].update({
        "nlbfarm_healthy_timeout": 12,
        "nlbfarm_module": {"name": "app", "checks": [
            {"name": "never", "type": "tcp", "port": 9, "interval": 0.5, "timeout": 0.2}]}})
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    before = {n: (tmp / "hosts" / n / "etc/nlbfarm/farmd.yaml").read_text() for n in NODES}
    pids = {n: farmd_pid(tmp, n) for n in ("n2", "n3")}
    cp = playbook("upgrade.yml", inv, timeout=200)
    (tmp / "broken.out").write_text(cp.stdout + cp.stderr)
    assert cp.returncode != 0, cp.stdout[-3000:]
    assert "n1" in cp.stdout and "serves no connection - n2" not in cp.stdout, cp.stdout[-4000:]
    # The task that failed is n1's wait for health (after its hitless restart: no drain).
    tasks = re.findall(r"^TASK \[(?:nlbfarm : )?(.*?)\]", cp.stdout, re.M)
    fatal = failed_task(cp.stdout, "n1")
    assert fatal.startswith("nlbfarm : Wait until the node is active, in the table and healthy - n1"), \
        cp.stdout[-4000:]
    assert "Stop the rollout" in tasks and ran(cp.stdout, "Drain") == [] and ran(cp.stdout, "Undrain") == [], tasks
    assert "Upgrade; the new farmd adopts the old one's registration - n1" in tasks, tasks
    assert re.search(r'upgrade of n1 failed at \\?"Wait until the node is active', cp.stdout), cp.stdout[-3000:]
    assert "n1" not in lab.snapshot().drains
    # n2 and n3: same config, and the same farmd processes (never restarted)
    for n in ("n2", "n3"):
        assert (tmp / "hosts" / n / "etc/nlbfarm/farmd.yaml").read_text() == before[n]
        assert farmd_pid(tmp, n) == pids[n], f"{n}'s farmd was restarted"
        assert lab._alive(pids[n]), f"{n}'s farmd is gone"
    assert (tmp / "hosts" / "n1" / "etc/nlbfarm/farmd.yaml").read_text() != before["n1"]
    lab.wait_converged(["n2", "n3"], timeout=30)


def test_a_wheel_that_differs_from_its_lock_is_refused(farm):
    """A wheel changed after the controller locked it (on the controller, in transit or on
    the node) is refused by pip's hash check; the node keeps its farmd and its version."""
    lab, tmp, wheelhouse, old, *_ = farm
    tampered = tmp / "wheelhouse-tampered"
    shutil.copytree(wheelhouse, tampered)
    version = old + ".post3"
    build_wheel(tmp, version, tampered, deps=False)
    lock_wheelhouse(tampered, version)
    (wheel,) = tampered.glob(f"nlbfarm-{version}-*.whl")
    with wheel.open("ab") as f:
        f.write(b"\0")
    inv = write_inventory(farm, version, "inventory-tampered.yml", nlbfarm_wheelhouse=str(tampered))
    pid, before = farmd_pid(tmp, "n2"), versions(lab)["n2"]
    cp = playbook("install.yml", inv, "--limit", "n2", timeout=200)
    (tmp / "tampered.out").write_text(cp.stdout + cp.stderr)
    assert cp.returncode != 0, cp.stdout[-3000:]
    assert failed_task(cp.stdout, "n2").startswith("nlbfarm : Install from the wheelhouse, every wheel pinned"), \
        cp.stdout[-3000:]
    assert "DO NOT MATCH THE HASHES" in cp.stdout, cp.stdout[-3000:]
    assert farmd_pid(tmp, "n2") == pid and lab._alive(pid) and versions(lab)["n2"] == before


UPGRADE_LOAD_S = 160
HITLESS_LOAD_S = 100
