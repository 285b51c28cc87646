#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine (as root) to run kproxy and its tests:
# the kernel tools kproxy drives, the test peers, the IPVS test VM, and kproxy itself.
# Idempotent. Set KPROXY_SKIP_VM=1 to skip the IPVS VM tooling (a kernel download).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (sudo)" >&2
  exit 1
fi

echo "== system packages" >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  iptables ipset conntrack iproute2 nftables bind9-dnsutils procps kmod python3-pip \
  iputils-arping wrk iperf3 >/dev/null

for extra in .ci/ops-setup.sh .ci/vm-setup.sh; do
  if [ -f "$extra" ]; then
    if [ "$extra" = .ci/vm-setup.sh ] && [ "${KPROXY_SKIP_VM:-0}" = 1 ]; then
      continue
    fi
    echo "== $extra" >&2
    bash "$extra" >&2
  fi
done

echo "== kproxy (pip install -e .[dev])" >&2
python3 -m pip install -q -e '.[dev]'
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
echo "setup done: try 'sudo kproxy demo' or 'sudo python3 -m pytest'" >&2
