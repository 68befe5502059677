#!/usr/bin/env bash
# Installs the Debian packages nlbfarm needs on a node, a lab machine or CI.
# Idempotent: apt is only called when a package is missing.
set -euo pipefail
PKGS=(nftables python3-nftables python3-venv python3-pip etcd-server etcd-client
      iproute2 conntrack curl iputils-ping procps)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "nlbfarm: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
