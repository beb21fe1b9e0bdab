#!/usr/bin/env bash
# GPU machine: decode correctness, then an interleaved A/B of decode benchmark variants (env
# switches, see $VARIANTS) with PyTorch's FlashAttention-2 and cuDNN decode in the same run.
# Logs and the table go under $OUT.
#   bash scripts/decode_ab.sh [DIR]    DIR holds the staged cuda_attention, cuda_bench, scripts
set -uo pipefail
dir=${1:-.device-cuda}
out=${OUT:-bench/out/decode_ab}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
echo "== decode tests"
timeout 240 "$dir/cuda_attention" cuda_decode_shapes cuda_features --test-threads 1 >"$out/decode_tests.log" 2>&1
grep -E "^test |test result|panicked" "$out/decode_tests.log" | head -20
# Variants: "name:ENV=V,ENV=V" (e.g. FLASH_ORT_TMA_L2=0|1: TMA L2 promotion); $VARIANTS overrides.
variants=${VARIANTS:-"default: l2promote:FLASH_ORT_TMA_L2=1"}
for round in 1 2; do
  for v in $variants; do
    name=${v%%:*}; IFS=, read -ra envs <<<"${v#*:}"
    env "${envs[@]}" FLASH_ORT_BENCH=decode timeout 120 "$dir/cuda_bench" >>"$out/ours_$name.jsonl" 2>&1
  done
done
PEERS=decode timeout 200 python3 scripts/cuda_peers_torch.py >"$out/peers.jsonl" 2>&1
python3 - "$out" <<'PY'
import json, sys, collections
out = sys.argv[1]
def rows(path):
    r = []
    for l in open(path):
        try: r.append(json.loads(l))
        except Exception: pass
    return r
import glob, os
names = sorted(os.path.basename(f)[5:-6] for f in glob.glob(f"{out}/ours_*.jsonl"))
best = collections.defaultdict(dict)
for n in names:
    for r in rows(f"{out}/ours_{n}.jsonl"):
        if r.get("kind") == "decode":
            key = (r["dtype"], r["B"], r["Skv"])
            best[key][n] = max(best[key].get(n, 0), r["ours"])
            best[key]["slots_" + n] = r["splits"]
peers = {(r["dtype"], r["B"], r["Skv"]): r for r in rows(f"{out}/peers.jsonl") if r.get("kind") == "decode"}
print("GB/s of K/V read (best of rounds; slots = accumulator slots per row); ratio = / FlashAttention-2")
print("| dtype | B | Skv | " + " | ".join(names) + " | FA2 | cuDNN | " + " | ".join(n + " / FA2" for n in names) + " |")
print("|---|---|---|" + "---|" * (2 * len(names) + 2))
for key in sorted(best):
    b, p = best[key], peers.get(key, {})
    fa = p.get("flash")
    f = lambda x: f"{x / fa:.3f}" if isinstance(fa, (int, float)) and fa and x else "-"
    cells = [f"{b.get(n)} ({b.get('slots_' + n)})" for n in names]
    print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {fa} | {p.get('cudnn')} | " + " | ".join(f(b.get(n, 0)) for n in names) + " |")
PY
