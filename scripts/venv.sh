# Sourced by demo.sh and test.sh: make sure .venv exists (with pip) in the repository root.
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore

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
