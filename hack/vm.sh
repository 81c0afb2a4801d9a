#!/usr/bin/env bash
# Run a command inside a real-kernel VM (Debian's kernel under QEMU TCG via virtme-ng), as in
# ../shared/DESIGN.md: the host's root is shared read-only, .vm/ (git-ignored) is shared
# read-write, the exit code of the command is ours. Device-mapper, LVM thin pools, nvmet, LIO
# and krbd exist there; the CI host kernel lacks them.
#
#   hack/vm.sh <command...>        e.g. hack/vm.sh pytest -q e2e/vm
#
# With OPENSDS_VM_APISERVER=<kubeconfig> the guest also reaches the host's kube-apiserver, and
# nothing else: QEMU user networking with restrict=on and one guestfwd rule mapping
# 10.0.2.100:<port> in the guest to 127.0.0.1:<port> on the host (relayed by socat). The guest gets a copy of
# that kubeconfig pointing there as $OPENSDS_VM_SCRATCH/kubeconfig.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
SCRATCH=$ROOT/.vm
KERNEL=${OPENSDS_VM_KERNEL:-$(ls -1 /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1)}
[[ -n $KERNEL ]] || { echo "vm: no /boot/vmlinuz-*-amd64: apt-get install linux-image-amd64" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "vm: qemu-system-x86 missing" >&2; exit 1; }
[[ -x $VENV/bin/vng ]] || { echo "vm: virtme-ng missing: make venv" >&2; exit 1; }
mkdir -p "$SCRATCH"
printf -v cmd '%q ' "$@"
qemu_net=() guest_net=""
if [[ -n ${OPENSDS_VM_APISERVER:-} ]]; then
  server=$(awk '$1 == "server:" {print $2; exit}' "$OPENSDS_VM_APISERVER")
  port=${server##*:}
  sed "s|server: .*|server: https://10.0.2.100:$port|" "$OPENSDS_VM_APISERVER" > "$SCRATCH/kubeconfig"
  chmod 600 "$SCRATCH/kubeconfig"
  # guestfwd's "cmd:" form starts one relay per guest connection ("tcp:" serves only one).
  command -v socat >/dev/null || { echo "vm: socat missing (apt-get install socat)" >&2; exit 1; }
  qemu_net=("--qemu-opts=-netdev 'user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:$port-cmd:socat - TCP:127.0.0.1:$port' -device virtio-net-pci,netdev=n0")
  guest_net="ip link set lo up; dev=\$(ls /sys/class/net | grep -v '^lo\$' | head -n1); ip addr add 10.0.2.15/24 dev \$dev; ip link set \$dev up"
fi
# One script per run: bash reads a script as it runs, so a shared name would let a second
# run rewrite the first one's commands mid-flight.
run_script=$(mktemp "$SCRATCH/run.XXXXXX.sh")
trap 'rm -f "$run_script"' EXIT
cat > "$run_script" <<SCRIPT
set -e
$guest_net
export PATH=$VENV/bin:\$PATH PYTHONDONTWRITEBYTECODE=1 OPENSDS_IN_VM=1 OPENSDS_VM_SCRATCH=$SCRATCH
mkdir -p /run/lvm /run/lock/lvm
export LVM_SYSTEM_DIR=$SCRATCH/lvm
mkdir -p \$LVM_SYSTEM_DIR
cat > \$LVM_SYSTEM_DIR/lvm.conf <<'CONF'
global { use_lvmetad = 0 locking_dir = "/run/lock/lvm" }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
devices { obtain_device_list_from_udev = 0 }
CONF
cd $ROOT
$cmd
SCRIPT
export PATH=$VENV/bin:$PATH
# QEMU reopens the console as /proc/self/fd/1, which truncates a redirected log file: keep
# stdout and stderr a pipe (pipefail keeps the command's exit code).
vng --run "$KERNEL" --disable-kvm --force-9p --user root --memory "${OPENSDS_VM_MEMORY:-2G}" \
  --cpus 2 --rwdir "$SCRATCH" "${qemu_net[@]}" --exec "bash $run_script" 2>&1 | cat
