#!/usr/bin/env bash
# Sets up what the tests and examples need, project-locally and idempotently:
#   .venv/            Python venv with onnxruntime (newest supported host), onnx, numpy, pytest,
#                     sympy (ORT's transformer optimizer, which tests/e2e compares against)
#   .venv-ort120/     onnxruntime 1.20.1, the oldest host we support, for the loading test
# Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
ORT_VERSION=${FLASH_ORT_ORT_VERSION:-1.31.1}
OLD_ORT_VERSION=1.20.1

if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import onnxruntime, onnx, numpy, pytest, ml_dtypes, sympy; assert onnxruntime.__version__ == '$ORT_VERSION'" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "onnxruntime==$ORT_VERSION" "onnx>=1.17" numpy pytest ml_dtypes sympy
fi
if [[ ! -d .venv-ort120/onnxruntime ]]; then
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --target .venv-ort120 "onnxruntime==$OLD_ORT_VERSION"
fi

# The shared library the Rust `ort` crate loads (load-dynamic).
ORT_LIB=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)
echo "export ORT_DYLIB_PATH=$PWD/$ORT_LIB"
