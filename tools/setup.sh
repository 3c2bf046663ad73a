#!/usr/bin/env bash
# Set up a fresh machine for msjax: a Python 3.12 virtual environment in .venv with msjax installed (editable)
# and its test dependencies. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # .python-version makes pyenv's python3 the 3.12.1 the project pins
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  echo "msjax needs Python >= 3.12; $PYTHON is $("$PYTHON" --version 2>&1). Install 3.12 (pyenv install 3.12.1)." >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
