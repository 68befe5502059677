# nlbfarm: every target installs what it needs (run as root on Debian 12).
VENV    := .venv
PY      := $(VENV)/bin/python
PYTEST  := $(VENV)/bin/pytest
# Debian's interpreter: the nftables binding exists only as python3-nftables.
SYSPY   := /usr/bin/python3

.PHONY: all deps venv proto wheelhouse test unit faults safety demo bench lab-down clean

all: venv

deps: $(VENV)/.deb-stamp
$(VENV)/.deb-stamp: deploy/scripts/install-debian-deps.sh
	bash deploy/scripts/install-debian-deps.sh
	mkdir -p $(VENV) && touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: $(VENV)/.deb-stamp setup.cfg pyproject.toml
	test -x $(PY) || $(SYSPY) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# The stubs are committed (a wheel from a fresh clone needs them); regenerate
# them after editing proto/farm.proto. A unit test checks they are current.
proto: $(VENV)/.stamp
	$(PY) deploy/scripts/gen_proto.py

# What the Ansible role installs from (nlbfarm_wheelhouse): the nlbfarm wheel,
# its dependencies, and nlbfarm-<version>.lock pinning every wheel by hash.
# Build it where the nodes' Python and CPU are.
wheelhouse: venv
	$(PY) -m pip wheel -q --disable-pip-version-check -w wheelhouse .
	$(PY) deploy/scripts/wheelhouse_lock.py wheelhouse

test: venv
	$(PYTEST) -q

unit: venv
	$(PYTEST) -q tests/unit

# Runs the fault tests (also part of `make test`) and writes their figures into
# the README's "Faults survived" table.
faults: venv
	rm -f faults.json
	NLBFARM_FAULTS_REPORT=$(CURDIR)/faults.json $(PYTEST) -q -m faults tests/lab/test_faults.py
	$(PY) -m nlbfarm.faultreport faults.json README.md
	rm -f faults.json

# The README's "Safety under faults" table: the lab's safety trials on the real
# kernel and etcd, then SIM_SEEDS simulated seeds (python -m nlbfarm.sim).
SIM_SEEDS ?= 5000
safety: venv
	rm -f bench/results/safety-lab.json
	NLBFARM_SAFETY_REPORT=$(CURDIR)/bench/results/safety-lab.json $(PYTEST) -q tests/lab/test_safety.py
	$(PY) -m nlbfarm.sim --seeds $(SIM_SEEDS) --readme README.md --lab-report bench/results/safety-lab.json

# Every benchmark, one report: bench/results/<date>.{json,md} and the README's summary table.
bench: venv
	$(PY) -m nlbfarm.bench --out bench/results --readme README.md

demo: venv
	$(PY) -m nlbfarm.demo

lab-down: venv
	$(VENV)/bin/farmctl lab down

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
