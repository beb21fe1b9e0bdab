#!/usr/bin/env bash
# GPU machine: correctness first (a short test; a hang or a failure stops here), then the full
# kernel tests and the kernel benchmark for each Hopper variant named in $VARIANTS
# ("ws0 ws1 ... old": FLASH_ORT_WS_CFG=N, or old = FLASH_ORT_SM90_WS=0), results under $OUT.
# The tile variants (FLASH_ORT_WS_CFG 1-5, flash_fwd_launch.cuh) exist only in a build with
# FLASH_ORT_NVCC_FLAGS=-DFLASH_ORT_TILE_EXPERIMENT; ws0 is the shipped dispatch.
#   bash scripts/ws_ab.sh [DIR]    DIR holds the staged cuda_attention and cuda_bench
set -uo pipefail
dir=${1:-.device-cuda}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export FLASH_ORT_CUDA_CASES=${FLASH_ORT_CUDA_CASES:-40}
echo "== smoke (features, default variant)"
if ! timeout 90 "$dir/cuda_attention" cuda_features_one_by_one --test-threads 1 >"$out/smoke.log" 2>&1; then
  tail -30 "$out/smoke.log"; exit 1
fi
tail -3 "$out/smoke.log"
for v in ${VARIANTS:-ws0 old}; do
  if [[ $v == old ]]; then envs=(FLASH_ORT_SM90_WS=0); else envs=(FLASH_ORT_WS_CFG=${v#ws}); fi
  if [[ ${TESTS:-1} == 1 ]]; then
    echo "== tests $v"
    env "${envs[@]}" timeout 200 "$dir/cuda_attention" --test-threads 1 >"$out/tests_$v.log" 2>&1
    grep -E "test result|FAILED|panicked" "$out/tests_$v.log" | head -5
  fi
  echo "== bench $v"
  env "${envs[@]}" timeout 120 "$dir/cuda_bench" >"$out/bench_$v.jsonl" 2>&1
  python3 - "$out/bench_$v.jsonl" <<'PY'
import json, sys
rows = []
for l in open(sys.argv[1]):
    try: r = json.loads(l)
    except Exception: continue
    if r.get("kind") == "grid":
        rows.append(f'{r["dtype"][:4]} d{r["d"]} {"c" if r["causal"] else "n"} {r["n"]}: {r["ours"]:.0f}' )
print(" | ".join(rows))
PY
done
