#!/usr/bin/env bash
# Runs a benchmark script with the bench extras (transformers, matplotlib, openai, protobuf, smg)
# installed in .venv on first use (see scripts/env.sh); extra arguments go to the script:
#
#   ./scripts/bench.sh benchmarks/decode.py --preset demo --repeats 5
#
# With no arguments it only sets .venv up; after `. .venv/bin/activate` every command of
# BENCHMARKS.md runs as written.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
ringleader_env bench
cd "$root"
if [ $# -eq 0 ]; then
    echo "ringleader: $PY has the bench extras; '. .venv/bin/activate' and BENCHMARKS.md's commands run as written" >&2
    exit 0
fi
exec "$PY" "$@"
