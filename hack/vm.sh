#!/usr/bin/env bash
# Run a command inside a real-kernel VM (Debian's kernel under QEMU TCG via virtme-ng), as in
# ../shared/DESIGN.md: the host's root is shared read-only, .vm/ (git-ignored) is shared
# read-write, the exit code of the command is ours. Device-mapper, LVM thin pools, nvmet, LIO
# and krbd exist there; the CI host kernel lacks them.
#
#   hack/vm.sh <command...>        e.g. hack/vm.sh pytest -q e2e/vm
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
cat > "$SCRATCH/run.sh" <<SCRIPT
set -e
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
exec vng --run "$KERNEL" --disable-kvm --force-9p --user root --memory "${OPENSDS_VM_MEMORY:-2G}" \
  --cpus 2 --rwdir "$SCRATCH" --exec "bash $SCRATCH/run.sh"
