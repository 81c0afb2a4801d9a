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
#
# Guest memory: OPENSDS_VM_MEMORY (QEMU -m syntax), 4G by default. Measured peak use of the
# e2e tier (Ceph + operator + dock + tests) is in each run's mem.log; leave room for the
# containerd + kubelet that a later change adds.
#
# Every run keeps its logs in .vm/runs/<timestamp>-<pid>/ (the newest OPENSDS_VM_KEEP_RUNS, 10
# by default, are kept): console.log (the guest kernel's console on a virtio console, written
# by QEMU itself, so a panic or an OOM kill is there even when the guest dies), kernel.log (`dmesg
# -w` in the guest), mem.log (MemAvailable, tmpfs use and the largest processes every 5 s),
# output.log (the command's output), script.sh. The command sees the directory as
# $OPENSDS_VM_RUN_DIR. On a non-zero exit the tail of these logs is printed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
SCRATCH=$ROOT/.vm
MEMORY=${OPENSDS_VM_MEMORY:-4G}
KEEP_RUNS=${OPENSDS_VM_KEEP_RUNS:-10}
KERNEL=${OPENSDS_VM_KERNEL:-$(ls -1 /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1)}
[[ -n $KERNEL ]] || { echo "vm: no /boot/vmlinuz-*-amd64: apt-get install linux-image-amd64" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "vm: qemu-system-x86 missing" >&2; exit 1; }
[[ -x $VENV/bin/vng ]] || { echo "vm: virtme-ng missing: make venv" >&2; exit 1; }
mkdir -p "$SCRATCH/runs"
RUN_DIR=$SCRATCH/runs/$(date +%Y%m%d-%H%M%S)-$$
mkdir "$RUN_DIR"
# Keep the newest $KEEP_RUNS run directories (names sort by start time).
mapfile -t old < <(find "$SCRATCH/runs" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort | head -n "-$KEEP_RUNS")
for d in "${old[@]}"; do rm -rf "${SCRATCH:?}/runs/$d"; done
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
# One script per run (kept in the run's directory): bash reads a script as it runs, so a shared
# name would let a second run rewrite the first one's commands mid-flight.
run_script=$RUN_DIR/script.sh
cat > "$run_script" <<SCRIPT
set -e
# The kernel log and a memory sample every 5 s, straight to the 9p share (uncached: what is
# written survives the guest). Both end with the VM.
dmesg --follow --time-format iso > $RUN_DIR/kernel.log 2>&1 &
(
  while :; do
    printf '%s MemTotal_kB=%s MemAvailable_kB=%s Shmem_kB=%s' "\$(date +%T)" \
      \$(awk '\$1 ~ /^(MemTotal|MemAvailable|Shmem):\$/ {print \$2}' /proc/meminfo)
    df -k --output=target,used /run /tmp 2>/dev/null | awk 'NR > 1 {printf " tmpfs%s_kB=%s", \$1, \$2}'
    ps -eo rss=,comm= --sort=-rss | head -n 6 | awk '{printf " %s=%dM", \$2, \$1 / 1024}'
    echo
    sleep 5
  done
) >> $RUN_DIR/mem.log 2>&1 &
$guest_net
export PATH=$VENV/bin:\$PATH PYTHONDONTWRITEBYTECODE=1 OPENSDS_IN_VM=1 OPENSDS_VM_SCRATCH=$SCRATCH OPENSDS_VM_RUN_DIR=$RUN_DIR
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

# Peak guest memory use (MemTotal - MemAvailable) from mem.log, in MiB.
peak_mem() {
  awk '{for (i = 2; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}
        used = v["MemTotal_kB"] - v["MemAvailable_kB"]; if (used > peak) {peak = used; at = $1}}
       END {if (peak) printf "%d MiB of %d MiB (at %s)", peak / 1024, v["MemTotal_kB"] / 1024, at}' "$RUN_DIR/mem.log" 2>/dev/null
}

export PATH=$VENV/bin:$PATH
start=$SECONDS
# QEMU reopens the console as /proc/self/fd/1, which truncates a redirected log file: keep
# stdout and stderr a pipe (pipefail keeps vng's exit code). The guest kernel's console also goes
# to a virtio console (hvc0; the 8250 driver serves one console only, virtme's ttyS0 to
# /dev/null) that QEMU writes to console.log; 255 from
# vng means the guest ended without the command's exit code (panic, init killed, QEMU died).
set +e
vng --run "$KERNEL" --disable-kvm --force-9p --user root --memory "$MEMORY" \
  --cpus 2 --rwdir "$SCRATCH" --append "console=hvc0 loglevel=6" \
  "--qemu-opts=-device virtio-serial-pci -chardev file,id=klog,path=$RUN_DIR/console.log -device virtconsole,chardev=klog" "${qemu_net[@]}" --exec "bash $run_script" 2>&1 |
  tee "$RUN_DIR/output.log"
rc=$?
set -e
rel=${RUN_DIR#"$ROOT"/}
echo "vm: exit $rc after $((SECONDS - start))s; guest memory $MEMORY, peak use $(peak_mem); logs in $rel" >&2
if ((rc != 0)); then
  {
    if ((rc == 255)); then # vng: QEMU ended and the guest never reported the command's exit code
      if grep -q 'Kernel panic' "$RUN_DIR/console.log" 2>/dev/null; then
        echo "vm: 255: the guest kernel panicked (console.log below)"
      elif grep -q 'reboot: Power down' "$RUN_DIR/console.log" 2>/dev/null; then
        echo "vm: 255: the guest powered off without reporting an exit code (its init ended early?)"
      else
        echo "vm: 255: QEMU ended while the guest was running (killed or crashed on the host: see the host's dmesg)"
      fi
    fi
    echo "vm: ---- OOM killer / panic lines (kernel.log, console.log) ----"
    grep -hiE 'oom|out of memory|killed process|panic|segfault|hung task|BUG:|Call Trace' \
      "$RUN_DIR/kernel.log" "$RUN_DIR/console.log" 2>/dev/null | grep -viE 'command line' | tail -n 40 || true
    for f in console.log kernel.log mem.log; do
      echo "vm: ---- last 40 lines of $rel/$f ----"
      tail -n 40 "$RUN_DIR/$f" 2>/dev/null || true
    done
  } >&2
fi
exit "$rc"
