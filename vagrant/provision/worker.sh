#!/usr/bin/env bash
# A worker: wait for the control plane, kubeadm join, start kproxy. Safe to run again.
set -euo pipefail
: "${NODE_NAME:?}" "${NODE_IP:?}" "${CONTROL_PLANE_IP:?}" "${JOIN_TOKEN:?}" "${KPROXY_TOKEN:?}"
SRC=/kproxy-src
log() { echo "==> [$NODE_NAME] $*"; }
# shellcheck source=SCRIPTDIR/start-kproxy.sh
source "$SRC/vagrant/provision/start-kproxy.sh"

if [ ! -f /etc/kubernetes/kubelet.conf ]; then
  # Providers may bring machines up in parallel (libvirt does): wait for the API server.
  log "waiting for the API server at $CONTROL_PLANE_IP:6443"
  for _ in $(seq 1 180); do
    curl -skf "https://$CONTROL_PLANE_IP:6443/readyz" >/dev/null && break
    sleep 5
  done
  cat > /root/kubeadm-join.yaml <<KUBEADM
apiVersion: kubeadm.k8s.io/v1beta4
kind: JoinConfiguration
discovery:
  bootstrapToken:
    token: "$JOIN_TOKEN"
    apiServerEndpoint: $CONTROL_PLANE_IP:6443
    # A throwaway lab on a host-only network: trust the first CA seen instead of pinning its hash.
    unsafeSkipCAVerification: true
nodeRegistration:
  name: $NODE_NAME
  criSocket: unix:///run/containerd/containerd.sock
  kubeletExtraArgs:
    - name: node-ip
      value: $NODE_IP
KUBEADM
  log "kubeadm join"
  kubeadm join --config /root/kubeadm-join.yaml
fi

log "kproxy"
start_kproxy
