#!/usr/bin/env bash
# Regenerate the Python gRPC stubs of serving/proto/msjax/v1/*.proto (needs grpcio-tools, in the dev extra).
# The stubs are committed; tests/test_serving_proto.py checks that this script reproduces them.
# Usage: bash tools/gen_proto.sh [OUT_DIR]   (default: the source tree)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
OUT="${1:-serving/proto}"
mkdir -p "$OUT/msjax/v1"
"$PYTHON" -m grpc_tools.protoc -I serving/proto --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  serving/proto/msjax/v1/decode.proto
# protoc writes `from msjax.v1 import ...`, which would resolve to the msjax package: point it at serving.proto.
sed -i 's/^from msjax\.v1 import /from serving.proto.msjax.v1 import /' "$OUT/msjax/v1/decode_pb2_grpc.py"
