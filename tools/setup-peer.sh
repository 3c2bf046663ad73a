#!/usr/bin/env bash
# The peer's environment for side-by-side benchmarks: a Python 3.11 venv in .venv-peer with torch (CPU) and
# HF transformers, the stack a user would run instead of msjax. Never a dependency of msjax: only bench/ scripts
# start it, in a subprocess (bench/peer_hf.py). torch CPU wheels exist here for Python 3.11 only. Safe to run
# again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.13.0}
TRANSFORMERS=${TRANSFORMERS:-5.25.0}
if [ -z "${PYTHON:-}" ]; then
  # pyenv: the repo's .python-version pins 3.12 for the project; ask for a 3.11 explicitly
  if command -v pyenv >/dev/null && v=$(pyenv versions --bare | grep -E '^3\.11(\.|$)' | tail -1) && [ -n "$v" ]; then
    PYTHON="$(pyenv root)/versions/$v/bin/python3.11"
  else
    PYTHON=python3.11
  fi
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "tools/setup-peer.sh: needs Python 3.11 (torch CPU wheels); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv-peer/bin/python ] || "$PYTHON" -m venv .venv-peer
# torch pinned exactly: on this project's machines a CPU build of that version lies on disk for pip, while a
# range would take PyPI's CUDA build (several GB)
.venv-peer/bin/python -m pip install -q --disable-pip-version-check "torch==$TORCH" "transformers==$TRANSFORMERS" \
  safetensors
.venv-peer/bin/python -c 'import torch, transformers; print(f"peer venv: torch {torch.__version__}, transformers {transformers.__version__}")'
