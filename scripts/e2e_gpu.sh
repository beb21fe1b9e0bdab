#!/usr/bin/env bash
# The GPU end-to-end batch of issue 5 in one call: real-size exports, fused and benchmarked in ORT's
# CUDA EP, the MiniLM real-weight parity check and the reliability checks, within a time budget,
# most important results first. Everything lands in --out (at most 7 files: the device tool
# returns 8); work files go to --work.
#
#   bash scripts/e2e_gpu.sh stash DIR     keep the MiniLM part(s) carried in DIR (e.g.
#                                         .device-e2e-minilm0) in /tmp/e2e-parts for the main run
#   bash scripts/e2e_gpu.sh run [--out DIR] [--budget-s 450] [--work /tmp/e2e]
#        [--flash-ort BIN] [--lib SO] [--skip STAGES] [--soak-runs 10000] [--maxseq-cap 131072]
#   bash scripts/e2e_gpu.sh run --provider cpu --tiny ...   the same steps on the CPU with tiny
#                                         configs: a rehearsal of this script on any machine
#
# Needs on the GPU machine: onnxruntime-gpu importable, or its parts stashed in /tmp/ort-gpu-parts
# by unpack-ort-gpu.sh (then this script unpacks them); .device-e2e/ (scripts/e2e_stage.sh)
# carried, with the CUDA build of libflash_ort.so and the flash-ort CLI in it (or --lib/--flash-ort,
# FLASH_ORT_LIB/FLASH_ORT_BIN, else target/release/); the MiniLM parts stashed. Python is python3
# (PYTHON to change it). tests/e2e/README.md lists the calls.
#
# Order (each stage checks the time left and is skipped, saying so, when it would not fit):
#   1. exports of BERT-base (TorchScript, eager) and the LLaMA-style GQA decoder (dynamo opset 18,
#      sdpa) in float16, in the background, while 2. the MiniLM check (CUDA, fp32 and fp16) and
#      3. the quick reliability checks (8 threads, CUDA graph, bad inputs) on the fused MiniLM run;
#   4. forms and their parity with the unfused export: BERT-base — flash-ort; ORT's optimizer
#      (ort_opt); ORT's optimizer with attention fusion off, flash-ort, the same pass again (ort_opt_flash).
#      LLaMA — flash-ort (ORT's optimizer fuses nothing in the float16 export, attention or not:
#      its RMSNorm fusion does not match the Cast-wrapped RMSNorm; stage 10 checks the real export);
#   5. the issue's headline, S = 2048, batch 1 and 8: BERT unfused / ort_opt / flash /
#      ort_opt_flash, LLaMA unfused / flash; 6. GPT-2 export in the background during
#   7. reliability of the fused BERT-base and LLaMA-style decoder (8 threads, CUDA graph, two GPUs
#      in one process when there are two; bad inputs in their own process), then the 10 000-run
#      soak of each (B in {1,4} x S in {8..512}, outputs on the device, memory first/last/slope);
#   8. the S grid (128 ... 32k) for BERT, LLaMA, GPT-2; 9. longest S per form; 10. ORT's optimizer
#      on LLaMA and GPT-2, with and without attention fusion (an ort_opt_flash form of LLaMA, if
#      one comes out, is measured at S = 2048); 11. the summary.
# Stage names for --skip: export minilm quickrel headline rel soak grid maxseq ortopt.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ ${1:-} == stash ]]; then
  src=${2:?usage: e2e_gpu.sh stash DIR}
  mkdir -p /tmp/e2e-parts
  cp "$src"/minilm.part* /tmp/e2e-parts/
  ls -l /tmp/e2e-parts
  exit 0
fi
[[ ${1:-} == run ]] && shift

out=${OUT:-/tmp/e2e-out}
work=/tmp/e2e
budget=450
maxseq_cap=131072
# The binaries: FLASH_ORT_BIN/LIB, else those staged in .device-e2e/, else target/release/.
staged() { [[ -e .device-e2e/$1 ]] && echo ".device-e2e/$1" || echo "target/release/$1"; }
bin=${FLASH_ORT_BIN:-$(staged flash-ort)}
lib=${FLASH_ORT_LIB:-$(staged libflash_ort.so)}
skip=""
provider=cuda
tiny=""
soak_runs=10000
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --budget-s) budget=$2; shift 2 ;;
    --flash-ort) bin=$2; shift 2 ;;
    --lib) lib=$2; shift 2 ;;
    --skip) skip=$2; shift 2 ;;
    --provider) provider=$2; shift 2 ;;
    --tiny) tiny=--tiny; shift ;;
    --soak-runs) soak_runs=$2; shift 2 ;;
    --maxseq-cap) maxseq_cap=$2; shift 2 ;;
    *) echo "e2e_gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
bin=$(realpath "$bin"); lib=$(realpath "$lib")
# Results accumulate in $work/results (a later call on a still-held machine resumes them: $OUT is
# emptied before each call) and are copied to $out at every stage.
res=$work/results
mkdir -p "$out" "$work/logs" "$res"
exec > >(tee -a "$out/e2e_gpu.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLASH_ORT_LIB=$lib FLASH_ORT_BIN=$bin
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
publish() { cp "$res"/* "$out"/ 2>/dev/null || true; }
say() { publish; printf '[%4ds, %4ds left] %s\n' $((SECONDS - start)) "$(left)" "$*"; }
skipped() { [[ ,$skip, == *,$1,* ]]; }
# fits N: at least N seconds of the budget are left.
fits() { (($(left) >= $1)); }
# within N CMD...: run CMD with a timeout of min(N, time left - 5) seconds.
within() {
  local cap=$1; shift
  local t=$(($(left) - 5)); ((t > cap)) && t=$cap
  ((t < 5)) && { say "no time left for: $*"; return 124; }
  timeout -k 10 "$t" "$@"
}

for f in "$bin" "$lib"; do [[ -e $f ]] || { echo "missing $f (--flash-ort / --lib)" >&2; exit 2; }; done
dtype=float16
if [[ $provider == cuda ]]; then
  # onnxruntime-gpu: unpack the parts stashed by unpack-ort-gpu.sh when it is not importable yet.
  if ! $PY -c 'import onnxruntime as o; o.preload_dlls(); assert "CUDAExecutionProvider" in o.get_available_providers()' 2>/dev/null; then
    if [[ ! -d /tmp/ort-gpu/onnxruntime ]] && ls /tmp/ort-gpu-parts/ort.part* >/dev/null 2>&1; then
      mkdir -p /tmp/ort-gpu && cat /tmp/ort-gpu-parts/ort.part* | xz -d | tar -x -C /tmp/ort-gpu
    fi
    [[ -d /tmp/ort-gpu/onnxruntime ]] && export PYTHONPATH=/tmp/ort-gpu${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY - <<'EOF' || { echo "onnxruntime-gpu is not importable with CUDA: unpack it first" >&2; exit 2; }
import onnxruntime as ort
ort.preload_dlls()
assert "CUDAExecutionProvider" in ort.get_available_providers(), ort.get_available_providers()
EOF
else
  dtype=float32  # export_large.py traces float16 on the GPU only
fi
sfx=""; [[ $dtype == float16 ]] && sfx=_fp16  # export_large.py's file names: NAME_IMPL_EXP[_fp16].onnx
# onnxconverter-common (fp16 conversion) from the staged wheel.
if ls .device-e2e/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$work/site" .device-e2e/*.whl >/dev/null 2>&1
  export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u +"date %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || grep -m1 "model name" /proc/cpuinfo
  $PY -c 'import onnxruntime, torch, transformers, onnx; print("onnxruntime", onnxruntime.__version__, onnxruntime.__file__); print("torch", torch.__version__, "transformers", transformers.__version__, "onnx", onnx.__version__)'
  "$bin" version
  git log -1 --format='commit %H %s' 2>/dev/null || true
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
bench() { $PY bench/model_bench.py "$@" --provider "$provider" --library "$lib" --out "$res/model_bench.json"; }

# --- 1. exports in the background ------------------------------------------------------------
export_bg() {  # NAME VARIANTS: exports into $work/NAME, writes $work/NAME.rc when done
  local name=$1 variants=$2
  if [[ -s $work/$name/manifest_large.json && -e $work/$name.rc && $(cat "$work/$name.rc") == 0 ]]; then
    return 0  # a warm machine that ran this before
  fi
  rm -f "$work/$name.rc"
  ( $PY models/export_large.py --out "$work/$name" --models "$name" --variants "$variants" --dtype $dtype $tiny \
      >"$work/logs/export_$name.log" 2>&1; echo $? >"$work/$name.rc" ) &
}
wait_export() {  # NAME MAX_SECONDS: 0 when the export is there
  local name=$1 cap=$2 t0=$SECONDS
  while [[ ! -e $work/$name.rc ]]; do
    if ((SECONDS - t0 > cap)) || ! fits 20; then say "$name: export not done in time"; return 1; fi
    sleep 2
  done
  if [[ $(cat "$work/$name.rc") != 0 ]]; then
    say "$name: export FAILED"; tail -5 "$work/logs/export_$name.log"; return 1
  fi
  grep -h "\.onnx:" "$work/logs/export_$name.log" | sed 's/^/    /'
  return 0
}
if ! skipped export; then
  say "1. exporting bert_base (ts17:eager) and llama_gqa_2k (dyn18:sdpa), $dtype, in the background"
  export_bg bert_base ts17:eager
  export_bg llama_gqa_2k dyn18:sdpa
fi

# --- 2. MiniLM with real weights, CUDA, fp32 and fp16 ----------------------------------------
minilm_model=$work/minilm/model
if ! skipped minilm && fits 120; then
  if [[ ! -e $minilm_model/config.json ]] && ls /tmp/e2e-parts/minilm.part* >/dev/null 2>&1; then
    mkdir -p "$work/minilm" && cat /tmp/e2e-parts/minilm.part* | tar -x -C "$work/minilm"
  fi
  if [[ -e $minilm_model/config.json ]]; then
    say "2. MiniLM: export (dynamo 18, TorchScript 17), fuse, fp16, embeddings on CUDA"
    within 240 $PY examples/minilm/export_and_check.py --provider "$provider" --dtypes float32,float16 --model-dir "$minilm_model" \
      --out "$work/minilm_out" --json "$res/minilm_$provider.json" --flash-ort "$bin" --library "$lib" \
      >"$work/logs/minilm.log" 2>&1
    say "   MiniLM exit $?"; grep -E "^\[(dyn|ts)|^\{|error" "$work/logs/minilm.log" | tail -14
  else
    say "2. MiniLM: SKIPPED, the model is not there (scripts/e2e_stage.sh, then e2e_gpu.sh stash per part)"
  fi
fi

# --- 3. quick reliability on the fused MiniLM (fp16 and fp32) ----------------------------------
rel() { within "$1" $PY tests/e2e/reliability.py --provider "$provider" --library "$lib" --out "$res/reliability.json" "${@:2}"; }
m16=$work/minilm_out/minilm_sdpa_dyn18.fused.fp16.onnx
m32=$work/minilm_out/minilm_sdpa_dyn18.fused.onnx
if ! skipped quickrel && [[ -e $m16 ]] && fits 90; then
  say "3. reliability (threads, CUDA graph) on the fused MiniLM, fp16 and fp32; bad inputs in their own process"
  rel 60 --model "$m16" --label minilm_fused_fp16 --checks threads,cuda_graph
  rel 60 --model "$m32" --label minilm_fused_fp32 --checks threads,cuda_graph
  rel 30 --model "$m16" --label minilm_fused_fp16_bad_inputs --checks bad_inputs
fi

# --- 4. fuse the exports ---------------------------------------------------------------------
have_bert=0; have_llama=0; have_gpt2=0
prepare=($PY bench/model_bench.py prepare --flash-ort "$bin" --library "$lib" --provider "$provider")
if wait_export bert_base 300; then
  say "4. bert_base forms: flash-ort; ORT transformer optimizer; ORT optimizer without attention fusion + flash-ort; parity"
  within 240 "${prepare[@]}" --manifest "$work/bert_base/manifest_large.json" --ort-opt --ort-opt-flash --nopack --parity && have_bert=1
fi
if wait_export llama_gqa_2k 300; then
  say "4. llama_gqa_2k forms: flash-ort; parity"
  within 150 "${prepare[@]}" --manifest "$work/llama_gqa_2k/manifest_large.json" --parity && have_llama=1
fi
bert_forms=$work/bert_base/forms.json; llama_forms=$work/llama_gqa_2k/forms.json; gpt2_forms=$work/gpt2_small/forms.json

# --- 5. headline: S = 2048, batch 1 and 8 ------------------------------------------------------
if ! skipped headline; then
  ((have_bert)) && fits 40 && { say "5. bert_base at S=2048"; bench run --forms "$bert_forms" --seqs 2048 --batches 1,8 --budget-s $(($(left) / 2 < 120 ? $(left) / 2 : 120)); }
  ((have_llama)) && fits 40 && { say "5. llama_gqa_2k at S=2048"; bench run --forms "$llama_forms" --seqs 2048 --batches 1,8 --budget-s $(($(left) / 2 < 150 ? $(left) / 2 : 150)); }
  [[ -s $res/model_bench.json ]] && $PY bench/model_bench.py table "$res/model_bench.json" | tee "$res/model_bench.md"
fi

# --- 6./7. GPT-2 export in the background; meanwhile reliability and the soaks ------------------
skipped export || export_bg gpt2_small dyn18:sdpa
bert_flash=$work/bert_base/bert_base_eager_ts17${sfx}.flash.onnx
bert_oflash=$work/bert_base/bert_base_eager_ts17${sfx}.ortopt_flash.onnx
llama_flash=$work/llama_gqa_2k/llama_gqa_2k_sdpa_dyn18${sfx}.flash.onnx
if ! skipped rel; then
  if [[ -e $bert_flash ]] && fits 60; then
    say "7. reliability of the fused BERT-base: threads, CUDA graph, two GPUs; bad inputs in their own process"
    rel 90 --model "$bert_flash" --label bert_base_flash --checks threads,cuda_graph,two_gpu
    rel 45 --model "$bert_flash" --label bert_base_flash_bad_inputs --checks bad_inputs
  fi
  if [[ -e $bert_oflash ]] && fits 60; then
    say "7. reliability of BERT-base after ORT's optimizer (attention off) + flash-ort: threads, CUDA graph"
    rel 60 --model "$bert_oflash" --label bert_base_ort_opt_flash --checks threads,cuda_graph
  fi
  if [[ -e $llama_flash ]] && fits 80; then
    say "7. reliability of the fused LLaMA-style GQA decoder (S <= 512): threads, CUDA graph, two GPUs; bad inputs"
    rel 120 --model "$llama_flash" --label llama_gqa_2k_flash --checks threads,cuda_graph,two_gpu --max-seq 512
    rel 60 --model "$llama_flash" --label llama_gqa_2k_flash_bad_inputs --checks bad_inputs --max-seq 512
  fi
fi
if ! skipped soak; then
  if [[ -e $bert_flash ]] && fits 60; then
    say "7. soak: $soak_runs runs of the fused BERT-base, B in {1,4} x S in {8..512}"
    rel 150 --model "$bert_flash" --label bert_base_flash_soak --checks soak --runs "$soak_runs" --soak-max-s 120
  fi
  if [[ -e $llama_flash ]] && fits 90; then
    say "7. soak: $soak_runs runs of the fused LLaMA-style decoder, B in {1,4} x S in {8..512}"
    rel 210 --model "$llama_flash" --label llama_gqa_2k_flash_soak --checks soak --runs "$soak_runs" --soak-max-s 180 --max-seq 512
  fi
fi
if wait_export gpt2_small 120; then
  within 60 "${prepare[@]}" --manifest "$work/gpt2_small/manifest_large.json" && have_gpt2=1
fi

# --- 8. the S grid -----------------------------------------------------------------------------
if ! skipped grid; then
  ((have_bert)) && fits 40 && { say "8. bert_base grid"; bench run --forms "$bert_forms" --seqs 128,512,8192,32768 --batches 1,8 --target-s 0.5 --budget-s $(($(left) * 2 / 5)); }
  ((have_llama)) && fits 40 && { say "8. llama_gqa_2k grid"; bench run --forms "$llama_forms" --seqs 128,512,8192,32768 --batches 1,8 --target-s 0.5 --budget-s $(($(left) / 2)); }
  ((have_gpt2)) && fits 30 && { say "8. gpt2_small grid"; bench run --forms "$gpt2_forms" --seqs 128,512,2048,8192,32768 --batches 1,8 --target-s 0.5 --budget-s $(($(left) / 2)); }
fi

# --- 9. longest S (batch 1) ------------------------------------------------------------------------
if ! skipped maxseq; then
  ((have_bert)) && fits 30 && { say "9. bert_base longest S"; $PY bench/model_bench.py maxseq --provider "$provider" --forms "$bert_forms" --library "$lib" --out "$res/model_bench.json" --cap "$maxseq_cap" --budget-s $(($(left) / 2)); }
  ((have_llama)) && fits 30 && { say "9. llama_gqa_2k longest S"; $PY bench/model_bench.py maxseq --provider "$provider" --forms "$llama_forms" --library "$lib" --out "$res/model_bench.json" --cap "$maxseq_cap" --budget-s $(($(left) - 40)); }
fi

# --- 10. ORT's optimizer on the decoders -------------------------------------------------------------
if ! skipped ortopt && fits 60; then
  for name in gpt2_small llama_gqa_2k; do
    [[ -s $work/$name/forms.json ]] && fits 45 || continue
    say "10. ORT transformer optimizer on $name, with and without attention fusion"
    within $(($(left) - 20)) "${prepare[@]}" --manifest "$work/$name/manifest_large.json" --ort-opt --ort-opt-flash --parity
  done
  # An ort_opt_flash form of the decoder (the optimizer fused something): measure it at S = 2048.
  if [[ -e $work/llama_gqa_2k/llama_gqa_2k_sdpa_dyn18${sfx}.ortopt_flash.onnx ]] && fits 40; then
    say "10. llama_gqa_2k ort_opt_flash at S=2048"
    bench run --forms "$llama_forms" --forms-only ort_opt_flash --seqs 2048 --batches 1,8 --budget-s $(($(left) - 20))
  fi
fi

# --- 11. summary ------------------------------------------------------------------------------------
say "11. summary"
if [[ -s $res/model_bench.json ]]; then
  # forms.json now knows what ORT's optimizer did on every model and the forms' parity; fold that
  # into the results.
  $PY - "$res/model_bench.json" "$work"/*/forms.json <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))
for f in sys.argv[2:]:
    for name, e in json.load(open(f))["models"].items():
        if name in res["models"]:
            for form in ("ort_opt", "ort_opt_flash"):
                res["models"][name]["forms"][form] = {k: v for k, v in e["forms"].get(form, {}).items() if k != "file"} or None
            if e.get("parity"):
                res["models"][name]["parity"] = e["parity"]
json.dump(res, open(sys.argv[1], "w"), indent=1)
EOF
  $PY bench/model_bench.py table "$res/model_bench.json" >"$res/model_bench.md"
  cat "$res/model_bench.md"
fi
[[ -s $res/reliability.json ]] && $PY - "$res/reliability.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    print(f"reliability {r['model']}: {'PASS' if r['ok'] else 'FAIL'}",
          {k: ("SKIPPED: " + str(v.get("skipped"))[:80] if v.get("ran") is False and v["ok"] else "PASS" if v["ok"]
               else "FAIL: " + str(v.get("reason") or v.get("error") or "")[:160]) for k, v in r["checks"].items()})
    s = r["checks"].get("soak")
    if s and "runs" in s:
        print(f"  soak: {s['runs']} runs in {s['seconds']} s; device MiB first/last {s['gpu_used_mib_first_last']} "
              f"({s['gpu_memory_probe']}), slope {s['gpu_slope_mib_per_10k_runs']} MiB/10k runs; host RSS MiB first/last "
              f"{s['rss_mib_first_last']}, slope {s['rss_slope_mib_per_10k_runs']} MiB/10k runs; mismatches {s['mismatch_count']}")
    g = r["checks"].get("two_gpu")
    if g and g.get("ran"):
        print(f"  two GPUs: device 1 = device 0 {g['device1_equals_device0']}, concurrent identical {g['concurrent_identical']} "
              f"of {g['concurrent_runs_per_device']} each, device-1 memory MiB {g['memory_mib']}")
EOF
[[ -s $res/minilm_$provider.json ]] && $PY - "$res/minilm_$provider.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("MiniLM", "PASS" if r["ok"] else "FAIL", r["failures"])
for e in r["exports"]:
    for k, v in e.get("checks", {}).items():
        print(f"  {e['exporter']} {k}: min cosine {v['min_cosine']:.7f}", f"(padded vs alone {v['padded_vs_alone_min_cosine']:.7f})" if "padded_vs_alone_min_cosine" in v else "", v.get("flash_node_providers", ""))
EOF
tar -C "$work" -czf "$out/e2e_logs.tar.gz" logs $(cd "$work" && ls -d */forms.json */manifest_large.json */*.report.json minilm_out/*.json 2>/dev/null) 2>/dev/null
publish
say "done; files in $out: $(ls "$out" | tr '\n' ' ')"
