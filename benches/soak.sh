#!/usr/bin/env bash
# Soak and chaos runner: builds eddy (release) and a venv with matplotlib (for the chart), then
# runs soak.py, which starts `eddy serve` with the shipped queries on loopback, feeds it at half
# its measured maximum rate with probes subscribed, samples memory, fds, threads, queue depths
# and latency every 10 s, and checks that nothing leaks or is lost. Arguments go to soak.py:
#   bash benches/soak.sh --duration 1h            # the soak
#   bash benches/soak.sh --duration 1h --chaos    # restarts the server with SIGTERM at random
#   bash benches/soak.sh --duration 1h --chaos --durable   # SIGTERM or SIGKILL; state and streams resume
# (`python3 benches/soak.py --help` lists every option.) Results: $CARGO_TARGET_DIR/soak/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
(cd "$root" && cargo build --release --quiet)
venv="$target/soak-venv"
python=python3
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python="$venv/bin/python"
elif python3 -m venv "$venv" && "$venv/bin/pip" install --quiet matplotlib; then
  python="$venv/bin/python"
else
  echo "soak.sh: no venv with matplotlib (python3-venv missing or no package index): no chart" >&2
fi
ulimit -n 65536 2>/dev/null || true
exec "$python" "$here/soak.py" --eddy "$target/release/eddy" "$@"
