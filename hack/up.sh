#!/usr/bin/env bash
# `make up`: the product as users run it, on this machine. The control plane (hack/cluster.sh), a
# real kubelet node (hack/node.sh) with the images `make images` built, the Helm chart installed
# from them with the embedded file backend and a sample profile, then a pod on a PVC:
# hack/demo.sh (pod re-creation, snapshot restore, online expansion). Safe to run again: the
# system converges (helm upgrade) and the demo runs afresh in a new namespace.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export OPENSDS_CLUSTER_DIR=${OPENSDS_CLUSTER_DIR:-$ROOT/.cluster}
export KUBECONFIG=$OPENSDS_CLUSTER_DIR/admin.kubeconfig
K=("$ROOT/bin/kubectl")
SAMPLES=$ROOT/manifests/samples
export OPENSDS_START=$(date +%s)   # hack/demo.sh counts from the same start
step() { echo "up: [$(($(date +%s) - OPENSDS_START))s] $*" >&2; }

bash "$ROOT/hack/cluster.sh" up
bash "$ROOT/hack/node.sh" up
step "control plane and node-1 Ready"

# Cluster add-ons the chart does not own: the VolumeSnapshot CRDs.
"${K[@]}" apply --server-side --force-conflicts -f "$ROOT/bin/snapshot-crds" >/dev/null
"${K[@]}" wait --for condition=Established --timeout 60s crd --all >/dev/null
"$ROOT/bin/helm" upgrade --install opensds "$ROOT/charts/opensds" -n opensds-system --create-namespace \
  -f "$SAMPLES/values-local.yaml" --wait --timeout 180s >/dev/null
step "chart installed: every pod Ready"
"${K[@]}" wait --for condition=Ready --timeout 120s storagebackend/local-file-node-1 >/dev/null

exec bash "$ROOT/hack/demo.sh"
