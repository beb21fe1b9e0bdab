#!/usr/bin/env bash
# Installs the CUDA build toolchain that `cargo build --features cuda` needs, from PyPI, into a
# project-local, git-ignored venv (`.venv-cuda/` at the repository root, or $FLASH_ORT_CUDA_VENV).
# No system CUDA install or GPU is needed. build.rs finds the result through FLASH_ORT_CUDA_HOME
# (the one line this script prints on stdout, so `eval "$(bash scripts/setup_cuda_toolchain.sh)"`
# works; progress goes to stderr) or, when that is unset, through `.venv-cuda/` itself.
#
# The version matches the GPU machines' driver (CUDA 13.0); override with FLASH_ORT_CUDA_VERSION.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLASH_ORT_CUDA_VENV:-$root/.venv-cuda}"
ver="${FLASH_ORT_CUDA_VERSION:-13.0}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv" >&2
fi
pkgs=(
    "nvidia-cuda-nvcc==${ver}.*"
    "nvidia-cuda-runtime==${ver}.*"
    "nvidia-cuda-crt==${ver}.*"
    "nvidia-nvvm==${ver}.*"
    "nvidia-cuda-cccl==${ver}.*"
)
if [ "${FLASH_ORT_WITH_CUTLASS:-0}" = "1" ]; then
    pkgs+=("nvidia-cutlass")
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pkgs[@]}" >&2

# The wheels spread one CUDA tree over several packages; they all land in nvidia/cu13/.
home="$("$venv/bin/python" - <<'PY'
import pathlib, site
for s in site.getsitepackages():
    for cand in ("nvidia/cu13", "nvidia/cuda_nvcc"):
        p = pathlib.Path(s) / cand
        if (p / "bin" / "nvcc").exists():
            print(p)
            raise SystemExit
raise SystemExit("nvcc not found in the installed wheels")
PY
)"
chmod +x "$home/bin/"* 2>/dev/null || true
"$home/bin/nvcc" --version | tail -2 >&2
echo "export FLASH_ORT_CUDA_HOME=$home"
