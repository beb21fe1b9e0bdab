#!/usr/bin/env bash
# GPU machine: the kernel tests (as shipped, and again with $TEST_ENV, e.g. every call on the
# persistent kernel), memcheck of $SANITIZE_TESTS, then an interleaved A/B of grid benchmark
# variants (env switches) without and with a zero key-padding mask, and PyTorch's FlashAttention-2
# and cuDNN on the same grid. Logs and the TFLOP/s table go under $OUT.
#   bash scripts/grid_ab.sh [DIR]    DIR holds the staged cuda_attention, cuda_bench, scripts
# VARIANTS="name:ENV=V,ENV=V ..." (first = the reference column; BIN_DIR=DIR runs DIR's
# cuda_bench instead, for an A/B of two builds); SEQS (FLASH_ORT_BENCH_SEQS);
# ROUNDS; MASK_VARIANTS (names of the variants also run with the mask).
set -uo pipefail
dir=${1:-.device-cuda}
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
if [[ ${TESTS:-1} == 1 ]]; then
  echo "== tests"
  timeout 300 "$dir/cuda_attention" --test-threads 1 >"$out/tests.log" 2>&1
  grep -E "^test |test result|panicked" "$out/tests.log" | head -20
  if [[ -n ${TEST_ENV:-} ]]; then
    echo "== tests with $TEST_ENV"
    env $TEST_ENV timeout 300 "$dir/cuda_attention" --test-threads 1 >"$out/tests_env.log" 2>&1
    grep -E "^test |test result|panicked" "$out/tests_env.log" | head -20
  fi
  if [[ -n ${SANITIZE_TESTS:-} ]]; then
    echo "== memcheck $SANITIZE_TESTS"
    env ${TEST_ENV:-} timeout 240 compute-sanitizer --tool memcheck --print-limit 10 "$dir/cuda_attention" $SANITIZE_TESTS --test-threads 1 2>&1 | tail -6 | tee "$out/memcheck.log"
    echo "== racecheck $SANITIZE_TESTS"
    env ${TEST_ENV:-} timeout 240 compute-sanitizer --tool racecheck --print-limit 10 "$dir/cuda_attention" $SANITIZE_TESTS --test-threads 1 2>&1 | tail -6 | tee "$out/racecheck.log"
  fi
fi
variants=${VARIANTS:-"default: off:FLASH_ORT_PERSISTENT=0"}
mask_variants=${MASK_VARIANTS:-"default off"}
export FLASH_ORT_BENCH=grid FLASH_ORT_BENCH_DTYPE=${DTYPE:-float16} FLASH_ORT_BENCH_SEQS=${SEQS:-1024,2048,4096,16384}
for round in $(seq 1 "${ROUNDS:-2}"); do
  for v in $variants; do
    name=${v%%:*}; IFS=, read -ra envs <<<"${v#*:}"
    # BIN_DIR=path among a variant's settings: that staged build's cuda_bench (A/B of two builds).
    bin=$dir/cuda_bench
    for e in "${envs[@]}"; do [[ $e == BIN_DIR=* ]] && bin=${e#BIN_DIR=}/cuda_bench; done
    env "${envs[@]}" timeout 150 "$bin" >>"$out/ours_$name.jsonl" 2>&1
    if [[ " $mask_variants " == *" $name "* ]]; then
      env "${envs[@]}" FLASH_ORT_BENCH_MASK=1 timeout 150 "$bin" >>"$out/ours_${name}+mask.jsonl" 2>&1
    fi
  done
done
if [[ ${PEERS_RUN:-1} == 1 ]]; then
  PEERS=grid SEQS=$FLASH_ORT_BENCH_SEQS PEER_DTYPES=$FLASH_ORT_BENCH_DTYPE timeout 240 python3 "$dir/cuda_peers_torch.py" >"$out/peers.jsonl" 2>&1
fi
python3 - "$out" "$variants" <<'PY'
import collections, glob, json, os, sys
out, variants = sys.argv[1], sys.argv[2].split()
order = [v.split(":")[0] for v in variants]
names = [n for n in order] + [n + "+mask" for n in order if os.path.exists(f"{out}/ours_{n}+mask.jsonl")]
def rows(path):
    r = []
    if os.path.exists(path):
        for l in open(path):
            try: r.append(json.loads(l))
            except Exception: pass
    return r
best = collections.defaultdict(dict)
for n in names:
    for r in rows(f"{out}/ours_{n}.jsonl"):
        if r.get("kind") == "grid":
            k = (r["dtype"], r["d"], r["causal"], r["n"])
            best[k][n] = max(best[k].get(n, 0), r["ours"])
peers = {}
for r in rows(f"{out}/peers.jsonl"):
    if r.get("kind") == "grid":
        peers[(r["dtype"], r["d"], r["causal"], r["n"])] = r
ref = order[0]
print("TFLOP/s (best of rounds); ratios: variant / " + ref + ", and " + ref + " / FA2, / cuDNN")
print("| dtype | D | causal | S | " + " | ".join(names) + " | FA2 | cuDNN | " + " | ".join(n + " / " + ref for n in names[1:]) + f" | {ref} / FA2 | {ref} / cuDNN |")
print("|---|---|---|---|" + "---|" * (2 * len(names) + 3))
for k in sorted(best):
    b, p = best[k], peers.get(k, {})
    r0 = b.get(ref, 0)
    fa, cu = p.get("flash"), p.get("cudnn")
    rat = lambda x, y: f"{x / y:.2f}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x and y else "-"
    print(f"| {k[0]} | {k[1]} | {'yes' if k[2] else 'no'} | {k[3]} | " + " | ".join(f"{b.get(n, 0):.1f}" for n in names)
          + f" | {fa} | {cu} | " + " | ".join(rat(b.get(n, 0), r0) for n in names[1:]) + f" | {rat(r0, fa)} | {rat(r0, cu)} |")
PY
