#!/usr/bin/env bash
# Issue 5's two-GPU item alone, on a machine with two GPUs (device kind nvidia-h200-x2): export
# BERT-base (TorchScript, eager, float16) and a tiny LLaMA-style GQA decoder (dynamo 18, sdpa,
# float16), fuse both with flash-ort, and run tests/e2e/reliability.py's `two_gpu` check on each:
# two sessions in one process, on device 0 and device 1, each with the single-GPU output, alone
# and running at the same time. About 2 minutes; everything is bounded by `timeout` to stay under 4.
#
#   bash scripts/two_gpu.sh                      results: $OUT/two_gpu.json, $OUT/two_gpu.log
#   bash scripts/two_gpu.sh --provider cpu       a rehearsal on any machine (tiny float32 exports;
#                                                the check finds no second GPU and says so)
#
# Needs: onnxruntime-gpu importable, or its parts stashed in /tmp/ort-gpu-parts by
# unpack-ort-gpu.sh (this script unpacks them); the CUDA build of libflash_ort.so and flash-ort in
# .device-e2e/ (or .device-lead/bundle.tar.xz, unpacked here; or FLASH_ORT_LIB/FLASH_ORT_BIN).
# No NCCL is used: the machine's NCCL/NVSHMEM variables are left as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-/tmp/two-gpu-out}
work=/tmp/two-gpu
provider=cuda
[[ ${1:-} == --provider ]] && provider=${2:?--provider cuda|cpu}
mkdir -p "$out" "$work"
exec > >(tee -a "$out/two_gpu.log") 2>&1
start=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [[ ! -e .device-e2e/libflash_ort.so && -e .device-lead/bundle.tar.xz ]]; then
  tar xJf .device-lead/bundle.tar.xz
fi
staged() { [[ -e .device-e2e/$1 ]] && echo ".device-e2e/$1" || echo "target/release/$1"; }
bin=$(realpath "${FLASH_ORT_BIN:-$(staged flash-ort)}")
lib=$(realpath "${FLASH_ORT_LIB:-$(staged libflash_ort.so)}")
for f in "$bin" "$lib"; do [[ -e $f ]] || { echo "missing $f" >&2; exit 2; }; done

dtype=float16; tiny_bert=""
if [[ $provider == cuda ]]; then
  if ! $PY -c 'import onnxruntime as o; o.preload_dlls(); assert "CUDAExecutionProvider" in o.get_available_providers()' 2>/dev/null; then
    if [[ ! -d /tmp/ort-gpu/onnxruntime ]] && ls /tmp/ort-gpu-parts/ort.part* >/dev/null 2>&1; then
      mkdir -p /tmp/ort-gpu && cat /tmp/ort-gpu-parts/ort.part* | xz -d | tar -x -C /tmp/ort-gpu
    fi
    [[ -d /tmp/ort-gpu/onnxruntime ]] && export PYTHONPATH=/tmp/ort-gpu${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -c 'import onnxruntime as o; o.preload_dlls(); assert "CUDAExecutionProvider" in o.get_available_providers()' \
    || { echo "onnxruntime-gpu is not importable with CUDA: stash its parts first" >&2; exit 2; }
  nvidia-smi -L
else
  dtype=float32; tiny_bert=--tiny  # export_large.py traces float16 on the GPU only
fi
$PY -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.__file__)'

# Both exports at once (BERT-base ~1 min on a GPU machine, the tiny decoder seconds).
$PY models/export_large.py --out "$work/bert_base" --models bert_base --variants ts17:eager --dtype $dtype $tiny_bert \
  >"$work/export_bert.log" 2>&1 &
pid_bert=$!
$PY models/export_large.py --out "$work/llama" --models llama_gqa_2k --variants dyn18:sdpa --dtype $dtype --tiny \
  >"$work/export_llama.log" 2>&1 &
pid_llama=$!
rc=0
check() {  # NAME MANIFEST_DIR
  local name=$1 dir=$2 src fused
  src=$(ls "$dir"/*.onnx 2>/dev/null | grep -v '\.flash\.onnx$' | head -1)
  [[ -n $src ]] || { echo "$name: no export (log: $work/export_$name.log)"; tail -5 "$work/export_$name.log"; rc=1; return; }
  fused=${src%.onnx}.flash.onnx
  timeout 120 "$bin" fuse "$src" -o "$fused" | tail -2 || { echo "$name: fuse failed"; rc=1; return; }
  timeout 90 $PY tests/e2e/reliability.py --model "$fused" --label "${name}_flash_two_gpu" --provider "$provider" \
    --library "$lib" --checks two_gpu --thread-runs 5 --out "$out/two_gpu.json" || rc=1
}
timeout 150 tail --pid=$pid_llama -f /dev/null; check llama "$work/llama"
timeout $((200 - (SECONDS - start))) tail --pid=$pid_bert -f /dev/null; check bert "$work/bert_base"
[[ -s $out/two_gpu.json ]] && $PY - "$out/two_gpu.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    c = r["checks"].get("two_gpu")
    if c is None:
        print(f"{r['model']}: two_gpu not run ({r['provider']})")
    elif not c.get("ran", True):
        print(f"{r['model']}: two_gpu SKIPPED: {c['skipped']}")
    else:
        print(f"{r['model']}: two_gpu {'PASS' if c['ok'] else 'FAIL: ' + str(c.get('reason') or c.get('error'))}",
              {k: c.get(k) for k in ("device1_equals_device0", "concurrent_identical", "max_abs_diff_device1_vs_device0", "memory_mib")})
EOF
echo "done in $((SECONDS - start)) s (exit $rc)"
exit $rc
