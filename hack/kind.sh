#!/usr/bin/env bash
# For a laptop with Docker: the same product on a kind cluster. NOT run on the project's own
# machines (they have no Docker engine); `make up` is the tested path. Needs kind, docker, and
# `make tools images` (helm and the OCI archives come from there).
#
#   hack/kind.sh up      kind cluster "opensds", images loaded, snapshot CRDs, the chart, a sample pod
#   hack/kind.sh down    delete the kind cluster
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER=${KIND_CLUSTER:-opensds}
for tool in kind docker; do command -v "$tool" >/dev/null || { echo "kind.sh: $tool not found" >&2; exit 1; }; done

up() {
  kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER"
  local node; node=$(kind get nodes --name "$CLUSTER" | head -n1)
  # kind nodes run containerd: import each OCI archive straight into its k8s.io namespace.
  for archive in "$ROOT"/.images/*.tar; do
    for n in $(kind get nodes --name "$CLUSTER"); do
      docker exec -i "$n" ctr -n k8s.io images import --all-platforms - < "$archive" >/dev/null
    done
  done
  local K=(kubectl --context "kind-$CLUSTER")
  "${K[@]}" apply --server-side -f "$ROOT/bin/snapshot-crds"
  sed "s/node-1/$node/g" "$ROOT/manifests/samples/values-local.yaml" > "$ROOT/.images/values-kind.yaml"
  "$ROOT/bin/helm" --kube-context "kind-$CLUSTER" upgrade --install opensds "$ROOT/charts/opensds" \
    -n opensds-system --create-namespace -f "$ROOT/.images/values-kind.yaml" --wait --timeout 300s
  "${K[@]}" apply -f "$ROOT/manifests/samples/pvc.yaml" -f "$ROOT/manifests/samples/pod-writer.yaml"
  "${K[@]}" wait -n default --for condition=Ready --timeout 180s pod/sample-writer
  "${K[@]}" logs -n default sample-writer
}

case ${1:-} in
  up) up ;;
  down) kind delete cluster --name "$CLUSTER" ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
