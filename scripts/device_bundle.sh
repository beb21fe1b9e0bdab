#!/usr/bin/env bash
# Builds the CUDA feature here and packs what the GPU machine runs (it has no cargo):
#   .device-lead/cuda.tar.xz   .device-cuda/: the GPU kernel test and bench binaries + their scripts
#                              (run there: bash .device-cuda/cuda_device_run.sh .device-cuda)
#   .device-lead/bundle.tar.xz .device-e2e/: libflash_ort.so, flash-ort (CUDA builds) and the
#                              onnxconverter-common wheel; .whl/: pytest for the GPU machine's tests
# Both are git-ignored; name them in the device tool's `carry` and untar them in each call.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup_cuda_toolchain.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release --features cuda
tests=$(cargo test --release --features cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("cuda_attention",):
        print(m["executable"])')
bench=$(cargo bench --features cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_bench":
        print(m["executable"])')
rm -rf .device-cuda && mkdir -p .device-cuda .device-e2e .device-lead
cp "$tests" .device-cuda/cuda_attention
cp "$bench" .device-cuda/cuda_bench
cp scripts/cuda_device_run.sh scripts/cuda_bench_table.py scripts/cuda_peers_torch.py scripts/grid_ab.sh scripts/decode_ab.sh scripts/mask_ab.sh .device-cuda/
cp "$CARGO_TARGET_DIR/release/libflash_ort.so" "$CARGO_TARGET_DIR/release/flash-ort" .device-e2e/
strip .device-cuda/cuda_attention .device-cuda/cuda_bench .device-e2e/libflash_ort.so .device-e2e/flash-ort
tar cJf .device-lead/cuda.tar.xz .device-cuda
tar cJf .device-lead/bundle.tar.xz .device-e2e .whl
ls -la .device-lead
