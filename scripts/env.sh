# shellcheck shell=bash
# Sourced by launch.sh and scripts/test.sh: sets PY to the Python interpreter that runs ringleader.
#
# RINGLEADER_PYTHON=/path/to/python  use that interpreter as it is (for example one whose torch is
#                                    a CUDA build); nothing is installed.
# Otherwise the repository's .venv is created on first use with
#   RINGLEADER_TORCH_SPEC (default torch==2.13.0, the CPU build), installed before anything else so
#   that no dependency pulls an unpinned CUDA torch, then the project itself (editable) with the
#   extras named by the caller. A stamp file skips the installation when nothing changed.

ringleader_env() {
    local extras=${1:-}
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    # the checkout's packages come first, installed or not (RINGLEADER_PYTHON installs nothing)
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    if [ -n "${RINGLEADER_PYTHON:-}" ]; then
        PY=$RINGLEADER_PYTHON
        return
    fi
    local venv torch_spec stamp
    venv=${RINGLEADER_VENV:-$root/.venv}
    torch_spec=${RINGLEADER_TORCH_SPEC:-torch==2.13.0}
    stamp="$venv/.ringleader-${extras:-base}-$(cksum < "$root/pyproject.toml" | cut -d' ' -f1)"
    PY=$venv/bin/python
    [ -f "$stamp" ] && return
    local base_python=${RINGLEADER_BASE_PYTHON:-python3}
    if ! "$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "ringleader: error: $base_python is missing or older than Python 3.10" >&2
        return 1
    fi
    echo "ringleader: setting up $venv (first run only) ..." >&2
    [ -x "$PY" ] || "$base_python" -m venv "$venv"
    if ! "$PY" -c 'import torch' 2>/dev/null; then
        "$PY" -m pip install -q --disable-pip-version-check "$torch_spec"
    fi
    "$PY" -m pip install -q --disable-pip-version-check -e "$root${extras:+[$extras]}"
    touch "$stamp"
}
