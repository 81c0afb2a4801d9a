#!/usr/bin/env bash
# The Debian 12 (bookworm) packages this project needs: the one list (`make deps`; `make venv`,
# and so `make up`, `make test` and `make e2e`, run it first; .ci/run too).
#
#   hack/deps.sh             as root: install the missing packages (apt-get update only when
#                            something is missing); otherwise: exit 1 naming exactly the missing
#                            packages and the command that installs them
#   hack/deps.sh --kernel    also bookworm-backports' kernel (>= 6.12) that `make e2e` boots
#   hack/deps.sh --list      print the package list and exit
#
# Not a Debian package: Go (hack/tools.sh builds bin/ with the `go` on PATH; bookworm's is too old).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
APT_DIR=${OPENSDS_APT_DIR:-/etc/apt}   # overridable to test the mirror derivation

# Base: the Makefile, the venv (Python 3.11 with ensurepip), the control plane's certificates and
# health checks (hack/cluster.sh: openssl, curl), pgrep/pkill.
BASE=(make git python3 python3-venv openssl curl ca-certificates procps)
# Test tier (`make test` on this host): the CSI node plugin on loop devices formats ext4 and xfs
# and mounts; parted (a partition table is not a blank device); nvme-cli (DHHC-1 key cross-check).
TEST=(e2fsprogs xfsprogs util-linux mount parted nvme-cli)
# Node tools (the CSI node plugin and the dock on a real node; opensds_operator/hosttools.py maps
# each executable to its package): connectors, dm-multipath, kernel modules.
NODE_TOOLS=(kmod nvme-cli open-iscsi multipath-tools dmsetup lvm2 thin-provisioning-tools)
# Ceph (hack/ceph.sh, the RBD driver and krbd tests): one mon, mgr and OSD; the rados/rbd bindings
# `make venv` links into the venv.
CEPH=(ceph-mon ceph-mgr ceph-osd ceph-common python3-rados python3-rbd)
# VM tier (`make e2e`, hack/vm.sh): QEMU, busybox for the guest, socat (guestfwd to the apiserver),
# fio (bench/datapath.sh). The guest kernel is bookworm-backports' (see --kernel).
VM=(qemu-system-x86 busybox-static socat fio)
# Images and a kubelet node (hack/images.sh, hack/node.sh): container runtime, CNI plugins, root
# filesystems and OCI image tools, the node's packet filtering and port forwarding.
IMAGES_NODE=(containerd runc containernetworking-plugins mmdebstrap skopeo umoci iptables socat gcc libc6-dev python3-pip)

PACKAGES=()
for pkg in "${BASE[@]}" "${TEST[@]}" "${NODE_TOOLS[@]}" "${CEPH[@]}" "${VM[@]}" "${IMAGES_NODE[@]}"; do
  [[ " ${PACKAGES[*]} " == *" $pkg "* ]] || PACKAGES+=("$pkg")
done

kernel=0
for arg in "$@"; do
  case $arg in
    --kernel) kernel=1 ;;
    --list) printf '%s\n' "${PACKAGES[@]}"; exit 0 ;;
    --print-backports-mirror) print_mirror=1 ;;
    *) echo "usage: $0 [--kernel] [--list] [--print-backports-mirror]" >&2; exit 2 ;;
  esac
done

log() { echo "deps: $*" >&2; }

# Installed packages, one query for all of them (an unknown name is simply not installed).
installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)
missing=()
for pkg in "${PACKAGES[@]}"; do
  grep -qx "$pkg installed" <<<"$installed" || missing+=("$pkg")
done

# The VM boots bookworm-backports' kernel (6.12): tmpfs with O_DIRECT (Ceph's OSD inside the VM
# keeps its block file there) and NVMe in-band authentication, which bookworm's 6.1 lacks.
have_kernel() { compgen -G "/boot/vmlinuz-6.1[2-9]*" >/dev/null || compgen -G "/boot/vmlinuz-[7-9].*" >/dev/null; }

# The mirror this machine already uses for bookworm main (one-line .list files and deb822
# .sources), so the backports entry goes to the same place: never a hard-coded host name.
bookworm_mirror() {
  local lists=() sources=()
  [[ -f $APT_DIR/sources.list ]] && lists+=("$APT_DIR/sources.list")
  for f in "$APT_DIR"/sources.list.d/*.list; do [[ -f $f ]] && lists+=("$f"); done
  for f in "$APT_DIR"/sources.list.d/*.sources; do [[ -f $f ]] && sources+=("$f"); done
  local found=""
  if ((${#lists[@]})); then # deb [options] URI suite component...
    found=$(awk '$1 == "deb" { i = 2; signed = ""
                  if ($2 ~ /^\[/) { for (; i <= NF; i++) { o = $i; gsub(/[\[\]]/, "", o)
                                                           if (o ~ /^signed-by=/) { sub(/^signed-by=/, "", o); signed = o }
                                                           if ($i ~ /\]$/) break }
                                    i++ }
                  uri = $i; suite = $(i + 1); main = 0
                  for (j = i + 2; j <= NF; j++) if ($j == "main") main = 1
                  if (suite == "bookworm" && main) { print uri "|" signed; exit } }' "${lists[@]}")
  fi
  if [[ -z $found ]] && ((${#sources[@]})); then # deb822 stanzas separated by blank lines
    found=$(awk 'function flush() {
                   if (types ~ /(^| )deb( |$)/ && suites ~ /(^| )bookworm( |$)/ && comps ~ /(^| )main( |$)/ &&
                       enabled !~ /^no$/ && uri != "" && !done) { print uri "|" signed; done = 1 }
                   types = suites = comps = uri = signed = enabled = "" }
                 FNR == 1 { flush() }
                 /^[ \t]*#/ { next }
                 /^[ \t]*$/ { flush(); next }
                 { key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^[ \t]+/, "")
                   if (key == "types") types = $0; else if (key == "suites") suites = $0
                   else if (key == "components") comps = $0; else if (key == "uris") { split($0, u, " "); uri = u[1] }
                   else if (key == "signed-by") signed = $0; else if (key == "enabled") enabled = $0 }
                 END { flush() }' "${sources[@]}")
  fi
  [[ -n $found ]] && echo "$found"
}

ensure_backports_source() {
  if grep -rqs --include='*.list' --include='*.sources' --include='sources.list' -E '^[^#]*bookworm-backports' \
       "$APT_DIR/sources.list" "$APT_DIR/sources.list.d/"; then
    return
  fi
  local found uri signed
  found=$(bookworm_mirror) || { log "no apt source for bookworm main found in $APT_DIR/sources.list{,.d/}: \
cannot derive the bookworm-backports mirror; add a bookworm-backports entry and run again"; exit 1; }
  uri=${found%%|*} signed=${found#*|}
  [[ -n $signed ]] || signed=/usr/share/keyrings/debian-archive-keyring.gpg
  log "adding bookworm-backports from the bookworm mirror $uri"
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' "$uri" "$signed" \
    > $APT_DIR/sources.list.d/opensds-backports.sources
}

if [[ -n ${print_mirror:-} ]]; then bookworm_mirror; exit; fi

need_kernel=0
if ! have_kernel; then
  if ((kernel)); then need_kernel=1
  else log "note: make e2e boots bookworm-backports' kernel (>= 6.12), not installed: run 'bash hack/deps.sh --kernel' as root"
  fi
fi

if ((${#missing[@]} == 0 && need_kernel == 0)); then
  exit 0
fi

if ((EUID != 0)); then
  if ((${#missing[@]})); then
    log "missing Debian packages: ${missing[*]}"
    log "install them with: sudo apt-get install -y ${missing[*]}   (or: sudo bash hack/deps.sh)"
  fi
  ((need_kernel)) && log "missing bookworm-backports' kernel for make e2e: sudo bash hack/deps.sh --kernel"
  exit 1
fi

start=$SECONDS
((need_kernel)) && ensure_backports_source
apt-get update -qq
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  apt-get install -y -qq "${missing[@]}"
fi
if ((need_kernel)); then
  log "installing bookworm-backports' kernel"
  apt-get install -y -qq -t bookworm-backports linux-image-amd64
fi
log "installed in $((SECONDS - start))s"
