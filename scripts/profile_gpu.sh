#!/usr/bin/env bash
# On the GPU machine (onnxruntime-gpu unpacked, .device-lead/bundle.tar.xz carried): exports
# BERT-base and the LLaMA-style GQA decoder in fp16, fuses them (flash-ort; ORT's optimizer for
# BERT) and shows where each form's time goes at B=$PROF_BATCH (1), S=2048: node placement per provider
# (bench/profile_model.py nodes) and GPU time per kernel under Nsight Compute (... kernels).
#   bash scripts/profile_gpu.sh [SEQ]        results in $OUT/profile.md
set -uo pipefail
cd "$(dirname "$0")/.."
seq=${1:-2048}
out=${OUT:-/tmp/profile-out}
work=${PROF_WORK:-/tmp/prof}  # PROF_WORK=/tmp/e2e reuses scripts/e2e_gpu.sh's exports
mkdir -p "$out" "$work"
pids=()
exec > >(tee -a "$out/profile.md") 2>&1
tar xJf .device-lead/bundle.tar.xz
export PYTHONUNBUFFERED=1 FLASH_ORT_LIB=$PWD/.device-e2e/libflash_ort.so
bin=$PWD/.device-e2e/flash-ort
for m in bert_base:ts17:eager llama_gqa_2k:dyn18:sdpa; do
  IFS=: read -r name exp impl <<<"$m"
  [[ -s $work/$name/manifest_large.json ]] && continue
  python3 models/export_large.py --out "$work/$name" --models "$name" --variants "$exp:$impl" --dtype float16 >"$work/export_$name.log" 2>&1 &
  pids+=($!)
done
# Wait for the exports only: a bare `wait` would also wait for the tee above.
for p in "${pids[@]}"; do wait "$p"; done
# Forms already prepared in PROF_WORK (e.g. by e2e_gpu.sh, with its extra forms) are kept.
[[ -s $work/bert_base/forms.json ]] ||
  python3 bench/model_bench.py prepare --manifest "$work/bert_base/manifest_large.json" --flash-ort "$bin" --ort-opt --ort-opt-flash --provider cuda >"$work/prep_bert.log" 2>&1 || tail -5 "$work/prep_bert.log"
[[ -s $work/llama_gqa_2k/forms.json ]] ||
  python3 bench/model_bench.py prepare --manifest "$work/llama_gqa_2k/manifest_large.json" --flash-ort "$bin" --provider cuda >"$work/prep_llama.log" 2>&1 || tail -5 "$work/prep_llama.log"
batch=${PROF_BATCH:-1}
echo "# Where the time goes, B=$batch S=$seq ($(nvidia-smi --query-gpu=name --format=csv,noheader), $(date -u +%F\ %H:%M) UTC)"
if [[ ${PROF_NODES:-1} == 1 ]]; then
  for name in bert_base llama_gqa_2k; do
    timeout 120 python3 bench/profile_model.py nodes --forms "$work/$name/forms.json" --seq "$seq" --batch "$batch"
  done
fi
# PROF_FORMS="model:form ..." picks the forms to profile (default: all six).
for mf in ${PROF_FORMS:-bert_base:flash bert_base:ort_opt_flash bert_base:ort_opt bert_base:unfused llama_gqa_2k:flash llama_gqa_2k:unfused}; do
  IFS=: read -r name form <<<"$mf"
  echo; echo "### GPU kernels: $name / $form"
  timeout 150 ncu --profile-from-start off --csv --metrics gpu__time_duration.sum \
    python3 bench/profile_model.py kernels --forms "$work/$name/forms.json" --form "$form" --seq "$seq" --batch "$batch" \
    >"$work/ncu_${name}_$form.csv" 2>"$work/ncu_${name}_$form.err"
  python3 bench/profile_model.py summarize "$work/ncu_${name}_$form.csv" || tail -5 "$work/ncu_${name}_$form.err"
done
