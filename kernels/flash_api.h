// flash_api.h: host-side entry points of kernels/ (no device code, no CUDA headers beyond the
// runtime API types), included by cpp/ and by the kernel files. Every function enqueues work on
// the given stream, checks the launch and throws std::runtime_error on failure; none allocates
// or synchronizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "flash_params.h"

namespace flash_ort {

// Tile shape of the forward kernel per padded head size. Two shapes per head size: the main one,
// and one with a single warp of 16 rows for problems of at most 16 rows per (batch, KV head) --
// decoding, where Sq * (Hq / Hkv) is small -- which puts more CTAs (and loads in flight) on each
// SM. Shared memory is (block_m + 4 * block_n) * (D + 8) * 2 bytes (Q, two K and two V stages).
struct TileShape {
    int block_m;
    int block_n;
    int warps;
};
constexpr int kSmallRows = 16;
constexpr TileShape fwd_tile(int d_padded, bool small) {
    if (small) return d_padded <= 192 ? TileShape{16, 64, 1} : TileShape{16, 32, 1};
    // D <= 128: 128 rows on 4 warps (two m16 tiles per warp, as FlashAttention-2 does).
    if (d_padded <= 128) return TileShape{128, 64, 4};
    return d_padded <= 192 ? TileShape{64, 64, 4} : TileShape{64, 32, 4};
}

// The forward kernel for one padded head size and element type (kF16 or kBF16).
// Defined in the generated flash_fwd_hdim<D>_<dtype>.cu files.
template <int kD, int kDType>
void run_fwd(const FwdParams& p, cudaStream_t stream);

// Merges split-KV partials into out (element type p.out_dtype).
void run_combine(const FwdParams& p, cudaStream_t stream);

// Dense [B, H, S, D] fp16 copy of an fp32 tensor indexed by strides (the fp32 input path).
void run_convert_f32_to_f16(const float* src, const int64_t (&strides)[4], int b, int h, int s,
                            int d, void* dst, cudaStream_t stream);

// present[B, H, P + S, dim] = concat(past [B, H, P, dim] dense or null, new via new_strides).
void run_concat(const void* past, const void* src, const int64_t (&new_strides)[4], void* present,
                int b, int h, int past_len, int new_len, int dim, int elem_bytes,
                cudaStream_t stream);

// Throws std::runtime_error naming `what` if the last launch failed.
void check_launch(const char* what);

}  // namespace flash_ort
