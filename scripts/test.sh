#!/usr/bin/env bash
# Set up a local virtualenv with the test extras, lint, and run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k noise tests/unit
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

. scripts/venv.sh
export QT_QPA_PLATFORM=offscreen  # Qt tests never need a display
export PYTHONUNBUFFERED=1

.venv/bin/pip install -q -e '.[test]'

echo "== ruff check"
.venv/bin/ruff check .

echo "== pytest"
exec .venv/bin/python -m pytest -q "$@"
