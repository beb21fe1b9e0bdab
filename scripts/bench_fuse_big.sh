#!/usr/bin/env bash
# Times `flash-ort fuse` on synthetic 200-layer encoders whose weights are external data, at two
# weight sizes (0.16 GB and 2.5 GB), and prints wall time and peak RSS of each: the time must stay
# under 2 s and the peak memory must not grow with the weights (they are never read).
# Usage: bash scripts/bench_fuse_big.sh [WORK_DIR]   (needs .venv with onnx; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
cargo build --release --bin flash-ort >/dev/null
bin=target/release/flash-ort
for cfg in "small 128 2" "big 512 8"; do
  set -- $cfg
  dir="$work/$1"
  .venv/bin/python scripts/synth_big_model.py "$dir" --layers 200 --hidden "$2" --heads "$3"
  for run in 1 2 3; do
    /usr/bin/time -f "$1 run $run: wall %e s, peak RSS %M KB" "$bin" fuse "$dir/model.onnx" -o "$dir/fused.onnx" \
      --report "$dir/report.json" 2>&1 >/dev/null | tail -1
  done
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'  fused {r[\"fused\"]}, skipped {r[\"skipped\"]}')" "$dir/report.json"
  ls -l "$dir/model.onnx" "$dir/fused.onnx" "$dir/weights.bin" | awk '{print "  " $5 " bytes  " $9}'
done
