#!/usr/bin/env bash
# `make e2e`: the real-kernel VM tier. Tests in e2e/vm run inside hack/vm.sh with a local control
# plane of their own reachable: state in .cluster-e2e/, kube-apiserver on 29443, etcd on 30790,
# so `make up` (.cluster, 16443/23790) and `make test` (26443/25790) never collide with it.
# Started here when absent and stopped again afterwards (OPENSDS_KEEP_CLUSTER=1 keeps it).
# Ceph runs inside the VM (e2e/vm/kernel.py), on the guest's own loopback.
# Arguments go to pytest, e.g. `bash hack/e2e.sh -k rbd`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export OPENSDS_CLUSTER_DIR=${OPENSDS_E2E_CLUSTER_DIR:-$ROOT/.cluster-e2e}
export OPENSDS_API_PORT=${OPENSDS_E2E_API_PORT:-29443}
export OPENSDS_ETCD_PORT=${OPENSDS_E2E_ETCD_PORT:-30790}
started=0
if ! bash "$ROOT/hack/cluster.sh" status >/dev/null 2>&1; then
  bash "$ROOT/hack/cluster.sh" up
  started=1
fi
cleanup() { if ((started)) && [[ ${OPENSDS_KEEP_CLUSTER:-0} != 1 ]]; then bash "$ROOT/hack/cluster.sh" down; fi; }
trap cleanup EXIT
KUBECONFIG=$OPENSDS_CLUSTER_DIR/admin.kubeconfig
"$ROOT/bin/kubectl" --kubeconfig "$KUBECONFIG" apply --server-side --force-conflicts \
  -f "$ROOT/crds" -f "$ROOT/bin/snapshot-crds" -f "$ROOT/manifests/base/namespace.yaml" >/dev/null
"$ROOT/bin/kubectl" --kubeconfig "$KUBECONFIG" wait --for condition=Established --timeout 60s crd --all >/dev/null
OPENSDS_VM_APISERVER=$KUBECONFIG bash "$ROOT/hack/vm.sh" python -m pytest -q -rs -p no:cacheprovider e2e/vm "$@"
