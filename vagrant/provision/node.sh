#!/usr/bin/env bash
# Every node: kernel settings, containerd, kubelet/kubeadm/kubectl from pkgs.k8s.io, and kproxy
# installed (not started: it needs the cluster, see start-kproxy.sh). Safe to run again.
set -euo pipefail
: "${NODE_NAME:?}" "${NODE_IP:?}" "${LAB_NODES:?}" "${K8S_MINOR:?}" "${KPROXY_MODE:?}"
export DEBIAN_FRONTEND=noninteractive
SRC=/kproxy-src
log() { echo "==> [$NODE_NAME] $*"; }

log "hosts"
for entry in $LAB_NODES; do
  name=${entry%%=*} ip=${entry#*=}
  sed -i "/[[:space:]]$name\$/d" /etc/hosts
  echo "$ip $name" >> /etc/hosts
done

log "swap off (kubelet refuses to run with swap by default)"
swapoff -a
sed -i -E 's/^([^#].*[[:space:]]swap[[:space:]].*)$/# \1/' /etc/fstab

log "kernel modules and sysctls (kproxy's own snippets)"
install -m 0644 "$SRC/systemd/modules-load.d/kproxy.conf" /etc/modules-load.d/kproxy.conf
install -m 0644 "$SRC/systemd/modules-load.d/kproxy-ipvs.conf" /etc/modules-load.d/kproxy-ipvs.conf
echo overlay > /etc/modules-load.d/containerd.conf
systemctl restart systemd-modules-load.service
install -m 0644 "$SRC/systemd/sysctl.d/90-kproxy.conf" /etc/sysctl.d/90-kproxy.conf
if [ "$KPROXY_MODE" = ipvs ] && [ -n "${LB_POOL:-}" ]; then
  install -m 0644 "$SRC/systemd/sysctl.d/91-kproxy-strict-arp.conf" /etc/sysctl.d/
fi
sysctl --system >/dev/null

log "packages"
apt-get update -q
apt-get install -y -q --no-install-recommends \
  ca-certificates curl gpg apt-transport-https containerd runc \
  iptables ipset ipvsadm conntrack iproute2 dnsutils jq \
  python3 python3-venv python3-pip

log "containerd (systemd cgroups, kubeadm's pause image)"
mkdir -p /etc/containerd
containerd config default > /etc/containerd/config.toml
sed -i -E \
  -e 's/^([[:space:]]*SystemdCgroup[[:space:]]*=[[:space:]]*).*/\1true/' \
  -e 's#^([[:space:]]*sandbox_image[[:space:]]*=[[:space:]]*).*#\1"registry.k8s.io/pause:3.10"#' \
  -e 's#^([[:space:]]*bin_dir[[:space:]]*=[[:space:]]*).*#\1"/opt/cni/bin"#' \
  /etc/containerd/config.toml
grep -q 'SystemdCgroup = true' /etc/containerd/config.toml
systemctl restart containerd
systemctl enable containerd

log "kubelet, kubeadm, kubectl v$K8S_MINOR"
install -d -m 0755 /etc/apt/keyrings
curl -fsSL "https://pkgs.k8s.io/core:/stable:/v$K8S_MINOR/deb/Release.key" \
  | gpg --dearmor --yes -o /etc/apt/keyrings/kubernetes-apt-keyring.gpg
echo "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] https://pkgs.k8s.io/core:/stable:/v$K8S_MINOR/deb/ /" \
  > /etc/apt/sources.list.d/kubernetes.list
apt-get update -q
apt-get install -y -q kubelet kubeadm kubectl
apt-mark hold kubelet kubeadm kubectl >/dev/null
systemctl enable kubelet

log "kproxy from $SRC"
if [ ! -x /opt/kproxy/bin/python ]; then
  python3 -m venv /opt/kproxy
fi
/opt/kproxy/bin/pip install --quiet --upgrade pip
/opt/kproxy/bin/pip install --quiet "$SRC"
ln -sf /opt/kproxy/bin/kproxy /usr/local/bin/kproxy
kproxy version
