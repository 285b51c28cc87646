#!/usr/bin/env bash
# Deploy the classic example services (vagrant/examples/) and check them through kproxy.
#
#   ./check.sh                                  on the host, next to the Vagrantfile: runs the
#                                               in-cluster checks on the control plane, then
#                                               curls the NodePorts from the host
#   sudo bash /kproxy-src/vagrant/check.sh      on the control plane (vagrant ssh cp)
#
# One PASS/FAIL line per check, the commands and output worth reading in between, then
# "N passed, N failed". Exits 1 when a check failed.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
NODE_IPS=${KPROXY_LAB_NODE_IPS:-"192.168.56.10 192.168.56.11 192.168.56.12"}
MYSQL_IP=10.96.100.50
NODEPORT=30080
DNS_IP=169.254.20.10
ZONE=cluster.local
passed=0
failed=0

pass() { echo "PASS  $*"; passed=$((passed + 1)); }
fail() { echo "FAIL  $*"; failed=$((failed + 1)); }
check() { # check DESCRIPTION COMMAND...: PASS when the command succeeds
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
show() { # show COMMAND...: print a command and its output, indented
  echo "      \$ $*"
  "$@" 2>&1 | sed 's/^/        /'
}
summary() {
  echo
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

# The distinct pod names that answer N requests to URL (nginx pods reply "pod=NAME ...").
pods_behind() {
  local url=$1 n=${2:-20}
  for _ in $(seq "$n"); do
    curl -s -m 3 "$url" | sed -n 's/^pod=\([^ ]*\).*/\1/p'
  done | sort -u
}

reaches_all_nginx() { # URL
  local seen
  seen=$(pods_behind "$1" 20 | tr '\n' ' ')
  echo "      $1 answered from: ${seen:-nothing}"
  [ "$(echo "$seen" | wc -w)" -eq 3 ]
}

# ----------------------------------------------------------------------------------------------
host_mode() {
  if ! command -v vagrant >/dev/null; then
    echo "check.sh: run it on the host (needs vagrant) or on the control plane (needs kubectl)" >&2
    exit 2
  fi
  cd "$HERE" || exit 2
  echo "== on the control plane (vagrant ssh cp)"
  vagrant ssh cp -c "sudo bash /kproxy-src/vagrant/check.sh"
  local in_vm=$?
  echo
  echo "== from the host"
  if command -v curl >/dev/null; then
    for ip in $NODE_IPS; do
      check "host -> NodePort $ip:$NODEPORT spreads over the 3 nginx pods" \
        reaches_all_nginx "http://$ip:$NODEPORT/"
    done
    local lb_ip
    lb_ip=$(vagrant ssh cp -c "sudo kubectl --kubeconfig /etc/kubernetes/admin.conf get svc \
      nginx-loadbalancer -o jsonpath='{.status.loadBalancer.ingress[0].ip}'" 2>/dev/null | tr -d '\r')
    if [ -n "$lb_ip" ]; then
      check "host -> LoadBalancer $lb_ip (ARP answered by one node) reaches the 3 nginx pods" \
        reaches_all_nginx "http://$lb_ip/"
    fi
  else
    echo "      (curl is not installed on the host: skipped)"
  fi
  summary && [ "$in_vm" -eq 0 ]
}

# ----------------------------------------------------------------------------------------------
toolbox() { kubectl exec toolbox -- "$@"; }

addresses_in() { # the IPv4 answers in busybox nslookup output, minus the server's own address
  grep -Eo '([0-9]{1,3}\.){3}[0-9]{1,3}' | grep -vx "$DNS_IP" | sort -u
}

mysql_greets() {
  toolbox sh -c "sleep 2 | nc -w 3 $MYSQL_IP 3306" 2>/dev/null |
    grep -aq -e caching_sha2_password -e mysql_native_password
}

resolves_to() { # NAME EXPECTED-IPS...
  local name=$1
  shift
  local got want
  got=$(toolbox nslookup "$name" 2>&1 | addresses_in | tr '\n' ' ')
  want=$(printf '%s\n' "$@" | sort -u | tr '\n' ' ')
  echo "      $name -> ${got:-nothing} (expected $want)"
  [ -n "$got" ] && [ "$got" = "$want" ]
}

is_cname_of() { # NAME TARGET
  toolbox nslookup "$1" 2>&1 | grep -q "$2"
}

short_name_works() {
  toolbox wget -q -T 3 -O - http://nginx-nodeport/ | grep -q '^pod='
}

lb_address() {
  kubectl get svc nginx-loadbalancer -o jsonpath='{.status.loadBalancer.ingress[0].ip}'
}

lb_address_assigned() { # within 30 s, an address of the lab's pool (192.168.56.200-220)
  local i ip
  for i in $(seq 30); do
    ip=$(lb_address)
    if [ -n "$ip" ]; then
      echo "      EXTERNAL-IP $ip (after ${i}s)"
      [ "${ip%.*}" = 192.168.56 ] && [ "${ip##*.}" -ge 200 ] && [ "${ip##*.}" -le 220 ]
      return
    fi
    sleep 1
  done
  return 1
}

pods_use_kproxy_dns() {
  toolbox cat /etc/resolv.conf | grep -q "^nameserver $DNS_IP\$"
}

ipvs_has_real_server() { # VIP:PORT
  ipvsadm -Ln -t "$1" | grep -Eq -- '->[[:space:]]+[0-9.]+:[0-9]+'
}

nat_rules_for() { # IP: print its KUBE-SERVICES rules and service chain, from whichever
  local save rules chain # iptables flavour holds them (kproxy follows kubelet's)
  for save in iptables-save iptables-legacy-save; do
    command -v "$save" >/dev/null || continue
    rules=$("$save" -t nat 2>/dev/null | grep -- "-A KUBE-SERVICES .*-d $1/32") || continue
    chain=$(echo "$rules" | grep -Eo 'KUBE-SVC-[A-Z0-9]+' | head -1)
    {
      echo "\$ $save -t nat | grep -e '$1/32' -e '-A $chain '"
      echo "$rules"
      "$save" -t nat | grep -- "-A $chain "
    } | sed 's/^/        /'
    [ -n "$chain" ]
    return
  done
  return 1
}

vm_mode() {
  export KUBECONFIG=${KUBECONFIG:-/etc/kubernetes/admin.conf}
  echo "== deploying $HERE/examples"
  kubectl apply -f "$HERE/examples/" || exit 1
  kubectl wait --for=condition=Ready node --all --timeout=300s
  kubectl rollout status deployment/nginx --timeout=300s
  kubectl rollout status statefulset/web --timeout=300s
  kubectl rollout status deployment/mysql --timeout=900s # a large image to pull
  kubectl wait --for=condition=Ready pod/toolbox --timeout=300s
  show kubectl get nodes -o wide
  show kubectl get svc,endpointslices -o wide
  show kubectl get pods -o wide

  echo
  echo "== ClusterIP: mysql-service"
  check "toolbox -> $MYSQL_IP:3306 gets the MySQL server greeting" mysql_greets
  check "mysql-service.default.svc.$ZONE resolves to $MYSQL_IP" \
    resolves_to "mysql-service.default.svc.$ZONE" "$MYSQL_IP"

  echo
  echo "== NodePort: nginx-nodeport (from this node, i.e. from outside the pods' nodes too)"
  for ip in $NODE_IPS; do
    check "NodePort $ip:$NODEPORT spreads over the 3 nginx pods" \
      reaches_all_nginx "http://$ip:$NODEPORT/"
  done
  local cluster_ip
  cluster_ip=$(kubectl get svc nginx-nodeport -o jsonpath='{.spec.clusterIP}')
  check "its ClusterIP $cluster_ip:80 from the node spreads too" \
    reaches_all_nginx "http://$cluster_ip/"
  check "a pod reaches it by short name (search path + kproxy DNS)" short_name_works

  echo
  echo "== LoadBalancer: nginx-loadbalancer"
  show kubectl get svc nginx-loadbalancer
  local lb_port first_worker
  lb_port=$(kubectl get svc nginx-loadbalancer -o jsonpath='{.spec.ports[0].nodePort}')
  first_worker=$(echo "$NODE_IPS" | awk '{print $2}')
  check "its NodePort $first_worker:$lb_port works" \
    reaches_all_nginx "http://$first_worker:$lb_port/"
  check "it gets an EXTERNAL-IP from kproxy's pool" lb_address_assigned
  local lb_ip
  lb_ip=$(lb_address)
  if [ -n "$lb_ip" ]; then
    check "its EXTERNAL-IP $lb_ip reaches the 3 nginx pods" reaches_all_nginx "http://$lb_ip/"
  fi

  echo
  echo "== DNS (kproxy's node-local server on $DNS_IP)"
  check "pods use $DNS_IP as their nameserver" pods_use_kproxy_dns
  local web_ips web0
  web_ips=$(kubectl get pods -l app=web -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}')
  web0=$(kubectl get pod web-0 -o jsonpath='{.status.podIP}')
  # shellcheck disable=SC2086 # one argument per address
  check "headless web-headless lists the 3 web pods" \
    resolves_to "web-headless.default.svc.$ZONE" $web_ips
  check "web-0.web-headless resolves to web-0 alone" \
    resolves_to "web-0.web-headless.default.svc.$ZONE" "$web0"
  check "nginx-external is a CNAME to mysql.external-domain.com" \
    is_cname_of "nginx-external.default.svc.$ZONE" mysql.external-domain.com
  show toolbox nslookup "nginx-external.default.svc.$ZONE"

  echo
  echo "== what kproxy programmed on $(hostname)"
  if ipvsadm -Ln -t "$MYSQL_IP:3306" >/dev/null 2>&1; then
    show ipvsadm -Ln -t "$MYSQL_IP:3306"
    show ip -brief addr show kube-ipvs0
    check "IPVS virtual server $MYSQL_IP:3306 has a real server" \
      ipvs_has_real_server "$MYSQL_IP:3306"
  else
    check "iptables KUBE-SERVICES sends $MYSQL_IP to a KUBE-SVC chain" \
      nat_rules_for "$MYSQL_IP"
  fi
  # The same settings and credentials as the kproxy unit on this node.
  local flags=(--config /etc/kproxy/config.yaml --kubeconfig /etc/kproxy/kubeconfig)
  check "kproxy status reads the programmed state back" kproxy status "${flags[@]}"
  show kproxy explain "${flags[@]}" "$MYSQL_IP:3306/tcp"
  show systemctl --no-pager --lines=3 status kproxy.service

  summary
}

if command -v kubectl >/dev/null && [ -r "${KUBECONFIG:-/etc/kubernetes/admin.conf}" ]; then
  vm_mode
else
  host_mode
fi
