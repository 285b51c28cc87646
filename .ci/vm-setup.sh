#!/usr/bin/env bash
# Prepare this machine to boot Debian's kernel under qemu (virtme-ng) for the `vm` test tier.
#
# Idempotent; run as root on Debian 12 after `apt-get update`. What it does:
#   1. apt-get install the guest tools (qemu, kmod, busybox, ipvsadm, ipset, iptables, conntrack, iproute2);
#   2. pip install virtme-ng (provides `vng`);
#   3. apt-get download the Debian kernel named by `apt-cache depends linux-image-amd64` and
#      dpkg -x it into $KPROXY_VM_CACHE (default /var/lib/kproxy-vm/<pkg>; not under /var/cache,
#      which the guest masks with a tmpfs, and virtme-ng links the guest's /lib/modules/<ver> to the
#      modules beside the vmlinuz it boots);
#   4. copy its lib/modules/<ver> to /lib/modules/<ver> and run depmod, so `modprobe ip_vs` works in
#      the guest (the guest sees the host's root filesystem read-only).
# It prints the vmlinuz path on its last line and records it in $KPROXY_VM_CACHE/current-vmlinuz,
# which tests/vm/run_in_vm.py reads. A rerun with everything in place only checks and returns.
set -euo pipefail

CACHE="${KPROXY_VM_CACHE:-/var/lib/kproxy-vm}"
PYTHON="${PYTHON:-python3}"
APT_PKGS=(qemu-system-x86 kmod busybox-static ipvsadm ipset iptables conntrack iproute2)

log() { echo "vm-setup: $*" >&2; }

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
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

if ! command -v vng >/dev/null 2>&1 && ! "$PYTHON" -c "import virtme_ng" 2>/dev/null; then
    log "pip install virtme-ng"
    "$PYTHON" -m pip install -q virtme-ng >&2
fi
# pyenv shims need a rehash before a new console script is on PATH.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true
fi

kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
if [[ -z "$kpkg" ]]; then
    log "cannot find the kernel package linux-image-amd64 depends on (run apt-get update first)"
    exit 1
fi
kver=${kpkg#linux-image-}
dest="$CACHE/$kpkg"
vmlinuz="$dest/boot/vmlinuz-$kver"

if [[ ! -f "$vmlinuz" || ! -f "$dest/lib/modules/$kver/modules.dep" ]]; then
    log "downloading $kpkg"
    mkdir -p "$CACHE"
    tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
    chmod 755 "$tmp"  # apt-get download runs as _apt when it can
    (cd "$tmp" && apt-get download -q "$kpkg" >&2)
    rm -rf "$dest.partial"
    dpkg -x "$tmp"/"$kpkg"_*.deb "$dest.partial"
    # virtme-ng links the guest's /lib/modules/<ver> to the modules beside the vmlinuz it boots,
    # so the extracted tree needs its own modules.dep (a package's postinst would make it).
    depmod -b "$dest.partial" "$kver"
    rm -rf "$tmp" "$dest"
    mv "$dest.partial" "$dest"
fi

if [[ ! -f "/lib/modules/$kver/modules.dep" ]] || [[ ! -f "/lib/modules/$kver/.kproxy-vm" ]]; then
    log "installing modules for $kver into /lib/modules/$kver"
    mkdir -p /lib/modules
    rm -rf "/lib/modules/$kver"
    cp -a "$dest/lib/modules/$kver" "/lib/modules/$kver"
    depmod "$kver"
    touch "/lib/modules/$kver/.kproxy-vm"
fi

echo "$vmlinuz" >"$CACHE/current-vmlinuz"
log "ready: kernel $kver"
echo "$vmlinuz"
