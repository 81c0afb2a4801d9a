#!/usr/bin/env bash
# Build the pinned Kubernetes/CSI toolchain into bin/ from Go modules (versions: hack/versions.env).
# Idempotent: a group whose stamp in bin/.stamps matches its pinned version is not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source hack/versions.env
BIN=$ROOT/bin
STAMPS=$BIN/.stamps
mkdir -p "$STAMPS"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

# build_group <group> <module> <version> <name=package>...
# $VERSION_LDFLAGS (optional) stamps the version into the binary (-X flags).
build_group() {
  local group=$1 module=$2 version=$3; shift 3
  local ldflags="-s -w ${VERSION_LDFLAGS:-}"
  local stamp="$module@$version $* ldflags=$ldflags" dir=hack/tools/$group missing=0 spec
  for spec in "$@"; do [[ -x $BIN/${spec%%=*} ]] || missing=1; done
  if [[ $missing == 0 && -f $STAMPS/$group && "$(cat "$STAMPS/$group")" == "$stamp" ]]; then
    echo "tools: $group $version up to date"; return
  fi
  local packages=()
  for spec in "$@"; do packages+=("${spec#*=}"); done
  if ! grep -qs "^require $module $version\$" "$dir/go.mod"; then
    echo "tools: generating $dir/go.mod for $module@$version"
    python3 hack/gen_tool_module.py "$dir" "$module" "$version" "${packages[@]}"
  fi
  local start=$SECONDS
  for spec in "$@"; do
    echo "tools: building ${spec%%=*} ($module@$version)"
    (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$BIN/${spec%%=*}" "${spec#*=}")
  done
  echo "$stamp" > "$STAMPS/$group"
  echo "tools: $group built in $((SECONDS - start))s"
}

# copy_from_module <dest> <module@version> <path-in-module>...: data files (CRDs, protos) from a module.
copy_from_module() {
  local dest=$1 modver=$2; shift 2
  local dir; dir=$(cd /tmp && go mod download -json "$modver" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$dest"
  for path in "$@"; do install -m 0644 "$dir/$path" "$dest/"; done
}

K8S=$KUBERNETES_VERSION
minor=${K8S#v1.}; minor=${minor%%.*}
VERSION_LDFLAGS=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  VERSION_LDFLAGS+=" -X $pkg.gitVersion=$K8S -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
build_group kubernetes k8s.io/kubernetes "$K8S" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
  kubectl=k8s.io/kubernetes/cmd/kubectl \
  kubelet=k8s.io/kubernetes/cmd/kubelet
VERSION_LDFLAGS=""
build_group etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" etcd=go.etcd.io/etcd/server/v3
build_group csi-test github.com/kubernetes-csi/csi-test/v5 "$CSI_TEST_VERSION" \
  csi-sanity=github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
VERSION_LDFLAGS="-X main.version=$EXTERNAL_PROVISIONER_VERSION" build_group external-provisioner github.com/kubernetes-csi/external-provisioner/v6 "$EXTERNAL_PROVISIONER_VERSION" \
  csi-provisioner=github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner
VERSION_LDFLAGS="-X main.version=$EXTERNAL_ATTACHER_VERSION" build_group external-attacher github.com/kubernetes-csi/external-attacher/v4 "$EXTERNAL_ATTACHER_VERSION" \
  csi-attacher=github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher
VERSION_LDFLAGS="-X main.version=$EXTERNAL_RESIZER_VERSION" build_group external-resizer github.com/kubernetes-csi/external-resizer/v2 "$EXTERNAL_RESIZER_VERSION" \
  csi-resizer=github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer
VERSION_LDFLAGS="-X main.version=$EXTERNAL_SNAPSHOTTER_VERSION" build_group external-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 "$EXTERNAL_SNAPSHOTTER_VERSION" \
  csi-snapshotter=github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter \
  snapshot-controller=github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller
VERSION_LDFLAGS="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" build_group helm helm.sh/helm/v3 "$HELM_VERSION" helm=helm.sh/helm/v3/cmd/helm
build_group kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION" \
  kustomize=sigs.k8s.io/kustomize/kustomize/v5

# Data files pinned with the same versions.
# kubelet's plugin-registration API (the CSI node plugin registers itself with kubelet): the
# k8s.io/kubelet staging module at the version matching the pinned Kubernetes release.
KUBELET_API_VERSION=v0.${K8S#v1.}
data_stamp="snapshot-crds+group $EXTERNAL_SNAPSHOTTER_VERSION csi-proto $CSI_SPEC_VERSION kubelet-api $KUBELET_API_VERSION"
if [[ ! -f $STAMPS/data || "$(cat "$STAMPS/data")" != "$data_stamp" ]]; then
  rm -rf "$BIN/snapshot-crds"
  copy_from_module "$BIN/snapshot-crds" "github.com/kubernetes-csi/external-snapshotter/client/v8@$EXTERNAL_SNAPSHOTTER_VERSION" \
    config/crd/snapshot.storage.k8s.io_volumesnapshotclasses.yaml \
    config/crd/snapshot.storage.k8s.io_volumesnapshotcontents.yaml \
    config/crd/snapshot.storage.k8s.io_volumesnapshots.yaml \
    config/crd/groupsnapshot.storage.k8s.io_volumegroupsnapshotclasses.yaml \
    config/crd/groupsnapshot.storage.k8s.io_volumegroupsnapshotcontents.yaml \
    config/crd/groupsnapshot.storage.k8s.io_volumegroupsnapshots.yaml
  copy_from_module "$BIN/csi-spec" "github.com/container-storage-interface/spec@$CSI_SPEC_VERSION" csi.proto
  rm -rf "$BIN/kubelet-api"
  copy_from_module "$BIN/kubelet-api" "k8s.io/kubelet@$KUBELET_API_VERSION" pkg/apis/pluginregistration/v1/api.proto
  echo "$data_stamp" > "$STAMPS/data"
fi
echo "tools: all up to date in $BIN"
