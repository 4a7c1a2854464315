#!/usr/bin/env bash
# Installs the official SDK clients that benches/longconn.rs compares lark-service with:
#   - a Python venv at target/bench-venv with lark-oapi (requirements.txt, pinned);
#   - node_modules in bench/sdk/node from the committed package-lock.json (`npm ci`).
# Run it from the repository root (it also works from elsewhere). Progress goes to stderr; at
# the end it prints exactly these two lines to stdout, for `export` or bench/run:
#   LONGCONN_BENCH_PYTHON=/abs/path/target/bench-venv/bin/python
#   LONGCONN_BENCH_NODE_DIR=/abs/path/bench/sdk/node
# The venv goes under $CARGO_TARGET_DIR when that is set (the bench's target dir), else target/.
# Needs python3 (with venv) and node + npm on PATH, and PyPI and the npm registry reachable.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
sdk="$root/bench/sdk"
target=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$target"
target=$(cd "$target" && pwd)
venv="$target/bench-venv"
log() { printf '[bench/sdk/setup.sh] %s\n' "$*" >&2; }

python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv with $($python --version 2>&1)"
  "$python" -m venv "$venv" >&2
fi
log "pip install -r bench/sdk/requirements.txt"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$sdk/requirements.txt" >&2
"$venv/bin/python" -c 'import lark_oapi.ws, lark_oapi.core.const as c; print("lark-oapi", c.VERSION)' >&2

log "npm ci in bench/sdk/node (node $(node --version), npm $(npm --version 2>/dev/null))"
(cd "$sdk/node" && npm ci --no-audit --no-fund --loglevel=error) >&2
node -e 'console.error("@larksuiteoapi/node-sdk", require(process.argv[1] + "/node_modules/@larksuiteoapi/node-sdk/package.json").version)' "$sdk/node"

echo "LONGCONN_BENCH_PYTHON=$venv/bin/python"
echo "LONGCONN_BENCH_NODE_DIR=$sdk/node"
