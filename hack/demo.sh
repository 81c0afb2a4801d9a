#!/usr/bin/env bash
# The demo `make up` ends with, against whatever deployed OpenSDS the kubeconfig reaches (the
# chart or the kustomize base) with the `local-thin` profile: in a new namespace
# opensds-demo-<time> (earlier ones are deleted in the background)
#   - a pod writes to a PVC, is deleted and re-created, and reads the same data back;
#   - meanwhile a VolumeSnapshot of the PVC is restored into a second PVC whose pod reads the same bytes;
#   - the PVC is expanded online while the pod runs and the pod's filesystem must see it.
# Prints the pods, PVCs, Volumes and the pods' output; exits non-zero at the first step that fails.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export KUBECONFIG=${KUBECONFIG:-${OPENSDS_CLUSTER_DIR:-$ROOT/.cluster}/admin.kubeconfig}
K=("$ROOT/bin/kubectl")
SAMPLES=$ROOT/manifests/samples
start=${OPENSDS_START:-$(date +%s)}
step() { echo "up: [$(($(date +%s) - start))s] $*" >&2; }

# The demo's own namespace, new each run; earlier runs' are deleted in the background.
NS=opensds-demo-$(date +%s)
for old in $("${K[@]}" get namespaces -o name | grep '^namespace/opensds-demo-' || true); do
  "${K[@]}" delete "$old" --wait=false >/dev/null
done
"${K[@]}" create namespace "$NS" >/dev/null
K=("${K[@]}" -n "$NS")

pod_output() { # pod_output <pod> <line prefix>: the value printed after the prefix
  local deadline=$((SECONDS + 60)) line
  while ((SECONDS < deadline)); do
    line=$("${K[@]}" logs "$1" 2>/dev/null | awk -v p="$2" '$1 == p {print $2}' | tail -n1)
    [[ -n $line ]] && { echo "$line"; return; }
    sleep 0.5
  done
  echo "up: $1 printed no '$2' line" >&2; "${K[@]}" describe pod "$1" >&2; return 1
}

# 1. A pod writes to a PVC and is deleted; meanwhile a snapshot of the PVC is taken and restored
#    into a second PVC. The re-created pod and the restored one must both read what was written.
"${K[@]}" apply -f "$SAMPLES/pvc.yaml" -f "$SAMPLES/pod-writer.yaml" >/dev/null
"${K[@]}" wait --for condition=Ready --timeout 120s pod/sample-writer >/dev/null
written=$(pod_output sample-writer payload)
step "a pod wrote to its PVC (md5 $written)"
"${K[@]}" apply -f "$SAMPLES/pvc-snapshot.yaml" >/dev/null
"${K[@]}" delete pod sample-writer --wait=false >/dev/null
"${K[@]}" wait --for jsonpath='{.status.readyToUse}'=true --timeout 120s volumesnapshot/sample-pvc-snap >/dev/null
"${K[@]}" apply -f "$SAMPLES/pvc-restore.yaml" >/dev/null
"${K[@]}" wait --for delete --timeout 120s pod/sample-writer >/dev/null 2>&1 || true
"${K[@]}" apply -f "$SAMPLES/pod-writer.yaml" >/dev/null
"${K[@]}" wait --for condition=Ready --timeout 120s pod/sample-writer pod/sample-reader >/dev/null
reread=$(pod_output sample-writer payload)
[[ $written == "$reread" ]] || { echo "up: data changed across pod re-creation: $written -> $reread" >&2; exit 1; }
step "the pod re-created on its PVC reads the same data (md5 $reread)"
restored=$(pod_output sample-reader payload)
[[ $restored == "$written" ]] || { echo "up: restored snapshot differs: $restored != $written" >&2; exit 1; }
step "the snapshot restored into a second PVC: its pod reads the same data (md5 $restored)"

# 2. Online expansion while the writer runs: 1Gi -> 2Gi, seen by the filesystem inside the pod.
size_kib() { "${K[@]}" exec sample-writer -- df -k /data | awk 'NR == 2 {print $2}'; }
before=$(size_kib)
"${K[@]}" patch pvc sample-pvc --type merge -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' >/dev/null
deadline=$((SECONDS + 120))
until (( $(size_kib) > before * 3 / 2 )); do
  ((SECONDS < deadline)) || { echo "up: filesystem not grown after 120 s" >&2; "${K[@]}" describe pvc sample-pvc >&2; exit 1; }
  sleep 1
done
step "online expansion: the pod's filesystem grew from ${before} KiB to $(size_kib) KiB"

echo "== OpenSDS is up in $(($(date +%s) - start)) s (KUBECONFIG=$KUBECONFIG); the demo ran in namespace $NS"
"${K[@]}" get nodes -o wide
"${K[@]}" get pods -A -o wide
"${K[@]}" get storagebackends,storageprofiles,storageclass
"${K[@]}" get pvc,volumesnapshot
"${K[@]}" get -n opensds-system volumes.opensds.io,snapshots.opensds.io
echo "== sample-writer says:"; "${K[@]}" logs sample-writer
echo "== sample-reader says:"; "${K[@]}" logs sample-reader
