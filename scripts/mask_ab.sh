#!/usr/bin/env bash
# GPU machine: the kernel tests, then the grid benchmark (fp16) without a mask and with a float
# key-padding mask [B, 1, 1, S] (FLASH_ORT_BENCH_MASK=1), staged by the mask warp (default) or by
# the copy warp (FLASH_ORT_MASK_WARP=0), interleaved over two rounds. TFLOP/s table under $OUT.
#   bash scripts/mask_ab.sh [DIR]    DIR holds the staged cuda_attention and cuda_bench
set -uo pipefail
dir=${1:-.device-cuda}
out=${OUT:-/tmp/out}
mkdir -p "$out"
if [[ ${TESTS:-1} == 1 ]]; then
  timeout 240 "$dir/cuda_attention" --test-threads 1 >"$out/tests.log" 2>&1
  grep -E "test result|FAILED|panicked" "$out/tests.log" | head -5
fi
export FLASH_ORT_BENCH=grid FLASH_ORT_BENCH_DTYPE=float16
for round in 1 2; do
  timeout 120 "$dir/cuda_bench" >>"$out/nomask.jsonl" 2>&1
  FLASH_ORT_BENCH_MASK=1 timeout 120 "$dir/cuda_bench" >>"$out/mask.jsonl" 2>&1
  FLASH_ORT_BENCH_MASK=1 FLASH_ORT_MASK_WARP=0 timeout 120 "$dir/cuda_bench" >>"$out/mask_copywarp.jsonl" 2>&1
done
python3 - "$out" <<'PY'
import json, sys, collections
out = sys.argv[1]
def best(name):
    d = collections.defaultdict(float)
    for l in open(f"{out}/{name}.jsonl"):
        try: r = json.loads(l)
        except Exception: continue
        if r.get("kind") == "grid":
            k = (r["d"], r["causal"], r["n"]); d[k] = max(d[k], r["ours"])
    return d
a, b, c = best("nomask"), best("mask"), best("mask_copywarp")
print("TFLOP/s, fp16, best of 2 rounds")
print("| D | causal | S | no mask | mask (mask warp) | mask (copy warp) | mask warp / no mask | copy warp / no mask |")
print("|---|---|---|---|---|---|---|---|")
for k in sorted(a):
    print(f"| {k[0]} | {'yes' if k[1] else 'no'} | {k[2]} | {a[k]:.1f} | {b.get(k, 0):.1f} | {c.get(k, 0):.1f} | {b.get(k, 0) / a[k]:.2f} | {c.get(k, 0) / a[k]:.2f} |")
PY
