#!/usr/bin/env bash
# Make Debian's rados/rbd bindings (python3-rados, python3-rbd: compiled for this Python 3.11)
# importable from the venv by linking just those two extension modules into its site-packages,
# instead of exposing all of /usr/lib/python3/dist-packages (DESIGN.md). No-op without them.
set -euo pipefail
VENV=${1:-.venv}
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for module in rados rbd; do
  so=$(ls /usr/lib/python3/dist-packages/$module.cpython-311-*.so 2>/dev/null | head -n 1 || true)
  [[ -n $so ]] && ln -sf "$so" "$site/"
done
exit 0
