#!/usr/bin/env bash
# Data-path benchmark: fio inside the real-kernel VM on a thin LV directly, through NVMe-oF/TCP
# and through iSCSI, then NVMe/TCP with a profile's maxIOPS/maxBPS enforced by the node plugin
# (io.max on a pod cgroup). Prints figures and ratios to the direct LV; see bench/datapath.py.
#
#   bench/datapath.sh [--runtime SECONDS] [--size-mib N]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v fio >/dev/null || { echo "datapath: fio missing (apt-get install fio)" >&2; exit 1; }
OPENSDS_VM_MEMORY=${OPENSDS_VM_MEMORY:-3G} exec bash "$ROOT/hack/vm.sh" python -m bench.datapath \
  --out "$ROOT/.vm/bench-datapath.json" "$@"
