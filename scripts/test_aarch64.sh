#!/usr/bin/env bash
# The CPU kernel's tests on aarch64 (the portable path: the gemm crate's NEON kernels and the
# portable softmax), run under qemu-aarch64 user emulation on an x86-64 machine.
# Needs: rustup, and on Debian/Ubuntu `apt-get install qemu-user gcc-aarch64-linux-gnu
# libc6-dev-arm64-cross`. About 3 minutes.   Usage: bash scripts/test_aarch64.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in qemu-aarch64 aarch64-linux-gnu-gcc; do
  command -v "$tool" >/dev/null || {
    echo "missing $tool: apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross" >&2
    exit 1
  }
done
rustup target add aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export FLASH_ORT_POISON_SCRATCH=1
cargo test --release --target aarch64-unknown-linux-gnu --lib --test cpu_kernel
