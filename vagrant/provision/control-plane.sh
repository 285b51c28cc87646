#!/usr/bin/env bash
# The control plane: kubeadm init without kube-proxy and CoreDNS (kproxy does both), kproxy, then
# flannel as the CNI. Safe to run again: an initialised node skips kubeadm init.
set -euo pipefail
: "${NODE_NAME:?}" "${NODE_IP:?}" "${POD_CIDR:?}" "${SERVICE_CIDR:?}" "${JOIN_TOKEN:?}"
: "${KPROXY_TOKEN:?}" "${HOST_IP:?}" "${FLANNEL_RELEASE:?}"
SRC=/kproxy-src
log() { echo "==> [$NODE_NAME] $*"; }
# shellcheck source=SCRIPTDIR/start-kproxy.sh
source "$SRC/vagrant/provision/start-kproxy.sh"
export KUBECONFIG=/etc/kubernetes/admin.conf

if [ ! -f /etc/kubernetes/admin.conf ]; then
  log "kubeadm init"
  install -d -m 0700 /etc/kubernetes/pki
  # kproxy's API identity: a static token (the API server mounts /etc/kubernetes/pki already).
  echo "$KPROXY_TOKEN,kproxy,kproxy,\"kproxy:nodes\"" > /etc/kubernetes/pki/kproxy-tokens.csv
  chmod 0600 /etc/kubernetes/pki/kproxy-tokens.csv
  cat > /root/kubeadm.yaml <<KUBEADM
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
bootstrapTokens:
  - token: "$JOIN_TOKEN"
    ttl: "0s"   # a lab: workers added later can still join
    groups: ["system:bootstrappers:kubeadm:default-node-token"]
    usages: ["signing", "authentication"]
localAPIEndpoint:
  advertiseAddress: $NODE_IP
nodeRegistration:
  name: $NODE_NAME
  criSocket: unix:///run/containerd/containerd.sock
  kubeletExtraArgs:
    - name: node-ip
      value: $NODE_IP
skipPhases:
  - addon/kube-proxy   # kproxy programs Services
  - addon/coredns      # kproxy answers cluster DNS on every node
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
controlPlaneEndpoint: $NODE_IP:6443
networking:
  podSubnet: $POD_CIDR
  serviceSubnet: $SERVICE_CIDR
  dnsDomain: cluster.local
apiServer:
  extraArgs:
    - name: token-auth-file
      value: /etc/kubernetes/pki/kproxy-tokens.csv
---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
# Pods resolve through kproxy's node-local DNS (NodeLocal DNSCache's address).
clusterDNS: ["169.254.20.10"]
clusterDomain: cluster.local
KUBEADM
  kubeadm init --config /root/kubeadm.yaml
fi

log "kubectl for the vagrant user"
install -d -o vagrant -g vagrant /home/vagrant/.kube
install -m 0600 -o vagrant -g vagrant /etc/kubernetes/admin.conf /home/vagrant/.kube/config

log "kproxy's RBAC (deploy/rbac.yaml) bound to the lab's kproxy token group"
kubectl apply -f "$SRC/deploy/rbac.yaml"
kubectl create clusterrolebinding kproxy-lab-nodes --clusterrole=kproxy --group=kproxy:nodes \
  --dry-run=client -o yaml | kubectl apply -f -
if [ -n "${LB_POOL:-}" ]; then
  log "LoadBalancer pool $LB_POOL: deploy/loadbalancer/rbac.yaml bound to the same group"
  kubectl apply -f "$SRC/deploy/loadbalancer/rbac.yaml"
  kubectl create clusterrolebinding kproxy-lab-loadbalancer --clusterrole=kproxy-loadbalancer \
    --group=kproxy:nodes --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n kube-system create rolebinding kproxy-lab-loadbalancer --role=kproxy-loadbalancer \
    --group=kproxy:nodes --dry-run=client -o yaml | kubectl apply -f -
fi

log "kproxy"
start_kproxy

log "flannel (host-gw: plain routes between nodes on the host-only network)"
if [ "$FLANNEL_RELEASE" = latest ]; then
  url=https://github.com/flannel-io/flannel/releases/latest/download/kube-flannel.yml
else
  url=https://github.com/flannel-io/flannel/releases/download/$FLANNEL_RELEASE/kube-flannel.yml
fi
curl -fsSL "$url" -o /root/kube-flannel.yml
# host-gw instead of VXLAN, and the host-only NIC instead of the NAT one (eth0 has the same
# address on every VirtualBox VM): the interface that routes towards the host-only gateway.
sed -i -E \
  -e 's/"Type": "vxlan"/"Type": "host-gw"/' \
  -e "s/^([[:space:]]*)- --kube-subnet-mgr\$/&\n\1- --iface-can-reach=$HOST_IP/" \
  /root/kube-flannel.yml
grep -q '"Type": "host-gw"' /root/kube-flannel.yml
grep -q -- "--iface-can-reach=$HOST_IP" /root/kube-flannel.yml
grep -q "\"Network\": \"$POD_CIDR\"" /root/kube-flannel.yml
kubectl apply -f /root/kube-flannel.yml

log "waiting for this node to be Ready"
kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=300s
kubectl get nodes -o wide

if [ "${INGRESS_NGINX_RELEASE:-none}" != none ]; then
  # The course's Ingress controller, behind a LoadBalancer Service: kproxy's pool gives it an
  # EXTERNAL-IP on the host-only network (vagrant/examples/ingress-*.yaml, docs/lab.md).
  log "ingress-nginx $INGRESS_NGINX_RELEASE (cloud provider manifest: a LoadBalancer Service)"
  url=https://raw.githubusercontent.com/kubernetes/ingress-nginx/$INGRESS_NGINX_RELEASE/deploy/static/provider/cloud/deploy.yaml
  curl -fsSL "$url" -o /root/ingress-nginx.yaml
  grep -q "type: LoadBalancer" /root/ingress-nginx.yaml
  kubectl apply -f /root/ingress-nginx.yaml
  kubectl -n ingress-nginx get svc ingress-nginx-controller -o wide || true
fi
