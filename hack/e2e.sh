#!/usr/bin/env bash
# `make e2e`: the real-kernel VM tier. Tests in e2e/vm run inside hack/vm.sh with the host's
# local control plane reachable (started here when absent, stopped again afterwards).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
started=0
if ! bash "$ROOT/hack/cluster.sh" status >/dev/null 2>&1; then
  bash "$ROOT/hack/cluster.sh" up
  started=1
fi
cleanup() { if ((started)) && [[ ${OPENSDS_KEEP_CLUSTER:-0} != 1 ]]; then bash "$ROOT/hack/cluster.sh" down; fi; }
trap cleanup EXIT
KUBECONFIG=$ROOT/.cluster/admin.kubeconfig
"$ROOT/bin/kubectl" --kubeconfig "$KUBECONFIG" apply --server-side --force-conflicts \
  -f "$ROOT/crds" -f "$ROOT/bin/snapshot-crds" -f "$ROOT/manifests/base/namespace.yaml" >/dev/null
"$ROOT/bin/kubectl" --kubeconfig "$KUBECONFIG" wait --for condition=Established --timeout 60s crd --all >/dev/null
OPENSDS_VM_APISERVER=$KUBECONFIG bash "$ROOT/hack/vm.sh" python -m pytest -q -rs -p no:cacheprovider e2e/vm "$@"
