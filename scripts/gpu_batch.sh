#!/usr/bin/env bash
# One GPU machine call that checks and measures the operator inside onnxruntime-gpu's CUDA EP:
# the GPU tests of the op in ORT (tests/gpu), the side-by-side attention benchmark
# (bench/gpu_ort_bench.py: the op in ORT vs ORT MultiHeadAttention vs torch SDPA flash/cuDNN)
# and, with the time left, the end-to-end model batch (scripts/e2e_gpu.sh, MiniLM skipped).
# Expects onnxruntime-gpu unpacked (eval "$(bash .carry-ort/unpack-ort-gpu.sh unpack)") and
# .device-lead/bundle.tar.xz (the CUDA build of libflash_ort.so, flash-ort, wheels) carried.
#   bash scripts/gpu_batch.sh [TOTAL_SECONDS]      results: $OUT/results.tgz and key files
# E2E_SKIP names the end-to-end stages to leave out (default: minilm, whose weights travel apart).
set -uo pipefail
cd "$(dirname "$0")/.."
total=${1:-540}
start=$SECONDS
out=${OUT:-/tmp/gpu-batch-out}
res=/tmp/gpu-batch
mkdir -p "$out" "$res"
tar xJf .device-lead/bundle.tar.xz
python3 -c 'import pytest' 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}; }
export FLASH_ORT_LIB=$PWD/.device-e2e/libflash_ort.so FLASH_ORT_BIN=$PWD/.device-e2e/flash-ort PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import onnxruntime as o, torch; print("ort", o.__version__, "torch", torch.__version__)'; } >"$res/env.txt" 2>&1
if [[ -x .device-e2e/cuda_attention ]]; then
  echo "== kernel tests (tests/cuda_attention.rs) against the fp64 reference"
  timeout 150 .device-e2e/cuda_attention >"$res/cuda_kernel_tests.log" 2>&1
  tail -n 5 "$res/cuda_kernel_tests.log"
fi
echo "== GPU tests of the op in ORT's CUDA EP"
# The machine's own pytest (its plugins need it); timeouts come from `timeout`.
timeout 180 python3 -m pytest -q -p no:cacheprovider -p no:timeout tests/gpu/test_op_cuda_ort.py >"$res/gpu_tests.log" 2>&1
tail -n 15 "$res/gpu_tests.log"
echo "== attention benchmark (op in ORT vs peers), $((SECONDS - start)) s in"
timeout 200 python3 bench/gpu_ort_bench.py "$res/gpu_ort_bench.json" >"$res/gpu_ort_bench.log" 2>&1
cat "$res/gpu_ort_bench.log"
left=$((total - (SECONDS - start) - 25))
if ((left > 90)); then
  echo "== end-to-end models, budget ${left} s"
  bash scripts/e2e_gpu.sh run --out "$res/e2e" --skip "${E2E_SKIP:-minilm}" --budget-s "$left" >"$res/e2e.log" 2>&1
  tail -n 40 "$res/e2e.log"
fi
cp "$res/gpu_ort_bench.json" "$res/gpu_tests.log" "$res/env.txt" "$out/" 2>/dev/null
tar czf "$out/results.tgz" -C "$res" .
echo "done in $((SECONDS - start)) s"
