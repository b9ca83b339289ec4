#!/usr/bin/env bash
# Create .venv/ and install the project into it. Idempotent: a second run only checks.
#
# torch: a torch that is already importable (in .venv, or system-wide) is kept. Otherwise
# torch==2.13.0 is installed, which on the machines this project is built on is a CPU wheel
# on local disk; asking pip for plain `torch` could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
stamp=.venv/.installed

# xdist too: `make test` runs pytest -n auto, and a .venv from before it was a dev dependency
# lacks it
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] \
        && .venv/bin/python -c "import vqvae, xdist" 2>/dev/null; then
    exit 0
fi

if [ ! -x .venv/bin/python ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        # Reuse the machine's torch (and its CUDA build, if any) instead of installing another.
        "$PYTHON" -m venv --system-site-packages .venv
    else
        "$PYTHON" -m venv .venv
    fi
fi

# pip warns about every empty local index folder on these machines; keep the rest of stderr.
pip() {
    .venv/bin/python -m pip --disable-pip-version-check -q "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "Installing torch==2.13.0 into .venv ..."
    pip install "torch==2.13.0"
fi
echo "Installing vqvae and its dependencies into .venv ..."
pip install -e ".[dev]"
touch "$stamp"
