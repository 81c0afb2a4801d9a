#!/usr/bin/env bash
# OCI image archives in .images/, without Docker or a registry (`make images`).
#   hack/images.sh build                       build every image that is missing or out of date
#   hack/images.sh import [--address <sock>]   import every .images/*.tar into containerd (namespace k8s.io)
# Images: the project (Debian bookworm rootfs by mmdebstrap + the wheel of this repo), the
# kubernetes-csi sidecars from bin/ (tags from hack/versions.env), busybox (Debian's busybox-static)
# and pause (hack/pause.c). Layers and archives are written by hack/oci.py, reproducibly: the same
# inputs (and the same Debian/PyPI package versions) give the same digests.
# Each archive has a stamp (.images/<name>.stamp: a hash of its inputs); a matching stamp skips it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source hack/versions.env
OUT=$ROOT/.images
CACHE=$OUT/cache
BUILD=$OUT/build
HOSTPY=/usr/bin/python3 # Debian's python3.11: the same interpreter and install scheme as the image's
OCI=("$HOSTPY" "$ROOT/hack/oci.py")
SOURCE_URL=https://github.com/opensds/opensds-k8s
REGISTRY=registry.k8s.io/sig-storage
PROJECT_NAME=opensds/opensds-k8s
PROJECT_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
PAUSE_NAMES=(registry.k8s.io/pause:3.10.1 registry.k8s.io/pause:3.10 registry.k8s.io/pause:3.6)
# binary:versions.env variable. The image name is $REGISTRY/<binary>:<version>.
SIDECARS=(csi-provisioner:EXTERNAL_PROVISIONER_VERSION csi-attacher:EXTERNAL_ATTACHER_VERSION
  csi-resizer:EXTERNAL_RESIZER_VERSION csi-snapshotter:EXTERNAL_SNAPSHOTTER_VERSION
  snapshot-controller:EXTERNAL_SNAPSHOTTER_VERSION)
DEBIAN_SUITE=bookworm
DEBIAN_MIRRORS=("deb http://deb.debian.org/debian bookworm main"
  "deb http://deb.debian.org/debian bookworm-updates main"
  "deb http://deb.debian.org/debian-security bookworm-security main")
# What the operator, the dock and the CSI node plugin run (see csi/opensds_csi/connectors).
DEBIAN_PACKAGES=python3,e2fsprogs,xfsprogs,util-linux,mount,nvme-cli,open-iscsi,multipath-tools,lvm2,thin-provisioning-tools,ceph-common,python3-rados,python3-rbd,kmod,udev
# The project's sources: what `pip wheel` reads.
SOURCE_PATHS=(pyproject.toml operator csi)

log() { echo "images: $*" >&2; }
hash_of() { sha256sum | cut -c1-64; } # stdin -> hex
tool_hash() { cat hack/images.sh hack/oci.py | hash_of; }

# up_to_date <archive-base> <hash>: the archive exists and was built from these inputs.
up_to_date() { [[ -f $OUT/$1.tar && -f $OUT/$1.stamp && "$(cat "$OUT/$1.stamp")" == "$2" ]]; }
stamp() { echo "$2" > "$OUT/$1.stamp"; }

# The tracked files of the project's sources as they are in the work tree, as one sorted tar.
source_tar() {
  git ls-files -z -- "${SOURCE_PATHS[@]}" | LC_ALL=C sort -z |
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --no-recursion --null -cf - -T -
}

# Epoch and revision: the last commit that touched the sources or this build (not HEAD: a commit
# elsewhere, say to the README, would otherwise change every digest), "-dirty" if the tree differs.
source_revision() {
  local rev; rev=$(git log -1 --format=%H -- "${SOURCE_PATHS[@]}" hack/images.sh hack/oci.py)
  if ! git diff --quiet HEAD -- "${SOURCE_PATHS[@]}" hack/images.sh hack/oci.py 2>/dev/null; then rev+=-dirty; fi
  echo "$rev"
}
source_epoch() { git log -1 --format=%ct -- "${SOURCE_PATHS[@]}" hack/images.sh hack/oci.py; }

# A rootfs left by an interrupted build: never delete through a mount (mmdebstrap mounts /proc, /sys, /dev).
clean_rootfs() {
  [[ -e $1 ]] || return 0
  if grep -qF " $1/" /proc/self/mountinfo; then log "$1 has mounts (a build still running?): not deleting"; exit 1; fi
  rm -rf --one-file-system "$1"
}

build_project() {
  local base=opensds-k8s name=$PROJECT_NAME:$PROJECT_VERSION
  local inputs; inputs=$( { source_tar; tool_hash; echo "$DEBIAN_PACKAGES ${DEBIAN_MIRRORS[*]}"; source_revision; source_epoch; } | hash_of)
  if up_to_date "$base" "$inputs"; then log "$name up to date"; return; fi
  local start=$SECONDS epoch rev rootfs=$BUILD/$base-rootfs wheels=$BUILD/$base-wheels src=$BUILD/$base-src
  epoch=$(source_epoch); rev=$(source_revision)
  export SOURCE_DATE_EPOCH=$epoch
  log "building $name (revision $rev, SOURCE_DATE_EPOCH=$epoch)"
  clean_rootfs "$rootfs"
  rm -rf "$wheels" "$src"
  mkdir -p "$CACHE/debs" "$CACHE/pip" "$wheels" "$src"

  # 1. Debian: the Essential set (no apt in the image) plus the node tools; no recommends, no docs,
  #    and not ceph-common's RGW/CephFS/replay tools (only ceph and rbd are used).
  #    .debs are kept in .images/cache/debs between builds.
  mmdebstrap --quiet --mode=root --variant=essential --format=directory \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --dpkgopt='path-exclude=/usr/bin/radosgw-admin' --dpkgopt='path-exclude=/usr/bin/cephfs-*' \
    --dpkgopt='path-exclude=/usr/bin/ceph-syn' --dpkgopt='path-exclude=/usr/bin/rbd-replay*' \
    --include="$DEBIAN_PACKAGES" \
    --skip=essential/unlink \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in $CACHE/debs /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives $CACHE/debs" \
    "$DEBIAN_SUITE" "$rootfs" "${DEBIAN_MIRRORS[@]}"
  log "rootfs: Debian done after $((SECONDS - start))s"

  # 2. The project: a wheel of the work tree's tracked sources, installed with its pinned
  #    dependencies from PyPI into /usr/local: Debian's pip maps --prefix /usr to its posix_local scheme,
  #    /usr/local/bin and /usr/local/lib/python3.11/dist-packages (which the image's python3 reads).
  source_tar | tar -xf - -C "$src"
  "$HOSTPY" -m pip wheel -q --no-deps --cache-dir "$CACHE/pip" -w "$wheels" "$src"
  "$HOSTPY" -m pip install -q --isolated --root-user-action=ignore --ignore-installed --no-compile --no-warn-script-location \
    --cache-dir "$CACHE/pip" --find-links "$wheels" --root "$rootfs" --prefix /usr \
    "opensds-k8s==$PROJECT_VERSION"
  # Bytecode by the image's own python: unchecked-hash .pycs carry no timestamps.
  chroot "$rootfs" python3 -m compileall -q --invalidation-mode unchecked-hash /usr/local/lib/python3.11/dist-packages
  log "rootfs: Python done after $((SECONDS - start))s"

  # 3. Versions, then what must not be in an image: per-host identities (each node has its own
  #    iSCSI initiator name and NVMe host NQN/ID; the node plugin uses the host's), runtime files, caches.
  local pkgs=$BUILD/$base.packages.txt
  {
    echo "# $name revision $rev SOURCE_DATE_EPOCH=$epoch"
    echo "# Debian packages (dpkg-query -W)"
    chroot "$rootfs" dpkg-query -W -f='${Package}=${Version}\n' | LC_ALL=C sort
    echo "# Python packages in /usr/local (dist-info)"
    for d in "$rootfs"/usr/local/lib/python3.11/dist-packages/*.dist-info; do
      sed -n -e 's/^Name: //p' -e 's/^Version: //p' "$d/METADATA" | paste -sd= -
    done | LC_ALL=C sort -f
  } > "$pkgs"
  install -D -m 0644 "$pkgs" "$rootfs/usr/share/opensds/packages.txt"
  rm -f "$rootfs"/etc/iscsi/initiatorname.iscsi "$rootfs"/etc/nvme/hostnqn "$rootfs"/etc/nvme/hostid \
    "$rootfs"/etc/hostname "$rootfs"/etc/resolv.conf "$rootfs"/etc/machine-id \
    "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old "$rootfs"/var/cache/ldconfig/aux-cache
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/apt "$rootfs"/root/.cache

  "${OCI[@]}" --out "$OUT/$base.tar" --name "$name" --rootfs "$rootfs" --summary "$OUT/$base.json" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env PYTHONUNBUFFERED=1 \
    --label "org.opencontainers.image.title=opensds-k8s" \
    --label "org.opencontainers.image.version=$PROJECT_VERSION" \
    --label "org.opencontainers.image.source=$SOURCE_URL" \
    --label "org.opencontainers.image.revision=$rev"
  cp "$pkgs" "$OUT/$base.packages.txt"
  clean_rootfs "$rootfs"
  rm -rf "$wheels" "$src"
  stamp "$base" "$inputs"
  log "$name built in $((SECONDS - start))s"
}

# Files of a distroless-like base: users root, nobody, nonroot; CA bundle; /tmp.
base_files() { # [root's shell]
  local dir=$BUILD/base-files shell=${1:-/sbin/nologin}
  mkdir -p "$dir"
  printf 'root:x:0:0:root:/root:%s\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' "$shell" > "$dir/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$dir/group"
  BASE_ARGS=(--file "$dir/passwd=/etc/passwd:0644" --file "$dir/group=/etc/group:0644"
    --dir-entry /tmp:1777 --dir-entry /root:0700 --dir-entry /home/nonroot:0700)
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    BASE_ARGS+=(--file /etc/ssl/certs/ca-certificates.crt=/etc/ssl/certs/ca-certificates.crt:0644)
  fi
}

build_sidecars() {
  local spec bin var version name base inputs epoch repo
  epoch=$(git log -1 --format=%ct -- hack/versions.env)
  base_files
  for spec in "${SIDECARS[@]}"; do
    bin=${spec%%:*}; var=${spec#*:}; version=${!var}; name=$REGISTRY/$bin:$version; base=$bin
    repo=${var%_VERSION}; repo=${repo,,}; repo=${repo//_/-} # EXTERNAL_RESIZER_VERSION -> external-resizer
    [[ -x bin/$bin ]] || { log "bin/$bin missing: run make tools"; exit 1; }
    if ! grep -qsE -- "@$version (.* )?$bin=" bin/.stamps/*; then
      log "bin/$bin is not the $version build of hack/versions.env: run make tools"; exit 1
    fi
    inputs=$( { cat "bin/$bin" /etc/ssl/certs/ca-certificates.crt 2>/dev/null; echo "$name $epoch"; tool_hash; } | hash_of)
    if up_to_date "$base" "$inputs"; then log "$name up to date"; continue; fi
    SOURCE_DATE_EPOCH=$epoch "${OCI[@]}" --out "$OUT/$base.tar" --name "$name" --summary "$OUT/$base.json" \
      "${BASE_ARGS[@]}" --file "bin/$bin=/$bin:0755" --entrypoint "[\"/$bin\"]" --env PATH=/ \
      --label "org.opencontainers.image.title=$bin" --label "org.opencontainers.image.version=$version" \
      --label "org.opencontainers.image.source=https://github.com/kubernetes-csi/$repo"
    stamp "$base" "$inputs"
  done
}

build_busybox() {
  local deb version name base=busybox inputs epoch dir=$BUILD/busybox
  deb=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) ||
    { log "busybox-static is not installed (apt-get install busybox-static)"; exit 1; }
  version=${deb#*:}; version=${version%%-*} # 1:1.35.0-4+deb12u1+b1 -> 1.35.0
  name=opensds/busybox:$version
  epoch=$(git log -1 --format=%ct -- hack/images.sh)
  base_files /bin/sh
  inputs=$( { cat /bin/busybox; echo "$deb $epoch"; tool_hash; } | hash_of)
  if up_to_date "$base" "$inputs"; then log "$name up to date"; return; fi
  local args=() applet
  # `busybox --install -s`: a symlink per applet, at the path busybox lists for it.
  while read -r applet; do
    [[ $applet == bin/busybox ]] || args+=(--symlink "/$applet=/bin/busybox")
  done < <(/bin/busybox --list-full | LC_ALL=C sort -u)
  SOURCE_DATE_EPOCH=$epoch "${OCI[@]}" --out "$OUT/$base.tar" --summary "$OUT/$base.json" \
    --name "$name" --name "docker.io/library/busybox:$version" \
    "${BASE_ARGS[@]}" --file /bin/busybox=/bin/busybox:0755 "${args[@]}" --cmd '["sh"]' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label "org.opencontainers.image.title=busybox" --label "org.opencontainers.image.version=$deb" \
    --label "org.opencontainers.image.source=https://packages.debian.org/bookworm/busybox-static"
  stamp "$base" "$inputs"
}

build_pause() {
  local base=pause inputs epoch bin=$BUILD/pause
  epoch=$(git log -1 --format=%ct -- hack/pause.c hack/images.sh)
  inputs=$( { cat hack/pause.c; gcc --version | head -1; dpkg-query -W libc6-dev; echo "${PAUSE_NAMES[*]} $epoch"; tool_hash; } | hash_of)
  if up_to_date "$base" "$inputs"; then log "${PAUSE_NAMES[0]} up to date"; return; fi
  mkdir -p "$BUILD"
  gcc -static -Os -s -Wall -Werror -o "$bin" hack/pause.c
  local names=() n
  for n in "${PAUSE_NAMES[@]}"; do names+=(--name "$n"); done
  SOURCE_DATE_EPOCH=$epoch "${OCI[@]}" --out "$OUT/$base.tar" --summary "$OUT/$base.json" "${names[@]}" \
    --file "$bin=/pause:0755" --entrypoint '["/pause"]' --user 65535:65535 --env PATH=/ \
    --label "org.opencontainers.image.title=pause" --label "org.opencontainers.image.source=$SOURCE_URL"
  stamp "$base" "$inputs"
}

# The manifests and the chart are not ours to edit: name the sidecar images they use that we do not build.
check_manifests() {
  local built=" " spec var ref
  for spec in "${SIDECARS[@]}"; do var=${spec#*:}; built+="$REGISTRY/${spec%%:*}:${!var} "; done
  while read -r ref; do
    [[ $built == *" $ref "* ]] || log "warning: manifests reference $ref, which hack/versions.env does not pin (not built)"
  done < <(grep -rhoE "image: *$REGISTRY/[^ \"']+" manifests charts 2>/dev/null | sed 's/image: *//' | sort -u)
}

build_all() {
  local start=$SECONDS
  mkdir -p "$OUT" "$BUILD"
  # One build at a time: a second one would delete the rootfs the first is installing into.
  exec 9> "$OUT/.lock"
  flock -n 9 || { log "another build holds $OUT/.lock, waiting"; flock 9; }
  build_pause
  build_busybox
  build_sidecars
  build_project
  check_manifests
  log "all images in $OUT up to date after $((SECONDS - start))s"
}

import_all() {
  local address=/run/containerd/containerd.sock archive
  while (($#)); do
    case $1 in
      --address) address=$2; shift 2 ;;
      *) echo "usage: $0 import [--address <containerd socket>]" >&2; exit 2 ;;
    esac
  done
  local present wanted
  present=$(ctr -a "$address" -n k8s.io images ls 2>/dev/null | awk 'NR > 1 {print $1, $3}')
  for archive in "$OUT"/*.tar; do
    # "<name> <manifest digest>" per name in the archive's index: skip it when containerd has them all.
    wanted=$(tar -xOf "$archive" index.json | python3 -c 'import json, sys
for m in json.load(sys.stdin)["manifests"]:
    print(m["annotations"]["io.containerd.image.name"], m["digest"])')
    if [[ -z $(comm -23 <(sort <<< "$wanted") <(sort <<< "$present")) ]]; then
      log "$(basename "$archive"): already in containerd"
      continue
    fi
    log "importing $archive"
    ctr -a "$address" -n k8s.io images import "$archive"
  done
}

main() {
  case ${1:-build} in
    build) build_all ;;
    import) shift; import_all "$@" ;;
    *) echo "usage: $0 build | import [--address <containerd socket>]" >&2; exit 2 ;;
  esac
}
# On one line: bash reads a script as it runs, so an edit during a build must not change what runs next.
main "$@"; exit
