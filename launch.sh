#!/usr/bin/env bash
# ringleader launcher.
#
#   ./launch.sh                          serve the demo checkpoint (built on first use) on
#                                        http://127.0.0.1:8000 (RINGLEADER_HOST, RINGLEADER_PORT)
#   ./launch.sh serve [ARGS...]          the OpenAI-compatible server: ./launch.sh serve --help
#   ./launch.sh generate [ARGS...]       the generation CLI: ./launch.sh generate --help
#   ./launch.sh witness [ARGS...]        a cluster member with no model: ./launch.sh witness --help
#   ./launch.sh demo [PATH]              build the demo checkpoint, print its directory
#   ./launch.sh info [--model DIR]       this host's CPUs, memory and GPUs (NVML) as JSON, or what a
#                                        checkpoint directory holds
#   ./launch.sh plan [ARGS...]           the deployment planner: ./launch.sh plan --help
#   ./launch.sh members CMD URL [...]    a running cluster's membership: show, leave, remove
#
# The first run creates .venv with the CPU build of torch (see scripts/env.sh); set
# RINGLEADER_PYTHON to run with an interpreter of your own, e.g. one with a CUDA torch.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
ringleader_env ""

if [ $# -eq 0 ]; then
    exec "$PY" -m server
fi
cmd=$1
shift
case "$cmd" in
    generate | demo | info)
        exec "$PY" -m engine.cli "$cmd" "$@"
        ;;
    serve)
        exec "$PY" -m server "$@"
        ;;
    witness)
        exec "$PY" -m server.witness "$@"
        ;;
    plan)
        exec "$PY" -m engine.planner "$@"
        ;;
    members)
        exec "$PY" -m server.members "$@"
        ;;
    -h | --help | help)
        sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
        ;;
    *)
        echo "launch.sh: error: unknown command '$cmd' (expected: serve, generate, witness, plan, members, demo, info)" >&2
        exit 2
        ;;
esac
