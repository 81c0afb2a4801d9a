#!/usr/bin/env bash
# `make down`: stop what `make up` started (operator, docks, control plane). Data stays in .run/ and .cluster/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=$ROOT/.run
for pidfile in "$RUN"/*.pid; do
  [[ -f $pidfile ]] || continue
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
done
bash "$ROOT/hack/cluster.sh" down
