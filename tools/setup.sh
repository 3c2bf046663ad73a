#!/usr/bin/env bash
# Set up a fresh machine for msjax: a Python 3.12 virtual environment in .venv with msjax installed (editable,
# which builds the native M2N library in ffi/ with CMake) and its test dependencies. Safe to run again: it only
# installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # .python-version makes pyenv's python3 the 3.12.1 the project pins
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  echo "msjax needs Python >= 3.12; $PYTHON is $("$PYTHON" --version 2>&1). Install 3.12 (pyenv install 3.12.1)." >&2
  exit 1
fi

# System packages the native build needs: a C++17 compiler, CMake >= 3.22, libibverbs headers (the RDMA verbs
# transport is compiled everywhere, run only where a device exists). Installed only when missing.
missing=()
command -v g++ >/dev/null || missing+=(g++)
command -v cmake >/dev/null || missing+=(cmake)
[ -e /usr/include/infiniband/verbs.h ] || missing+=(libibverbs-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "tools/setup.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
    echo "tools/setup.sh: installing ${missing[*]} (sudo)" >&2
    sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "tools/setup.sh: please install ${missing[*]} (Debian/Ubuntu package names); continuing without" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
