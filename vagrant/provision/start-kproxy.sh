#!/usr/bin/env bash
# Sourced by control-plane.sh and worker.sh once the node has joined: configure kproxy and start
# it as a systemd unit. The node's own API credentials (the kubeadm bootstrap token or kubelet's
# client certificate) are not used: kproxy authenticates with its own token, which the API server
# maps to the group kproxy:nodes, bound to deploy/rbac.yaml's read-only ClusterRole (and, for the
# address pool, to deploy/loadbalancer/rbac.yaml's roles).

start_kproxy() {
  local src=/kproxy-src
  install -d -m 0755 /etc/kproxy
  # The unit, its IPVS drop-in, and the files it reads.
  install -m 0644 "$src/systemd/kproxy.service" /etc/systemd/system/kproxy.service
  if [ "$KPROXY_MODE" = ipvs ]; then
    install -d /etc/systemd/system/kproxy.service.d
    install -m 0644 "$src/systemd/kproxy-ipvs.conf" /etc/systemd/system/kproxy.service.d/ipvs.conf
  else
    rm -f /etc/systemd/system/kproxy.service.d/ipvs.conf
  fi
  sed -E \
    -e "s/^mode: [a-z]+/mode: $KPROXY_MODE/" \
    -e "s/^hostnameOverride: \"\"/hostnameOverride: \"$NODE_NAME\"/" \
    -e "s#^clusterCIDR: .*#clusterCIDR: $POD_CIDR#" \
    "$src/systemd/config.yaml" > /etc/kproxy/config.yaml
  grep -q "^mode: $KPROXY_MODE" /etc/kproxy/config.yaml

  umask 077
  cat > /etc/kproxy/kubeconfig <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
  - name: lab
    cluster:
      # The real API server, never the kubernetes Service's ClusterIP: kproxy programs that one.
      server: https://$CONTROL_PLANE_IP:6443
      certificate-authority: /etc/kubernetes/pki/ca.crt
users:
  - name: kproxy
    user:
      token: $KPROXY_TOKEN
contexts:
  - name: kproxy
    context: {cluster: lab, user: kproxy}
current-context: kproxy
KUBECONFIG
  umask 022
  # LoadBalancer addresses from the lab's pool on the host-only network (empty: none)
  echo "KPROXY_ARGS=\"--kubeconfig /etc/kproxy/kubeconfig -v=2${LB_POOL:+ --lb-pool $LB_POOL}\"" \
    > /etc/default/kproxy

  systemctl daemon-reload
  systemctl enable kproxy.service
  # Type=notify: this returns once kproxy reported READY=1 after its first sync.
  if ! systemctl restart kproxy.service; then
    journalctl -u kproxy.service -n 60 --no-pager
    return 1
  fi
  systemctl --no-pager --lines=5 status kproxy.service
}
