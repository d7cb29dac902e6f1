#!/usr/bin/env bash
# Runs the whole test suite; sets up .venv with the test extras on first use (see scripts/env.sh).
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
ringleader_env test
cd "$root"
exec "$PY" -m pytest "$@"
