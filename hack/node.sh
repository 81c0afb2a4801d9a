#!/usr/bin/env bash
# Real Kubernetes nodes on this machine: containerd + runc + kubelet (built from the pinned
# kubernetes module), joined to hack/cluster.sh's control plane. See ../shared/DESIGN.md.
#
#   hack/node.sh up [N]      start N nodes (default $OPENSDS_NODES or 1), wait until Ready
#   hack/node.sh down        stop them: pods killed, mounts and loop devices released, namespaces gone
#   hack/node.sh status      each node's processes; exit 1 unless all run
#   hack/node.sh exec <node> <command...>   run a command in that node's network + mount namespaces
#   hack/node.sh restart-kubelet <node>     stop and start that node's kubelet (pods keep running)
#
# Each node is what a separate machine would be, as far as the product can tell:
# - its own network namespace with a veth into a "fabric" namespace whose bridge joins all nodes
#   (node IP 10.250.0.<i+1>, pod CIDR 10.244.<i>.0/24). The host's own interfaces get no address.
# - its own mount namespace, with /var/lib/kubelet and /var/lib/opensds bind-mounted from
#   $OPENSDS_NODES_DIR/<node>/, so the shipped manifests' hostPaths mean the same thing they mean
#   on a real node; / is made rshared there (as systemd does) for Bidirectional propagation.
# - its own containerd (state, socket, CNI config) and kubelet cgroup root.
# The API server's ClusterIP 10.0.0.1:443 exists inside each node: a socat listens there and
# relays over a unix socket to the apiserver on the host's loopback, so pods' in-cluster config
# works without kube-proxy. The apiserver reaches kubelets (logs/exec) through hack/nodeproxy.py.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/bin
CLUSTER_DIR=${OPENSDS_CLUSTER_DIR:-$ROOT/.cluster}
PKI=$CLUSTER_DIR/pki
API_PORT=${OPENSDS_API_PORT:-16443}
NODES_DIR=${OPENSDS_NODES_DIR:-$ROOT/.nodes}
TAG=osds$API_PORT                     # names per control plane, so two clusters' nodes never mix
FABRIC=$TAG-fabric
SANDBOX_IMAGE=${OPENSDS_SANDBOX_IMAGE:-registry.k8s.io/pause:3.10}
KUBECTL=("$BIN/kubectl" --kubeconfig "$CLUSTER_DIR/admin.kubeconfig")

log() { echo "node: $*" >&2; }
die() { log "$*"; exit 1; }

node_names() { # the nodes that exist (directories with a config)
  local d
  for d in "$NODES_DIR"/*/; do [[ -f $d/kubelet.yaml ]] && basename "$d"; done 2>/dev/null || true
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

need() {
  local missing=()
  for t in containerd runc ctr socat ip nsenter unshare openssl; do command -v "$t" >/dev/null || missing+=("$t"); done
  [[ -x /usr/lib/cni/bridge ]] || missing+=("containernetworking-plugins")
  ((${#missing[@]} == 0)) || die "missing: ${missing[*]} (make deps installs them)"
  [[ -x $BIN/kubelet ]] || die "bin/kubelet missing: run 'make tools'"
  [[ -f $PKI/ca.crt ]] || die "no control plane in $CLUSTER_DIR: run 'hack/cluster.sh up' first"
  ((EUID == 0)) || die "nodes need root (namespaces, mounts, containerd)"
}

fabric_up() {
  ip netns list 2>/dev/null | grep -qw "^$FABRIC" && return
  ip netns add "$FABRIC"
  ip -n "$FABRIC" link set lo up
  ip -n "$FABRIC" link add br0 type bridge
  ip -n "$FABRIC" link set br0 up
}

node_certs() { # node_certs <node>: a kubelet client certificate in the system:nodes group
  local node=$1 dir=$NODES_DIR/$1
  # Kept across restarts, re-issued when the control plane's CA changed (hack/cluster.sh reset).
  openssl verify -CAfile "$PKI/ca.crt" "$dir/kubelet.crt" >/dev/null 2>&1 && return
  openssl genrsa -out "$dir/kubelet.key" 2048 2>/dev/null
  openssl req -new -key "$dir/kubelet.key" -subj "/O=system:nodes/CN=system:node:$node" -out "$dir/kubelet.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > "$dir/kubelet.ext"
  openssl x509 -req -in "$dir/kubelet.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$dir/kubelet.ext" -out "$dir/kubelet.crt" 2>/dev/null
  rm -f "$dir/kubelet.csr" "$dir/kubelet.ext"
  chmod 600 "$dir/kubelet.key"
}

node_config() { # node_config <node> <index>
  local node=$1 i=$2 dir=$NODES_DIR/$1 run=/run/$TAG-$1
  mkdir -p "$dir"/{kubelet,opensds,containerd,cni,cni-ipam,pods-logs} "$NODES_DIR/ports"
  node_certs "$node"
  cp "$PKI/ca.crt" "$dir/ca.crt"
  cat > "$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://10.0.0.1:443", certificate-authority: $dir/ca.crt}
users:
- name: node
  user: {client-certificate: $dir/kubelet.crt, client-key: $dir/kubelet.key}
contexts:
- name: local
  context: {cluster: local, user: node}
current-context: local
EOF
  cat > "$dir/cni/10-bridge.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "opensds-pods", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$dir/cni-ipam",
            "ranges": [[{"subnet": "10.244.$i.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
EOF
  cat > "$dir/containerd.toml" <<EOF
version = 2
root = "$dir/containerd"
state = "$run/containerd"
[grpc]
  address = "$run/containerd.sock"
[ttrpc]
  address = "$run/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$SANDBOX_IMAGE"
  # This host's root lacks CAP_SYS_RESOURCE: runc cannot set a negative oom_score_adj.
  restrict_oom_score_adj = true
  # Pods' network namespaces pinned under the node's state dir, not the host's /run/netns: a
  # node stopped with its pods still there leaves nothing behind (node down removes the dir).
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni"
EOF
  cat > "$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $dir/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$run/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$TAG-$node
failCgroupV1: false
failSwapOn: false
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
podCIDR: 10.244.$i.0/24
serializeImagePulls: false
# Running pods are re-synced every 10 s (default 1 min): an online expansion reaches the pod's
# filesystem within seconds instead of up to a minute.
syncFrequency: 10s
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
podLogsDir: /var/log/pods
EOF
  # What runs inside the node's namespaces: mounts first, then containerd and kubelet.
  cat > "$dir/init.sh" <<EOF
set -euo pipefail
mount --make-rshared /
for pair in kubelet:/var/lib/kubelet opensds:/var/lib/opensds pods-logs:/var/log/pods; do
  mount --bind "$dir/\${pair%%:*}" "\${pair#*:}"
done
mkdir -p "$run"
containerd --config "$dir/containerd.toml" > "$dir/containerd.log" 2>&1 &
echo \$! > "$dir/containerd.pid"
for _ in \$(seq 300); do ctr -a "$run/containerd.sock" version >/dev/null 2>&1 && break; sleep 0.1; done
if [[ -d $ROOT/.images ]] && compgen -G "$ROOT/.images/*.tar" >/dev/null; then
  bash "$ROOT/hack/images.sh" import --address "$run/containerd.sock" > "$dir/images.log" 2>&1 ||
    { echo "node: importing .images/ into containerd failed: see $dir/images.log" >&2; exit 1; }
fi
bash "$dir/kubelet.sh" &
wait
EOF
  cat > "$dir/kubelet.sh" <<EOF
setsid "$BIN/kubelet" --config "$dir/kubelet.yaml" --kubeconfig "$dir/kubeconfig" --hostname-override "$node" \\
  --node-ip "10.250.0.$((i + 1))" --root-dir /var/lib/kubelet >> "$dir/kubelet.log" 2>&1 &
echo \$! > "$dir/kubelet.pid"
EOF
}

cgroups() { # cgroups <mkdir|rmdir> <root>: the kubelet cgroup root in every v1 hierarchy
  local op=$1 root=$2 h
  for h in /sys/fs/cgroup/*/; do
    [[ -f $h/cgroup.procs ]] || continue
    if [[ $op == mkdir ]]; then mkdir -p "$h$root"
    elif [[ -d $h$root ]]; then find "$h$root" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  done
}

node_up() { # node_up <node> <index>
  local node=$1 i=$2 dir=$NODES_DIR/$1 ns=$TAG-$1 ip=10.250.0.$(($2 + 1))
  if alive "$dir/init.pid" && alive "$dir/kubelet.pid"; then return; fi
  node_config "$node" "$i"
  mkdir -p /var/lib/kubelet /var/lib/opensds /var/log/pods   # mount points (empty on the host)
  cgroups mkdir "/$TAG-$node"
  if ! ip netns list 2>/dev/null | grep -qw "^$ns"; then
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "v$API_PORT-$i" type veth peer name eth0 netns "$ns"
    ip link set "v$API_PORT-$i" netns "$FABRIC"
    ip -n "$FABRIC" link set "v$API_PORT-$i" master br0 up
    ip -n "$ns" addr add "$ip/16" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" addr add 10.0.0.1/32 dev lo          # the kubernetes Service's ClusterIP
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  fi
  # Routes to the other nodes' pod CIDRs (and theirs to ours) over the fabric.
  local other j=0
  for other in $(node_names); do
    if [[ $other != "$node" ]]; then
      ip -n "$ns" route replace "10.244.$j.0/24" via "10.250.0.$((j + 1))" 2>/dev/null || true
      ip -n "$TAG-$other" route replace "10.244.$i.0/24" via "$ip" 2>/dev/null || true
    fi
    j=$((j + 1))
  done
  # apiserver: ClusterIP 10.0.0.1:443 in the node -> unix socket -> 127.0.0.1:$API_PORT on the host.
  if ! alive "$dir/api-relay.pid"; then
    setsid nsenter --net="/run/netns/$ns" socat TCP-LISTEN:443,bind=10.0.0.1,fork,reuseaddr \
      "UNIX-CONNECT:$NODES_DIR/api.sock" > /dev/null 2>&1 < /dev/null &
    echo $! > "$dir/api-relay.pid"
  fi
  # kubelet <- apiserver (logs/exec): nodeproxy.py -> this socket -> kubelet's port in the node.
  if ! alive "$dir/kubelet-relay.pid"; then
    rm -f "$NODES_DIR/ports/$ip-10250.sock"
    setsid nsenter --net="/run/netns/$ns" socat "UNIX-LISTEN:$NODES_DIR/ports/$ip-10250.sock,fork" \
      "TCP:$ip:10250" > /dev/null 2>&1 < /dev/null &
    echo $! > "$dir/kubelet-relay.pid"
  fi
  setsid nsenter --net="/run/netns/$ns" unshare --mount --propagation slave bash "$dir/init.sh" \
    > "$dir/init.log" 2>&1 < /dev/null &
  echo $! > "$dir/init.pid"
}

up() {
  local count=${1:-${OPENSDS_NODES:-1}} i
  need
  mkdir -p "$NODES_DIR"
  fabric_up
  if ! alive "$NODES_DIR/api-relay.pid"; then
    rm -f "$NODES_DIR/api.sock"
    setsid socat "UNIX-LISTEN:$NODES_DIR/api.sock,fork,mode=600" "TCP:127.0.0.1:$API_PORT" > /dev/null 2>&1 < /dev/null &
    echo $! > "$NODES_DIR/api-relay.pid"
  fi
  if ! alive "$CLUSTER_DIR/run/nodeproxy.pid"; then
    setsid python3 "$ROOT/hack/nodeproxy.py" "$CLUSTER_DIR/run/nodeproxy.sock" "$NODES_DIR" \
      > "$NODES_DIR/nodeproxy.log" 2>&1 < /dev/null &
    echo $! > "$CLUSTER_DIR/run/nodeproxy.pid"
  fi
  for ((i = 0; i < count; i++)); do node_up "node-$((i + 1))" "$i"; done
  local deadline=$((SECONDS + 120)) node
  for ((i = 0; i < count; i++)); do
    node=node-$((i + 1))
    until "${KUBECTL[@]}" get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True; do
      if ((SECONDS > deadline)); then
        log "$node not Ready after 120 s; its logs are in $NODES_DIR/$node/"
        tail -n 20 "$NODES_DIR/$node/kubelet.log" "$NODES_DIR/$node/init.log" >&2 || true
        exit 1
      fi
      sleep 0.5
    done
  done
  log "$count node(s) Ready: $(node_names | tr '\n' ' ')"
}

kill_wait() { # kill_wait <signal> <pids...>: signal, then wait up to 15 s for them to go
  local sig=$1; shift
  (($#)) || return 0
  kill "-$sig" "$@" 2>/dev/null || true
  local deadline=$((SECONDS + 15)) pid
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  done
}

node_down() { # node_down <node>
  local node=$1 dir=$NODES_DIR/$1 ns=$TAG-$1 run=/run/$TAG-$1 pids=() f
  for f in kubelet init; do alive "$dir/$f.pid" && pids+=("$(cat "$dir/$f.pid")"); done
  kill_wait TERM "${pids[@]}"
  # Every pod's processes (the node's cgroup root): SIGTERM first, as a node shutdown would (leader-
  # elected components release their leases), SIGKILL what is left after 5 s; then containerd.
  local procs
  # shellcheck disable=SC2046
  procs=$(cat $(find /sys/fs/cgroup/pids/"$TAG-$node" -name cgroup.procs 2>/dev/null) /dev/null 2>/dev/null | sort -u || true)
  if [[ -n $procs ]]; then
    # shellcheck disable=SC2086
    kill -TERM $procs 2>/dev/null || true
    local deadline=$((SECONDS + 5)) pid
    for pid in $procs; do while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done; done
    # shellcheck disable=SC2086
    kill -KILL $procs 2>/dev/null || true
  fi
  pkill -KILL -f -- "-address $run/containerd.sock" 2>/dev/null || true
  alive "$dir/containerd.pid" && kill_wait KILL "$(cat "$dir/containerd.pid")"
  pkill -KILL -f -- "$dir/" 2>/dev/null || true
  for f in api-relay kubelet-relay; do alive "$dir/$f.pid" && kill -KILL "$(cat "$dir/$f.pid")" 2>/dev/null; done
  sleep 0.5
  # Loop devices the node's volumes left attached (their mounts died with the mount namespace).
  local loop
  for loop in $(losetup -nO NAME,BACK-FILE 2>/dev/null | awk -v d="$dir/" 'index($2, d) == 1 {print $1}'); do
    losetup -d "$loop" 2>/dev/null || true
  done
  cgroups rmdir "/$TAG-$node"
  rm -rf "$run"
  ip netns del "$ns" 2>/dev/null || true
  rm -f "$dir"/*.pid
}

down() {
  local node
  for node in $(node_names); do node_down "$node"; done
  for f in "$NODES_DIR/api-relay.pid" "$CLUSTER_DIR/run/nodeproxy.pid"; do alive "$f" && kill -KILL "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
  ip netns del "$FABRIC" 2>/dev/null || true
  for node in $(node_names); do "${KUBECTL[@]}" delete node "$node" --wait=false >/dev/null 2>&1 || true; done
  log "down"
}

status() {
  local node rc=0 f
  for node in $(node_names); do
    for f in containerd kubelet; do
      if alive "$NODES_DIR/$node/$f.pid"; then echo "$node $f: running"; else echo "$node $f: stopped"; rc=1; fi
    done
  done
  return $rc
}

node_exec() { # node_exec <node> <command...>: in the node's network and mount namespaces
  local node=$1; shift
  local pid; pid=$(cat "$NODES_DIR/$node/kubelet.pid")
  nsenter -t "$pid" -n -m -- "$@"
}

restart_kubelet() { # restart_kubelet <node>: what a kubelet upgrade or crash does to running pods
  local node=$1 dir=$NODES_DIR/$1
  alive "$dir/kubelet.pid" && kill_wait TERM "$(cat "$dir/kubelet.pid")"
  nsenter -t "$(cat "$dir/containerd.pid")" -n -m -- bash "$dir/kubelet.sh"
  log "$node: kubelet restarted (pid $(cat "$dir/kubelet.pid"))"
}

case ${1:-} in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  exec) shift; node_exec "$@" ;;
  restart-kubelet) restart_kubelet "$2" ;;
  *) echo "usage: $0 up [N]|down|status|exec <node> <command...>|restart-kubelet <node>" >&2; exit 2 ;;
esac
