#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating it first if
# it is missing or older than pyproject.toml:
#     scripts/with_env.sh python scripts/run_async.py --parts 3
#     scripts/with_env.sh pytest
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RAYLOCAL_VENV:-.venv}"
STAMP="$VENV/.raylocal-installed"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "setting up $VENV (first run only) ..." >&2
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    touch "$STAMP"
fi
export PATH="$PWD/$VENV/bin:$PATH"
exec "$@"
