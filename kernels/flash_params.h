// flash_params.h: the plain parameter block shared by the host launch code (cpp/) and the device
// kernels (kernels/). No cxx, ORT or Rust types here: cpp/bridge.cc fills it from the bridge struct.
#pragma once

#include <cstdint>

namespace flash_ort {

// What attn_mask holds (matches src/cuda/mod.rs).
enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskF32 = 2, kMaskF16 = 3, kMaskBF16 = 4 };

// Element type of Q/K/V/Y.
enum DTypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct FwdParams {
    // Device pointers. q/k/v have the kernel's element type (fp16/bf16); out has out_dtype.
    const void* q;
    const void* k;
    const void* v;
    const void* mask;       // null = none
    const int64_t* nonpad;  // null = none; int64 [B] on the device, clamped to [0, kv_len]
    void* out;
    // Split-KV partials: O [splits, B, Hq, Sq, Dv] fp32 (normalized per split) and
    // LSE [splits, B, Hq, Sq] fp32 (natural log). Used when write_accum is set.
    float* o_accum;
    float* lse_accum;

    // Strides in elements, indexed (batch, head, seq, dim). The dim stride of q/k/v/out is 1.
    int64_t q_stride[4];
    int64_t k_stride[4];
    int64_t v_stride[4];
    int64_t o_stride[4];
    int64_t m_stride[4];  // 0 = broadcast

    int batch, q_heads, kv_heads, group;  // group = q_heads / kv_heads
    int q_len, kv_len;                     // kv_len = past + new
    int d, dv;                             // actual head sizes (<= the kernel's padded size)
    int m_rows;                            // q_len * group: rows of one (batch, kv head) problem

    int mask_kind;
    float scale;
    float softcap;  // 0 = off
    // -1 = unbounded; causal is folded into window_right = min(window_right, 0).
    int window_left, window_right;

    int num_splits;    // >= 1
    int mask_warp;     // Hopper warp-specialized kernel: stage the mask in a warp of its own
    int write_accum;   // 1: write fp32 partials to o_accum/lse_accum, the combine kernel finishes
    int out_dtype;     // DTypeCode of out (used by the combine kernel)
};

}  // namespace flash_ort
