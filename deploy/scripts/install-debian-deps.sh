#!/usr/bin/env bash
# Installs the Debian packages nlbfarm needs on a node, a lab machine or CI.
# Idempotent: apt is only called when a package is missing.
set -euo pipefail
PKGS=(nftables python3-nftables python3-venv python3-pip etcd-server etcd-client
      iproute2 conntrack curl iputils-ping procps nginx-light
      # make bench: load generators and the peers it compares against
      wrk iperf3 haproxy keepalived iptables netsniff-ng
      # deploy/ansible: the role, its playbooks and their lint (tests/lab/test_ansible.py)
      # (python3-apt for its apt tasks, systemd for systemd-analyze verify of the unit)
      ansible-core ansible-lint python3-apt systemd)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "nlbfarm: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Packages such as etcd-server, nginx, haproxy and keepalived start their service on install.
  # nlbfarm runs its own instances (in lab namespaces, or under farmd's farm
  # module), so keep apt from starting them on this machine.
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$guard" && chmod 755 "$guard"
    trap 'rm -f "$guard"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
