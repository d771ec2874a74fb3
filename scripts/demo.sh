#!/usr/bin/env bash
# Set up a local virtualenv (first run only) and run `shallot demo`:
# six relays (two of them exits) on 127.0.0.1, one circuit, datagrams through it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

. scripts/venv.sh

.venv/bin/pip install -q -e .

exec .venv/bin/shallot demo "$@"
