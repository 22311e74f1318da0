#!/usr/bin/env bash
# Peer comparison: installs what the peers need (npm: ws; pip: websockets, in a local venv),
# builds eddy in release mode, then runs compare.py: eddy, Node and Python side by side under
# the same `eddy feed` load, alternating, several rounds; prints one table with ratios.
# Arguments are passed to compare.py (e.g. --rounds 5 --seconds 10, --fanout 0 to skip fan-out).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
command -v node >/dev/null || { echo "node is needed (apt-get install nodejs npm)"; exit 1; }
(cd "$here/node" && npm install --no-audit --no-fund --silent)
[ -x "$here/.venv/bin/python" ] || python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install --quiet websockets
(cd "$root" && cargo build --release --quiet)
ulimit -n 65536 2>/dev/null || true
exec python3 "$here/compare.py" "$@"
