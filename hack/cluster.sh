#!/usr/bin/env bash
# A real local Kubernetes control plane on 127.0.0.1, built from bin/ (make tools):
# etcd, kube-apiserver (TLS, Node+RBAC, service-account issuer), kube-controller-manager
# (PV binder and service-account token controllers among the defaults) and kube-scheduler.
#
#   hack/cluster.sh up       start (no-op when already running), wait for /readyz
#   hack/cluster.sh down     stop every process; leaves no process or mount behind
#   hack/cluster.sh status   print each component's state; exit 1 unless all run
#   hack/cluster.sh reset    down, then delete all state (certificates, etcd data)
#
# State lives in $OPENSDS_CLUSTER_DIR (default: .cluster/, git-ignored); the admin
# kubeconfig is $OPENSDS_CLUSTER_DIR/admin.kubeconfig.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/bin
DIR=${OPENSDS_CLUSTER_DIR:-$ROOT/.cluster}
PKI=$DIR/pki
LOGS=$DIR/logs
RUN=$DIR/run
ETCD_PORT=${OPENSDS_ETCD_PORT:-23790}
ETCD_PEER_PORT=$((ETCD_PORT + 10))
API_PORT=${OPENSDS_API_PORT:-16443}
KCM_PORT=$((API_PORT + 1))
SCHED_PORT=$((API_PORT + 2))
KUBECONFIG_ADMIN=$DIR/admin.kubeconfig
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)

log() { echo "cluster: $*" >&2; }

pid_of() { # prints the pid of a running component, or fails
  local f=$RUN/$1.pid
  [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"
}

gen_cert() { # gen_cert <name> <subject> [<subjectAltName>]: a key and a cert signed by our CA
  local name=$1 subj=$2 san=${3:-}
  [[ -f $PKI/$name.crt ]] && return
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  local ext=$PKI/$name.ext
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ -n $san ]]; then echo "extendedKeyUsage=serverAuth,clientAuth"; echo "subjectAltName=$san"
    else echo "extendedKeyUsage=clientAuth"; fi
  } > "$ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

write_kubeconfig() { # write_kubeconfig <file> <cert name>
  local b64="base64 -w0"
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: opensds-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $($b64 < "$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $($b64 < "$PKI/$2.crt")
    client-key-data: $($b64 < "$PKI/$2.key")
contexts:
- name: opensds-local
  context: {cluster: opensds-local, user: $2}
current-context: opensds-local
EOF
  chmod 600 "$1"
}

ensure_pki() {
  mkdir -p "$PKI" "$LOGS" "$RUN" "$DIR/etcd"
  chmod 700 "$DIR" "$PKI"
  if [[ ! -f $PKI/ca.crt ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
      -days 3650 -subj "/CN=opensds-local-ca" 2>/dev/null
  fi
  # 10.0.2.100 is where the VM tier (hack/vm.sh) reaches this apiserver: a QEMU guestfwd
  # rule turns it into a loopback connection to 127.0.0.1:$API_PORT on this host.
  gen_cert apiserver "/CN=kube-apiserver" \
    "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.0.0.1,IP:10.0.2.100"
  gen_cert admin "/O=system:masters/CN=opensds-admin"
  gen_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  gen_cert kube-controller-manager "/CN=system:kube-controller-manager"
  gen_cert kube-scheduler "/CN=system:kube-scheduler"
  [[ -f $PKI/sa.key ]] || openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  [[ -f $PKI/sa.pub ]] || openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  write_kubeconfig "$KUBECONFIG_ADMIN" admin
  write_kubeconfig "$DIR/kube-controller-manager.kubeconfig" kube-controller-manager
  write_kubeconfig "$DIR/kube-scheduler.kubeconfig" kube-scheduler
}

start() { # start <component> <args...>: detached from this shell, pid recorded
  local name=$1; shift
  if pid_of "$name" >/dev/null; then return; fi
  setsid "$BIN/$name" "$@" > "$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}

wait_for() { # wait_for <what> <seconds> <command...>
  local what=$1 deadline=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      log "timed out waiting for $what; last log lines:"; tail -n 30 "$LOGS"/*.log >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

api_ready() {
  curl -fsS --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$API_PORT/readyz" | grep -qx ok
}

check_ports() { # fixed ports inside the kernel's ephemeral range can be taken by any client socket
  local low high port
  read -r low high < /proc/sys/net/ipv4/ip_local_port_range
  for port in "$ETCD_PORT" "$ETCD_PEER_PORT" "$((ETCD_PORT + 20))" "$API_PORT" "$KCM_PORT" "$SCHED_PORT"; do
    if ((port >= low && port <= high)); then
      log "port $port is in this machine's ephemeral range ($low-$high): an outgoing connection may hold it; choose ports below $low"
      exit 1
    fi
  done
}

up() {
  check_ports
  for c in "${COMPONENTS[@]}"; do
    [[ -x $BIN/$c ]] || { log "bin/$c missing: run 'make tools' first"; exit 1; }
  done
  ensure_pki
  start etcd --name opensds-local --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "opensds-local=http://127.0.0.1:$ETCD_PEER_PORT" \
    --listen-metrics-urls "http://127.0.0.1:$((ETCD_PORT + 20))" \
    --unsafe-no-fsync --quota-backend-bytes $((2 * 1024 * 1024 * 1024))
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"
  local audit=()
  if [[ ${OPENSDS_AUDIT:-0} == 1 ]]; then # every write to our API group, for debugging races
    printf '%s\n' 'apiVersion: audit.k8s.io/v1' 'kind: Policy' 'rules:' \
      '- level: RequestResponse' '  verbs: [create, update, patch, delete]' '  resources: [{group: opensds.io}]' \
      '- level: None' > "$DIR/audit-policy.yaml"
    audit=(--audit-policy-file "$DIR/audit-policy.yaml" --audit-log-path "$LOGS/audit.log")
  fi
  # Traffic to nodes (logs, exec, port-forward) goes through hack/nodeproxy.py on a unix socket:
  # hack/node.sh's kubelets live in network namespaces the host has no route to.
  cat > "$DIR/egress-selector.yaml" <<EOF
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport: {uds: {udsName: $RUN/nodeproxy.sock}}
EOF
  start kube-apiserver "${audit[@]}" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --cert-dir "$PKI" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --requestheader-client-ca-file "$PKI/ca.crt" --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --api-audiences https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range 10.0.0.0/24 \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --egress-selector-config-file "$DIR/egress-selector.yaml" --kubelet-preferred-address-types InternalIP \
    --allow-privileged=true \
    --endpoint-reconciler-type none
  wait_for kube-apiserver 90 api_ready
  start kube-controller-manager \
    --kubeconfig "$DIR/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$DIR/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$DIR/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --controllers '*' --leader-elect=false
  start kube-scheduler \
    --kubeconfig "$DIR/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$DIR/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$DIR/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false
  wait_for kube-controller-manager 60 curl -fsSk "https://127.0.0.1:$KCM_PORT/healthz"
  wait_for kube-scheduler 60 curl -fsSk "https://127.0.0.1:$SCHED_PORT/healthz"
  log "ready; KUBECONFIG=$KUBECONFIG_ADMIN"
}

down() {
  local c pid pids=()
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    c=${COMPONENTS[i]}
    if pid=$(pid_of "$c"); then kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); fi
    rm -f "$RUN/$c.pid"
  done
  local deadline=$((SECONDS + 15))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Anything else still running out of this cluster's directory (e.g. after a lost pid file).
  pkill -KILL -f -- "$DIR/" 2>/dev/null || true
  log "down"
}

status() {
  local c rc=0
  for c in "${COMPONENTS[@]}"; do
    if pid=$(pid_of "$c"); then echo "$c: running (pid $pid)"; else echo "$c: stopped"; rc=1; fi
  done
  if ((rc == 0)) && api_ready; then echo "readyz: ok"; else echo "readyz: not ready"; rc=1; fi
  echo "kubeconfig: $KUBECONFIG_ADMIN"
  return $rc
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  reset) down; rm -rf "$DIR" ;;
  *) echo "usage: $0 up|down|status|reset" >&2; exit 2 ;;
esac
