#!/usr/bin/env bash
# `make down`: stop what `make up` started: the node(s) (pods killed, mounts and loop devices
# released) and the control plane. Data stays: volumes in .nodes/<node>/opensds, the API in .cluster/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/hack/node.sh" down
bash "$ROOT/hack/cluster.sh" down
