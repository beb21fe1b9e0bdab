#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with the binaries staged in $1 (default
# .device-cuda/): GPU tests, compute-sanitizer on a small subset, then ours + PyTorch peers
# benchmark, writing logs and the merged table under $OUT.
set -uo pipefail
dir="${1:-.device-cuda}"
out="${OUT:-bench/out/cuda_device}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  echo "== tests"; timeout 300 "$dir/cuda_attention" --test-threads 1 2>&1 | tee "$out/tests.log" | tail -25
fi
if [ "${SKIP_SANITIZER:-0}" != "1" ]; then
  echo "== memcheck"
  FLASH_ORT_CUDA_CASES=12 timeout 200 compute-sanitizer --tool memcheck --print-limit 10 "$dir/cuda_attention" cuda_random_cases cuda_features --test-threads 1 2>&1 | tail -8 | tee "$out/memcheck.log"
  echo "== racecheck"
  FLASH_ORT_CUDA_CASES=4 timeout 150 compute-sanitizer --tool racecheck --print-limit 10 "$dir/cuda_attention" cuda_random_cases --test-threads 1 2>&1 | tail -8 | tee "$out/racecheck.log"
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  echo "== bench"
  "$dir/cuda_bench" 2>&1 | tee "$out/ours.jsonl"
  PYTHONUNBUFFERED=1 python3 "$dir/cuda_peers_torch.py" 2>&1 | tee "$out/peers.jsonl"
  python3 "$dir/cuda_bench_table.py" "$out/ours.jsonl" "$out/peers.jsonl" | tee "$out/table.md"
fi
