#!/usr/bin/env bash
# `make up`: the whole system locally on the embedded default (file) backend:
# control plane, CRDs, operator, one dock, and sample objects, printed when ready.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=$ROOT/.run
VENV=${VENV:-$ROOT/.venv}
mkdir -p "$RUN/logs" "$RUN/backend"
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

echo "== OpenSDS is up (KUBECONFIG=$KUBECONFIG; logs in $RUN/logs)"
"${KUBECTL[@]}" get storagebackends,storageprofiles
"${KUBECTL[@]}" get storageclass,volumesnapshotclass
"${KUBECTL[@]}" get -n default volumes.opensds.io,snapshots.opensds.io
