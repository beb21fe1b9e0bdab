#!/usr/bin/env bash
# The project's test command: sets itself up (scripts/setup.sh), builds the operator library,
# then runs the Rust tests (unit, property, ORT integration) and the Python tests of the
# operator inside ONNX Runtime.   Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup.sh)"   # exports ORT_DYLIB_PATH
# Tests run optimized: the property tests execute many attention problems.
cargo build --release --all-targets
# Reused kernel scratch is filled with NaN, so a read of an element no kernel wrote fails a test.
export FLASH_ORT_POISON_SCRATCH=1
cargo test --release
FLASH_ORT_LIB="$PWD/target/release/libflash_ort.so" FLASH_ORT_BIN="$PWD/target/release/flash-ort" \
  .venv/bin/python -m pytest -q tests/python tests/e2e
