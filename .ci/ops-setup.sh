#!/usr/bin/env bash
# Tools the operational-asset tests need (tests/unit/test_systemd_unit.py, test_vagrant.py,
# test_deploy_manifests.py); each of those tests skips when its tool is missing, so this script is
# what makes CI run them:
#   systemd           systemd-analyze verify / security --offline for systemd/kproxy.service
#   systemd-container systemd-nspawn: boots systemd in a throwaway container (overlay of / on a
#                     tmpfs, private network) to run the unit for real
#   vagrant           `vagrant validate` of vagrant/Vagrantfile (Debian's vagrant; vagrant-libvirt
#                     supplies the provider whose settings get validated)
#   ShellCheck        lints the lab's provisioning scripts and check.sh
#   kubernetes-validate (PyPI)  strict schema validation of deploy/ and vagrant/examples/
#                     against the OpenAPI schemas it bundles (no download at test time)
# Idempotent; run as root on Debian 12. Called by scripts/setup.sh.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON="${PYTHON:-python3}"
APT_PKGS=(systemd systemd-container vagrant vagrant-libvirt shellcheck)

log() { echo "ops-setup: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root"
  exit 1
fi

missing=()
for pkg in "${APT_PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  if ! apt-cache show "${missing[0]}" >/dev/null 2>&1; then
    apt-get update -qq
  fi
  log "apt-get install ${missing[*]}"
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! "$PYTHON" -c "import kubernetes_validate" 2>/dev/null; then
  log "pip install kubernetes-validate"
  "$PYTHON" -m pip install -q kubernetes-validate
fi

log "systemd-analyze $(systemd-analyze --version | head -1 | cut -d' ' -f2)," \
  "$(vagrant --version 2>/dev/null || echo 'no vagrant')," \
  "shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
