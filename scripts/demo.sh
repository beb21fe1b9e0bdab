#!/usr/bin/env bash
# The main job on a bundled small model: set up (project-local venv with onnxruntime), build,
# fuse every attention site of a tiny BERT export into com.flash.FlashAttention, and verify the
# fused model against the original in ONNX Runtime.   Usage: bash scripts/demo.sh [MODEL.onnx]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/bert_sdpa_dyn18.onnx}
eval "$(bash scripts/setup.sh)"   # exports ORT_DYLIB_PATH (the runtime `verify` loads)
cargo build --release --quiet
out=target/demo/$(basename "${model%.onnx}").fused.onnx
mkdir -p target/demo
echo "== flash-ort inspect $model"
target/release/flash-ort inspect "$model"
echo
echo "== flash-ort fuse $model -o $out --verify"
target/release/flash-ort fuse "$model" -o "$out" --verify
echo
echo "Load $out in ORT after registering target/release/libflash_ort.so (see README)."
