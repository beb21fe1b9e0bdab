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
// decoding, where Sq * (Hq / Hkv) is small -- which puts more CTAs and more K/V bytes in flight
// on each SM (decode is bandwidth-bound).
struct TileShape {
    int block_m;
    int block_n;
    int warps;
    int stages;  // K/V pipeline depth
};
constexpr int kSmallRows = 16;
constexpr TileShape fwd_tile(int d_padded, bool small) {
    if (small) {
        // 4 warps split each KV block's keys (one warp per 16-key slice at BlockN = 64).
        if (d_padded <= 128) return TileShape{16, 64, 4, 3};
        return d_padded <= 192 ? TileShape{16, 64, 4, 2} : TileShape{16, 64, 4, 2};
    }
    // D <= 128: 128 rows on 4 warps (two m16 tiles per warp, as FlashAttention-2 does); measured
    // 290 TFLOP/s at D = 128 against 230 with 8 warps x 16 rows (H200, S = 16k, 2026-11-22).
    if (d_padded <= 128) return TileShape{128, 64, 4, 2};
    return d_padded <= 192 ? TileShape{64, 64, 4, 2} : TileShape{64, 32, 4, 2};
}
// True on a Hopper GPU with the build's sm_90a code and the warp-specialized kernel enabled
// (FLASH_ORT_SM90_WS unset or not 0). Defined in flash_aux.cu.
bool hopper_ws_enabled();

// Decode-shaped calls (<= kSmallRows rows per (batch, KV head)) that run the warp-specialized
// Hopper kernel with one consumer warpgroup: a 64-row tile (rows past the problem are zeros),
// 128-key blocks brought by TMA, one CTA per SM. The split-KV plan (cpp/bridge.cc) and the
// launcher (flash_fwd_launch.cuh) both ask this, so they agree on the tile.
constexpr TileShape kSm90DecodeTile{64, 128, 8, 2};
inline bool decode_on_sm90(int d_padded, bool softcap, bool key_mask_only) {
    return (d_padded == 64 || d_padded == 128) && !softcap && key_mask_only && hopper_ws_enabled();
}

// Prefill calls (more than kSmallRows rows) that run the warp-specialized Hopper kernel, the
// same conditions as decode: 128-key blocks, one CTA per SM, and 192 rows (three consumer
// warpgroups) at D = 64 except short causal rows (bottom-right window, at most 1024 queries),
// 128 rows (two) otherwise. The split-KV plan and the launcher (run_fwd) both ask these.
constexpr int kSm90BlockN = 128;
inline bool prefill_on_sm90(int d_padded, bool softcap, bool key_mask_only) {
    return decode_on_sm90(d_padded, softcap, key_mask_only);
}
constexpr bool sm90_short_causal(int64_t window_right, int64_t q_len) { return window_right >= 0 && q_len <= 1024; }
constexpr int sm90_prefill_rows(int d_padded, bool short_causal) {
    return d_padded == 64 && !short_causal ? 192 : 128;
}

// Shared memory of one CTA: Q tile plus `stages` K and V tiles, rows padded by 8 elements.
constexpr int fwd_smem_bytes(int d_padded, TileShape t) {
    return (t.block_m + 2 * t.stages * t.block_n) * (d_padded + 8) * 2;
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
