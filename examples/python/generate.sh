#!/usr/bin/env bash
# Generates the Python stubs of drvthru.v1 from proto/ into DIR (default:
# examples/python/gen, which git ignores). grpc_tools brings the
# google/protobuf/*.proto files the contract imports.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/gen}
proto=$here/../../proto
mkdir -p "$out"
cd "$proto"
python3 -m grpc_tools.protoc -I . --python_out="$out" --grpc_python_out="$out" drvthru/v1/*.proto
