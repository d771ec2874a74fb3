#!/usr/bin/env bash
# Set up a local virtualenv with the test extras, lint, and run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k noise tests/unit
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore
export QT_QPA_PLATFORM=offscreen
export PYTHONUNBUFFERED=1

if ! command -v python3 >/dev/null 2>&1; then
    echo "python3 not found; install it first: sudo apt-get install -y python3 python3-venv" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/pip ]; then
    if ! venv_err=$(python3 -m venv .venv 2>&1); then
        rm -rf .venv
        echo "$venv_err" | tail -n 3 >&2
        echo "python3 -m venv failed; install venv support: sudo apt-get install -y python3-venv" >&2
        exit 1
    fi
fi

.venv/bin/pip install -q -e '.[test]'

echo "== ruff check"
.venv/bin/ruff check .

echo "== pytest"
exec .venv/bin/python -m pytest -q "$@"
