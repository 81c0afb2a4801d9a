#!/usr/bin/env bash
# `make up`: the whole system locally on the embedded default (file) backend:
# control plane, CRDs, operator, one dock, the CSI controller and node plugins with the
# kubernetes-csi sidecars, and sample objects (a Volume, a PVC, snapshots), printed when ready.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=$ROOT/.run
VENV=${VENV:-$ROOT/.venv}
mkdir -p "$RUN/logs" "$RUN/backend" "$RUN/csi"
bash "$ROOT/hack/cluster.sh" up
export KUBECONFIG=$ROOT/.cluster/admin.kubeconfig
KUBECTL=("$ROOT/bin/kubectl")
"${KUBECTL[@]}" apply --server-side --force-conflicts -f "$ROOT/crds" -f "$ROOT/bin/snapshot-crds" >/dev/null
"${KUBECTL[@]}" wait --for condition=Established --timeout 60s crd --all >/dev/null

start() { # start <name> <command...>: background process with a pid file, restarted if dead
  local name=$1; shift
  if [[ -f $RUN/$name.pid ]] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then return; fi
  setsid "$@" >> "$RUN/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}

NODE=${NODE_NAME:-$(hostname)}
sed -e "s|NODE_NAME|$NODE|g" -e "s|BACKEND_DIR|$RUN/backend|g" "$ROOT/manifests/samples/backend-file.yaml" \
  | "${KUBECTL[@]}" apply -f - >/dev/null
start operator "$VENV/bin/opensds-operator"
start dock-local-file "$VENV/bin/opensds-dock" --backend local-file
"${KUBECTL[@]}" wait --for condition=Ready --timeout 60s storagebackend/local-file >/dev/null
"${KUBECTL[@]}" apply -f "$ROOT/manifests/samples/profile-local.yaml" -f "$ROOT/manifests/samples/volume.yaml" >/dev/null
"${KUBECTL[@]}" wait --for jsonpath='{.status.phase}'=Available --timeout 60s -n default volume.opensds.io/sample-data >/dev/null
"${KUBECTL[@]}" wait --for jsonpath='{.status.readyToUse}'=true --timeout 60s -n default snapshot.opensds.io/sample-data-snap >/dev/null

# CSI: the driver object, this machine as a Node with its CSINode (kubelet's part), the
# controller and node plugins, the sidecars on the controller socket, snapshot-controller.
"${KUBECTL[@]}" apply --server-side -f "$ROOT/manifests/base/namespace.yaml" -f "$ROOT/manifests/base/csidriver.yaml" >/dev/null
sed "s|NODE_NAME|$NODE|g" "$ROOT/hack/local-node.yaml" | "${KUBECTL[@]}" apply --server-side -f - >/dev/null
start csi-controller "$VENV/bin/opensds-csi" --role controller --namespace opensds-system \
  --endpoint "unix://$RUN/csi/controller.sock"
start csi-node "$VENV/bin/opensds-csi" --role node --node-id "$NODE" --state-dir "$RUN/csi/node-state" \
  --local-root "$RUN/backend" --endpoint "unix://$RUN/csi/node.sock"
while IFS=: read -r sidecar flags; do
  [[ -z $sidecar || $sidecar == \#* ]] && continue
  # shellcheck disable=SC2086  # flags are words
  NAMESPACE=opensds-system POD_NAME=opensds-csi-controller start "$sidecar" "$ROOT/bin/$sidecar" \
    "--csi-address=$RUN/csi/controller.sock" "--kubeconfig=$KUBECONFIG" $flags
done < "$ROOT/hack/sidecars.txt"
start snapshot-controller "$ROOT/bin/snapshot-controller" "--kubeconfig=$KUBECONFIG"
sed "s|NODE_NAME|$NODE|g" "$ROOT/manifests/samples/pvc.yaml" | "${KUBECTL[@]}" apply -f - >/dev/null
"${KUBECTL[@]}" wait --for jsonpath='{.status.phase}'=Bound --timeout 120s -n default pvc/sample-pvc >/dev/null
"${KUBECTL[@]}" apply -f "$ROOT/manifests/samples/pvc-snapshot.yaml" >/dev/null
"${KUBECTL[@]}" wait --for jsonpath='{.status.readyToUse}'=true --timeout 120s -n default volumesnapshot/sample-pvc-snap >/dev/null

echo "== OpenSDS is up (KUBECONFIG=$KUBECONFIG; logs in $RUN/logs)"
"${KUBECTL[@]}" get storagebackends,storageprofiles
"${KUBECTL[@]}" get storageclass,volumesnapshotclass
"${KUBECTL[@]}" get -n default volumes.opensds.io,snapshots.opensds.io
"${KUBECTL[@]}" get -n default pvc,volumesnapshot
"${KUBECTL[@]}" get -n opensds-system volumes.opensds.io,snapshots.opensds.io
"${KUBECTL[@]}" get -n opensds-system csistoragecapacities
