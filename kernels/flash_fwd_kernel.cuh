// flash_fwd_kernel.cuh: the FlashAttention-2 forward kernel (mma.sync m16n8k16, ldmatrix,
// cp.async double buffering, online softmax in registers, P kept in registers for P·V).
//
// One CTA computes kBlockM rows of one (batch, KV head): the rows are the flattened
// (query i, head-in-group g) pairs m = i·group + g, so GQA query heads sharing a KV head read each
// K/V tile once (this is what makes decode, Sq = 1, bandwidth-bound instead of L2-bound).
// Warp w owns rows [16w, 16w + 16). KV blocks are visited from the last to the first, so the
// blocks that need element masks (causal diagonal, sequence end) come first and the rest run the
// unmasked path. With num_splits > 1 the KV range is split over blockIdx.y and each split writes
// fp32 partials that flash_combine.cu merges.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "flash_params.h"

namespace flash_ort {

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 writes zeros (out-of-range rows/cols).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 2^x on the SFU (ex2.approx, flushes denormals): exp2f() without --use_fast_math expands to a
// slower range-reduced sequence, and the softmax issues one per score.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
    __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    __device__ __forceinline__ static void store2(void* dst, float lo, float hi) {
        *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(lo, hi);
    }
};

template <>
struct Mma<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    __device__ __forceinline__ static void store2(void* dst, float lo, float hi) {
        *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(lo, hi);
    }
};

// ---------------------------------------------------------------------------------------------
// Tile configuration
// ---------------------------------------------------------------------------------------------

template <int kD_, int kBlockM_, int kBlockN_, int kWarps_, int kStages_, typename T_>
struct FwdConfig {
    // K/V pipeline depth: blocks in flight = kStages - 1 while one is computed.
    static constexpr int kStages = kStages_;
    static constexpr int kD = kD_;            // padded head size (multiple of 16)
    static constexpr int kBlockM = kBlockM_;  // query rows per CTA
    static constexpr int kBlockN = kBlockN_;  // keys per KV block
    static constexpr int kWarps = kWarps_;
    static constexpr int kThreads = kWarps * 32;
    // m16 tiles per warp: with 2, each K/V fragment read from shared memory feeds two MMAs,
    // halving shared-memory traffic per FLOP (what FlashAttention-2 does with 4 warps x 128 rows).
    // Decode tiles (16 rows, several warps): the warps split each KV block's keys instead of
    // the rows, and their partial softmax states are merged through shared memory at the end.
    static constexpr bool kSplitN = kBlockM == 16 && kWarps > 1;
    static constexpr int kWarpN = kSplitN ? kBlockN / kWarps : kBlockN;  // keys per warp
    static_assert(kWarpN % 16 == 0, "each warp needs whole k16 slices of a KV block");
    static constexpr int kMT = kSplitN ? 1 : kBlockM / (16 * kWarps);
    static_assert(kSplitN || kMT * 16 * kWarps == kBlockM, "block rows must split evenly over warps");
    // Rows padded by 16 bytes: 8 consecutive rows' ldmatrix addresses land in distinct bank
    // groups for every kD here, so ldmatrix and cp.async need no swizzle.
    static constexpr int kStride = kD + 8;
    // Q fragments stay in registers when they fit beside O (kMT*kD/2 floats) and S.
    static constexpr bool kQInRegs = kMT == 1 && kD <= 128;
    static constexpr int kSmemQ = kBlockM * kStride;
    static constexpr int kSmemKV = kBlockN * kStride;
    static constexpr size_t kSmemBytes = (size_t)(kSmemQ + 2 * kStages * kSmemKV) * sizeof(T_);
    using T = T_;
};

// Loads a [rows, kD] tile into shared memory; row r comes from row_ptr(r) (nullptr = zero row),
// columns >= dcols are zero.
template <typename Cfg, int kRows, typename RowPtr>
__device__ __forceinline__ void load_tile(typename Cfg::T* smem, RowPtr row_ptr, int dcols,
                                          const void* dummy) {
    constexpr int kChunksPerRow = Cfg::kD / 8;
    constexpr int kChunks = kRows * kChunksPerRow;
    constexpr int kIters = (kChunks + Cfg::kThreads - 1) / Cfg::kThreads;
    // Fully unrolled address math for many iterations (one-warp tiles) costs registers the
    // accumulators need; 4 at a time keeps enough copies in flight.
#pragma unroll 4
    for (int it = 0; it < kIters; ++it) {
        const int c = threadIdx.x + it * Cfg::kThreads;
        if (kChunks % Cfg::kThreads != 0 && c >= kChunks) break;
        int r = c / kChunksPerRow;
        int col = (c % kChunksPerRow) * 8;
        const typename Cfg::T* src = row_ptr(r);
        bool valid = src != nullptr && col < dcols;
        cp_async16(smem_u32(smem + r * Cfg::kStride + col), valid ? (const void*)(src + col) : dummy,
                   valid);
    }
}

// Mask element `idx` as an additive fp32 bias (bool: true = attend -> 0, false -> -inf). T (the
// Q/K/V type) is unused; kept so the sm_90 kernel's mask_value<T> calls keep compiling.
template <typename T>
__device__ __forceinline__ float mask_value(const void* mask, int kind, int64_t idx) {
    switch (kind) {
        case kMaskBool:
            return static_cast<const uint8_t*>(mask)[idx] ? 0.f : -INFINITY;
        case kMaskF32:
            return static_cast<const float*>(mask)[idx];
        case kMaskF16:
            return __half2float(static_cast<const __half*>(mask)[idx]);
        case kMaskBF16:
            return __bfloat162float(static_cast<const __nv_bfloat16*>(mask)[idx]);
        default:
            return 0.f;
    }
}

// Staging a key-padding mask: the raw bits of one element are loaded when the block's K/V copy is
// issued and converted (mask_raw_bias) only when stored to shared memory, after the previous
// block's math, so the load's latency hides behind that math instead of stalling the warp.
__device__ __forceinline__ uint32_t mask_raw(const void* mask, int kind, int64_t idx) {
    switch (kind) {
        case kMaskBool:
            return static_cast<const uint8_t*>(mask)[idx];
        case kMaskF32:
            return __float_as_uint(static_cast<const float*>(mask)[idx]);
        default:  // f16 / bf16 bits
            return static_cast<const uint16_t*>(mask)[idx];
    }
}
__device__ __forceinline__ float mask_raw_bias(uint32_t raw, int kind) {
    switch (kind) {
        case kMaskBool:
            return raw != 0 ? 0.f : -INFINITY;
        case kMaskF32:
            return __uint_as_float(raw);
        case kMaskF16:
            return __half2float(__ushort_as_half(static_cast<unsigned short>(raw)));
        default:
            return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(raw)));
    }
}

// Where the staged bias of key k (0 <= k < kBlockN) of a KV block lives, as a float index from
// the start of that block's K stage: in the 16-byte pad that ends every K row (kStride = kD + 8;
// the tile loads and ldmatrix touch only columns < kD), 4 floats a row, so key k sits in row
// k / 4. It needs no shared memory of its own, and it is written and read under the barriers
// that already order the K stage's writes and reads. Keys 2c and 2c + 1 share a row (an 8-byte
// float2 load).
template <typename Cfg>
__device__ __forceinline__ int key_bias_index(int k) {
    static_assert((Cfg::kStride - Cfg::kD) * sizeof(typename Cfg::T) == 4 * sizeof(float),
                  "each K row ends in a 16-byte pad");
    static_assert(Cfg::kBlockN % 4 == 0 && Cfg::kD * sizeof(typename Cfg::T) % 16 == 0,
                  "pads are 16-byte aligned");
    constexpr int kRowFloats = Cfg::kStride * (int)sizeof(typename Cfg::T) / 4;
    constexpr int kPadFloat = Cfg::kD * (int)sizeof(typename Cfg::T) / 4;
    return (k / 4) * kRowFloats + kPadFloat + k % 4;
}

// A compile-time int passed to a generic lambda (the softmax mode).
template <int V>
using Tag = std::integral_constant<int, V>;

// Score paths of one KV block, chosen per block (see the call site).
enum SoftmaxMode : int {
    kModeFast = 0,        // fully visible, no mask, no softcap
    kModeBounds = 1,      // no mask, no softcap; causal/window/sequence-end compares
    kModeGeneral = 2,     // softcap and/or a mask read per score from global memory
    kModeBias = 3,        // staged key-padding bias, fully inside every row's window
    kModeBiasBounds = 4,  // staged key-padding bias plus causal/window compares
};

// The keys one batch's rows see: right padding (nonpad_kv_seqlen) and, per query i, the causal /
// window bounds aligned bottom-right. Shared by the mma.sync and the Hopper kernels.
struct KeyBounds {
    int kv_end;  // keys this batch really has
    int offset;  // kv_len - q_len: bottom-right alignment
    int window_left, window_right;
    __device__ __forceinline__ KeyBounds(const FwdParams& p, int b)
        : kv_end(p.kv_len), offset(p.kv_len - p.q_len), window_left(p.window_left),
          window_right(p.window_right) {
        if (p.nonpad != nullptr) {
            long long n = p.nonpad[b];
            kv_end = (int)max(0LL, min((long long)p.kv_len, n));
        }
    }
    __device__ __forceinline__ int lo(int i) const {  // first visible key of query i
        return window_left >= 0 ? max(0, i + offset - window_left) : 0;
    }
    __device__ __forceinline__ int hi(int i) const {  // one past the last visible key of query i
        return window_right >= 0 ? min(kv_end, max(0, i + offset + window_right + 1)) : kv_end;
    }
};

// The KV blocks [n_begin, n_end) that rows [m0, m_end) of one CTA visit (its split's share of
// them with split-KV), and the keys [lo_last, hi_first) that every one of those rows sees: a
// block inside them needs no bounds checks.
struct BlockRange {
    int n_begin, n_end, lo_last, hi_first;
};
template <int kBlockN>
__device__ __forceinline__ BlockRange block_range(const FwdParams& p, const KeyBounds& kb, int m0,
                                                  int m_end, int split) {
    const int i_first = m0 / p.group, i_last = (m_end - 1) / p.group;
    const int lo_first = kb.lo(i_first), hi_last = kb.hi(i_last);
    BlockRange r{lo_first / kBlockN, 0, kb.lo(i_last), kb.hi(i_first)};
    r.n_end = hi_last > lo_first ? (hi_last + kBlockN - 1) / kBlockN : r.n_begin;
    if (p.num_splits > 1) {
        const int n_total = (p.kv_len + kBlockN - 1) / kBlockN;
        const int per = (n_total + p.num_splits - 1) / p.num_splits;
        r.n_begin = max(r.n_begin, split * per);
        r.n_end = min(r.n_end, (split + 1) * per);
    }
    return r;
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) flash_fwd_kernel(const __grid_constant__ FwdParams p) {
    using T = typename Cfg::T;
    constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
    constexpr int kStride = Cfg::kStride;
    constexpr int kMT = Cfg::kMT;
    constexpr int kR = 2 * kMT;       // rows per thread: g and g + 8 of each m16 tile
    constexpr int kWarpN = Cfg::kWarpN;
    constexpr int kNT = kWarpN / 8;   // n8 tiles of S per m16 tile
    constexpr int kDT = kD / 8;       // n8 tiles of O per m16 tile
    constexpr float kLog2e = 1.4426950408889634f;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    constexpr int kStages = Cfg::kStages;
    T* sK = sQ + Cfg::kSmemQ;                   // kStages stages
    T* sV = sK + kStages * Cfg::kSmemKV;        // kStages stages

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;

    // Heavy (late) row blocks first: with causal masks they have the most KV blocks.
    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int split = blockIdx.y;
    const int bh = blockIdx.z;
    const int b = bh / p.kv_heads, kvh = bh % p.kv_heads;
    const int m0 = m_block * kBlockM;
    const int m_end = min(m0 + kBlockM, p.m_rows);
    const int warp_m0 = Cfg::kSplitN ? m0 : m0 + warp * 16 * kMT;  // first row of this warp
    const int wn0 = Cfg::kSplitN ? warp * kWarpN : 0;  // first key of this warp in a KV block

    const KeyBounds kb(p, b);
    const int kv_end = kb.kv_end;
    const BlockRange range = block_range<kBlockN>(p, kb, m0, m_end, split);
    const int n_begin = range.n_begin, n_end = range.n_end;
    const int lo_last = range.lo_last, hi_first = range.hi_first;

    // This thread's rows: ri = 2 * mt + r is row g + 8r of the warp's m16 tile mt.
    // Only the visible key range is kept per row; query and head indices are recomputed where
    // a mask or the epilogue needs them (registers go to the accumulators).
    auto row_m_of = [&](int ri) { return warp_m0 + (ri / 2) * 16 + g + (ri % 2) * 8; };
    int row_lo_k[kR], row_hi_k[kR];
#pragma unroll
    for (int ri = 0; ri < kR; ++ri) {
        const int i = min(row_m_of(ri), p.m_rows - 1) / p.group;
        row_lo_k[ri] = kb.lo(i);
        row_hi_k[ri] = kb.hi(i);
    }
    const bool warp_active = warp_m0 < p.m_rows;

    const T* q = static_cast<const T*>(p.q);
    const T* kbase = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
    const T* vbase = static_cast<const T*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1];

    float o[kMT][kDT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int j = 0; j < kDT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][j][e] = 0.f;
    float row_m[kR], row_l[kR];
#pragma unroll
    for (int ri = 0; ri < kR; ++ri) {
        row_m[ri] = -INFINITY;
        row_l[ri] = 0.f;
    }

    const bool additive = p.mask_kind >= kMaskF32;
    // The mask varies only along keys (a padding mask): every row shares one offset.
    const bool key_mask = p.mask_kind != kMaskNone && p.m_stride[1] == 0 && p.m_stride[2] == 0;
    // Without an additive mask the scores stay small: work in log2 units with the scale folded
    // into one multiply. With one (it may hold -FLT_MAX) stay in natural units so x - m is
    // computed before the log2e multiply and cannot overflow.
    const float pre = additive || p.softcap > 0.f ? p.scale : p.scale * kLog2e;
    const float post = additive ? kLog2e : 1.f;
    const float cap_out = additive ? p.softcap : p.softcap * kLog2e;

    // A key-padding mask without softcap (BERT-style [B, 1, 1, T] bool or additive) is staged
    // once per KV block as fp32 bias (key_bias_index), instead of being loaded and converted per
    // score and row in the general path. Thread k < kBlockN stages key k; keys at or past kv_end
    // get -inf there, so only causal/window blocks still need per-score compares.
    static_assert(kBlockN <= Cfg::kThreads, "one staged key per thread");
    const bool stage_bias = key_mask && p.softcap == 0.f;
    const int64_t bias_base = b * p.m_stride[0];
    auto bias_load = [&](int n) -> uint32_t {  // raw bits of this thread's key of block n
        const int key = n * kBlockN + tid;
        return tid < kBlockN && key < kv_end
                   ? mask_raw(p.mask, p.mask_kind, bias_base + (int64_t)key * p.m_stride[3])
                   : 0u;
    };
    auto bias_store = [&](int n, int stage, uint32_t raw) {
        const int key = n * kBlockN + tid;
        if (tid < kBlockN) {
            reinterpret_cast<float*>(sK + stage * Cfg::kSmemKV)[key_bias_index<Cfg>(tid)] =
                key < kv_end ? mask_raw_bias(raw, p.mask_kind) : -INFINITY;
        }
    };

    if (n_begin < n_end) {
        // Q tile (cp.async group 0).
        load_tile<Cfg, kBlockM>(
            sQ,
            [&](int r) -> const T* {
                int m = m0 + r;
                if (m >= p.m_rows) return nullptr;
                int i = m / p.group, h = kvh * p.group + m % p.group;
                return q + b * p.q_stride[0] + h * p.q_stride[1] + (int64_t)i * p.q_stride[2];
            },
            p.d, p.q);
        auto load_kv = [&](int n, int stage) {
            int key0 = n * kBlockN;
            load_tile<Cfg, kBlockN>(
                sK + stage * Cfg::kSmemKV,
                [&](int r) -> const T* {
                    int key = key0 + r;
                    return key < kv_end ? kbase + (int64_t)key * p.k_stride[2] : nullptr;
                },
                p.d, p.k);
            load_tile<Cfg, kBlockN>(
                sV + stage * Cfg::kSmemKV,
                [&](int r) -> const T* {
                    int key = key0 + r;
                    return key < kv_end ? vbase + (int64_t)key * p.v_stride[2] : nullptr;
                },
                p.dv, p.v);
        };
        // Prologue: the first kStages - 1 blocks (descending order). Every step commits one
        // group, empty or not, so wait_group<kStages - 2> always means "block `it` landed".
        const int count = n_end - n_begin;
#pragma unroll
        for (int st = 0; st < kStages - 1; ++st) {
            if (st < count) {
                load_kv(n_end - 1 - st, st);
                if (stage_bias) bias_store(n_end - 1 - st, st, bias_load(n_end - 1 - st));
            }
            cp_async_commit();
        }
        // Raw mask bits of the block issued last, stored to its stage after this block's math.
        uint32_t bias_next = 0;

        uint32_t qf[Cfg::kQInRegs ? kD / 16 : 1][4];
        for (int it = 0; it < count; ++it) {
            const int n = n_end - 1 - it;
            const int stage = it % kStages;
            if constexpr (kStages == 2) {
                // Issue the next block, wait for this one; a second barrier at the end of the
                // iteration protects the stage being read. (Measured form of the 4-warp tiles:
                // the one-barrier form below made ptxas spill there.)
                if (it + 1 < count) {
                    load_kv(n - 1, stage ^ 1);
                    if (stage_bias) bias_next = bias_load(n - 1);
                    cp_async_commit();
                    cp_async_wait<1>();
                } else {
                    cp_async_wait<0>();
                }
                __syncthreads();
            } else {
                cp_async_wait<kStages - 2>();
                __syncthreads();
                // Refill the stage computed in the previous iteration (the barrier above
                // ordered every warp's reads of it before these writes).
                if (it + kStages - 1 < count) {
                    load_kv(n - (kStages - 1), (it + kStages - 1) % kStages);
                    if (stage_bias) bias_next = bias_load(n - (kStages - 1));
                }
                cp_async_commit();
            }

            if (warp_active) {
                const T* sQw = sQ + (warp_m0 - m0) * kStride;
                if constexpr (Cfg::kQInRegs) {
                    if (it == 0) {
#pragma unroll
                        for (int kk = 0; kk < kD / 16; ++kk)
                            ldmatrix_x4(qf[kk], smem_u32(sQw + (lane % 16) * kStride + kk * 16 +
                                                         (lane / 16) * 8));
                    }
                }
                const T* sKs = sK + stage * Cfg::kSmemKV;
                const T* sVs = sV + stage * Cfg::kSmemKV;

                // S = Q Kᵀ for this warp's rows and kBlockN keys; each K fragment feeds kMT MMAs.
                float s[kMT][kNT][4];
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                    for (int j = 0; j < kNT; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
                for (int kk = 0; kk < kD / 16; ++kk) {
                    uint32_t a[kMT][4];
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt) {
                        if constexpr (Cfg::kQInRegs) {
#pragma unroll
                            for (int e = 0; e < 4; ++e) a[mt][e] = qf[Cfg::kQInRegs ? kk : 0][e];
                        } else {
                            ldmatrix_x4(a[mt], smem_u32(sQw + (mt * 16 + lane % 16) * kStride +
                                                        kk * 16 + (lane / 16) * 8));
                        }
                    }
#pragma unroll
                    for (int nn = 0; nn < kWarpN / 16; ++nn) {
                        uint32_t bk[4];
                        int key = wn0 + nn * 16 + (lane % 8) + (lane / 16) * 8;
                        int col = kk * 16 + ((lane / 8) % 2) * 8;
                        ldmatrix_x4(bk, smem_u32(sKs + key * kStride + col));
#pragma unroll
                        for (int mt = 0; mt < kMT; ++mt) {
                            Mma<T>::run(s[mt][2 * nn], a[mt], bk[0], bk[1]);
                            Mma<T>::run(s[mt][2 * nn + 1], a[mt], bk[2], bk[3]);
                        }
                    }
                }

                // Scores -> softmax numerators, in copies chosen per block (SoftmaxMode): fast
                // (block fully visible, no mask, no softcap: one multiply, one add, one ex2 per
                // score), bounds (causal diagonal, windows, sequence end: plus a compare and
                // select), bias (a staged key-padding mask: plus one shared-memory float2 per
                // eight scores and an FMA, with or without the compares) and general (softcap, or
                // masks that vary per row, loaded per score). Keeping the element checks out of
                // the hot copies keeps the hot loop small (instruction-fetch stalls were 43% of
                // all stalls when every score carried its mask branches; H200, ncu). The general
                // copy stays one copy: one per mask kind (no switch per score) made ptxas spill
                // 2-7x more at D = 128 (kernels/NOTES.md, version 8).
                const int key0 = n * kBlockN;
                const bool plain = p.mask_kind == kMaskNone && p.softcap == 0.f;
                const bool fast =
                    plain && pre > 0.f && key0 >= lo_last && key0 + kBlockN <= hi_first;
                // Every row sees every key of the block below kv_end (keys past it are -inf
                // in the staged bias).
                const bool bias_inside =
                    key0 >= lo_last && min(key0 + kBlockN, kv_end) <= hi_first;
                auto softmax = [&](auto mode_tag) {
                    constexpr int kMode = decltype(mode_tag)::value;
                    constexpr bool kGeneral = kMode == kModeGeneral;
                    constexpr bool kBiased = kMode == kModeBias || kMode == kModeBiasBounds;
                    constexpr bool kCompare = kMode == kModeBounds || kMode == kModeBiasBounds;
                    // Paths that may add a mask take x - m before the `post` multiply (natural
                    // units with an additive mask, see `pre`).
                    constexpr bool kMasked = kGeneral || kBiased;
                    auto out_of_bounds = [&](int ri, int key) {
                        return key < row_lo_k[ri] || key >= row_hi_k[ri];
                    };
                    if constexpr (kBiased) {
                        // x = s * pre + bias: the bias of keys 2 t4 and 2 t4 + 1 of n8 tile j
                        // serves the 2 kMT rows this thread holds.
                        const float* bias = reinterpret_cast<const float*>(sKs);
#pragma unroll
                        for (int j = 0; j < kNT; ++j) {
                            const int kb = wn0 + j * 8 + 2 * t4;
                            const float2 bj =
                                *reinterpret_cast<const float2*>(bias + key_bias_index<Cfg>(kb));
#pragma unroll
                            for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
                                for (int e = 0; e < 4; ++e) {
                                    float x = fmaf(s[mt][j][e], pre, (e & 1) ? bj.y : bj.x);
                                    if constexpr (kCompare) {
                                        if (out_of_bounds(2 * mt + e / 2, key0 + kb + (e & 1)))
                                            x = -INFINITY;
                                    }
                                    s[mt][j][e] = x;
                                }
                            }
                        }
                    } else {
                        // Mask offsets of this thread's rows, once per block rather than per
                        // score (the per-score query/head division made masked models run at
                        // ~20 TFLOP/s, BERT-base fp16 on an H200). A key-padding mask
                        // ([B|1, 1, 1, T]) has one offset for every row.
                        int64_t rbase[kGeneral ? kR : 1];
                        if constexpr (kGeneral) {
#pragma unroll
                            for (int ri = 0; ri < kR; ++ri) {
                                rbase[ri] = b * p.m_stride[0];
                                if (!key_mask) {
                                    const int m = min(row_m_of(ri), p.m_rows - 1);
                                    const int i = m / p.group;
                                    const int h = kvh * p.group + (m - i * p.group);
                                    rbase[ri] += h * p.m_stride[1] + (int64_t)i * p.m_stride[2];
                                }
                            }
                        }
#pragma unroll
                        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
                            for (int j = 0; j < kNT; ++j) {
#pragma unroll
                                for (int e = 0; e < 4; ++e) {
                                    // The fast path keeps raw scores: the scale is folded into
                                    // the exp2's FFMA below (pre > 0 there, so max commutes).
                                    float x = kMode == kModeFast ? s[mt][j][e] : s[mt][j][e] * pre;
                                    const int ri = 2 * mt + e / 2;
                                    const int key = key0 + wn0 + j * 8 + 2 * t4 + (e & 1);
                                    if constexpr (kMode == kModeBounds) {
                                        x = out_of_bounds(ri, key) ? -INFINITY : x;
                                    }
                                    if constexpr (kGeneral) {
                                        if (p.softcap > 0.f) x = cap_out * tanhf(x / p.softcap);
                                        if (out_of_bounds(ri, key)) {
                                            x = -INFINITY;
                                        } else if (p.mask_kind != kMaskNone) {
                                            const int64_t idx = (key_mask ? rbase[0] : rbase[ri]) +
                                                                (int64_t)key * p.m_stride[3];
                                            x += mask_value<T>(p.mask, p.mask_kind, idx);
                                        }
                                    }
                                    s[mt][j][e] = x;
                                }
                            }
                        }
                    }
                    // Online softmax: running max/sum per row; the sum stays per-thread until
                    // the end. The fast and bounds paths have no additive mask, so post == 1.
                    float alphas[kR];
                    bool moved = false;
#pragma unroll
                    for (int ri = 0; ri < kR; ++ri) {
                        const int mt = ri / 2, r = ri % 2;
                        float mx = -INFINITY;
#pragma unroll
                        for (int j = 0; j < kNT; ++j)
                            mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
                        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                        if constexpr (kMode == kModeFast) mx *= pre;
                        const float m_new = fmaxf(row_m[ri], mx);
                        moved |= m_new != row_m[ri];
                        const float m_use = m_new == -INFINITY ? 0.f : m_new;
                        const float alpha = kMasked ? fast_exp2((row_m[ri] - m_use) * post)
                                                    : fast_exp2(row_m[ri] - m_use);
                        row_m[ri] = m_new;
                        float sum = 0.f;
#pragma unroll
                        for (int j = 0; j < kNT; ++j) {
                            float p0, p1;
                            if constexpr (kMasked) {
                                p0 = fast_exp2((s[mt][j][2 * r] - m_use) * post);
                                p1 = fast_exp2((s[mt][j][2 * r + 1] - m_use) * post);
                            } else if constexpr (kMode == kModeFast) {
                                p0 = fast_exp2(fmaf(s[mt][j][2 * r], pre, -m_use));
                                p1 = fast_exp2(fmaf(s[mt][j][2 * r + 1], pre, -m_use));
                            } else {
                                p0 = fast_exp2(s[mt][j][2 * r] - m_use);
                                p1 = fast_exp2(s[mt][j][2 * r + 1] - m_use);
                            }
                            s[mt][j][2 * r] = p0;
                            s[mt][j][2 * r + 1] = p1;
                            sum += p0 + p1;
                        }
                        row_l[ri] = row_l[ri] * alpha + sum;
                        alphas[ri] = alpha;
                    }
                    // Rescale O only when some row's max moved (warp-uniform vote): once the
                    // running max settles, most KV blocks skip kMT * kD / 2 multiplies a thread.
                    if (__any_sync(0xffffffff, moved)) {
#pragma unroll
                        for (int ri = 0; ri < kR; ++ri) {
                            const int mt = ri / 2, r = ri % 2;
#pragma unroll
                            for (int j = 0; j < kDT; ++j) {
                                o[mt][j][2 * r] *= alphas[ri];
                                o[mt][j][2 * r + 1] *= alphas[ri];
                            }
                        }
                    }
                };
                if (fast) {
                    softmax(Tag<kModeFast>{});
                } else if (plain) {
                    softmax(Tag<kModeBounds>{});
                } else if (stage_bias) {
                    if (bias_inside) {
                        softmax(Tag<kModeBias>{});
                    } else {
                        softmax(Tag<kModeBiasBounds>{});
                    }
                } else {
                    softmax(Tag<kModeGeneral>{});
                }

                // O += P V, P straight from the S accumulators (C layout of two n8 tiles = A
                // layout of one k16 slice); each V fragment feeds kMT MMAs.
#pragma unroll
                for (int kk = 0; kk < kWarpN / 16; ++kk) {
                    uint32_t a[kMT][4];
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt) {
                        a[mt][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                        a[mt][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                        a[mt][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                        a[mt][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                    }
#pragma unroll
                    for (int dn = 0; dn < kD / 16; ++dn) {
                        uint32_t bv[4];
                        int key = wn0 + kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
                        int col = dn * 16 + (lane / 16) * 8;
                        ldmatrix_x4_trans(bv, smem_u32(sVs + key * kStride + col));
#pragma unroll
                        for (int mt = 0; mt < kMT; ++mt) {
                            Mma<T>::run(o[mt][2 * dn], a[mt], bv[0], bv[1]);
                            Mma<T>::run(o[mt][2 * dn + 1], a[mt], bv[2], bv[3]);
                        }
                    }
                }
            }
            // The stage of the block issued above was last read in the previous iteration,
            // which every warp finished before this iteration's first barrier; its readers wait
            // for a later barrier.
            if (stage_bias && it + kStages - 1 < count)
                bias_store(n - (kStages - 1), (it + kStages - 1) % kStages, bias_next);
            if constexpr (kStages == 2) __syncthreads();
        }
    }

    // Epilogue: finish the row sums across the quad, normalize, store.
#pragma unroll
    for (int ri = 0; ri < kR; ++ri) {
        float l = row_l[ri];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        row_l[ri] = l;
    }
    if constexpr (Cfg::kSplitN) {
        // Merge the warps' partial states (each saw a quarter of every KV block) into warp 0:
        // m = max m_w, l = sum l_w 2^(m_w - m), O = sum O_w 2^(m_w - m), in the units of `post`.
        static_assert(Cfg::kWarps * 16 * (kD + 2) * sizeof(float) <=
                          2 * Cfg::kStages * Cfg::kSmemKV * sizeof(T),
                      "merge buffer fits in the K/V stages");
        __syncthreads();  // every warp is done with the K/V stages
        float* red_o = reinterpret_cast<float*>(sK);          // [warps][16][kD]
        float* red_ml = red_o + Cfg::kWarps * 16 * kD;          // [warps][16][2]
        if (warp != 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = g + 8 * r;
                float* dst = red_o + (warp * 16 + row) * kD;
#pragma unroll
                for (int j = 0; j < kDT; ++j) {
                    dst[j * 8 + 2 * t4] = o[0][j][2 * r];
                    dst[j * 8 + 2 * t4 + 1] = o[0][j][2 * r + 1];
                }
                if (t4 == 0) {
                    red_ml[(warp * 16 + row) * 2] = row_m[r];
                    red_ml[(warp * 16 + row) * 2 + 1] = row_l[r];
                }
            }
        }
        __syncthreads();
        if (warp != 0) return;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = g + 8 * r;
            float m_tot = row_m[r];
            for (int w = 1; w < Cfg::kWarps; ++w) m_tot = fmaxf(m_tot, red_ml[(w * 16 + row) * 2]);
            const float m_use = m_tot == -INFINITY ? 0.f : m_tot;
            const float f0 = fast_exp2((row_m[r] - m_use) * post);
            float l = row_l[r] * f0;
#pragma unroll
            for (int j = 0; j < kDT; ++j) {
                o[0][j][2 * r] *= f0;
                o[0][j][2 * r + 1] *= f0;
            }
            for (int w = 1; w < Cfg::kWarps; ++w) {
                const float fw = fast_exp2((red_ml[(w * 16 + row) * 2] - m_use) * post);
                l += red_ml[(w * 16 + row) * 2 + 1] * fw;
                const float* src = red_o + (w * 16 + row) * kD;
#pragma unroll
                for (int j = 0; j < kDT; ++j) {
                    o[0][j][2 * r] += src[j * 8 + 2 * t4] * fw;
                    o[0][j][2 * r + 1] += src[j * 8 + 2 * t4 + 1] * fw;
                }
            }
            row_m[r] = m_tot;
            row_l[r] = l;
        }
    }
    if (!warp_active) return;
#pragma unroll
    for (int ri = 0; ri < kR; ++ri) {
        const int m = row_m_of(ri);
        if (m >= p.m_rows) continue;
        const int mt = ri / 2, r = ri % 2;
        const float l = row_l[ri];
        const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: zeros, never NaN
        const int i = m / p.group, h = kvh * p.group + m % p.group;
        if (p.write_accum) {
            const int64_t row =
                (((int64_t)split * p.batch + b) * p.q_heads + h) * p.q_len + i;
            float* dst = p.o_accum + row * p.dv;
#pragma unroll
            for (int j = 0; j < kDT; ++j) {
                int col = j * 8 + 2 * t4;
                if (col < p.dv) {
                    *reinterpret_cast<float2*>(dst + col) =
                        make_float2(o[mt][j][2 * r] * inv, o[mt][j][2 * r + 1] * inv);
                }
            }
            if (t4 == 0) {
                float m_nat = row_m[ri] * (additive ? 1.f : 0.6931471805599453f);
                p.lse_accum[row] = l > 0.f ? m_nat + logf(l) : -INFINITY;
            }
        } else {
            T* dst = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] +
                     (int64_t)i * p.o_stride[2];
#pragma unroll
            for (int j = 0; j < kDT; ++j) {
                int col = j * 8 + 2 * t4;
                if (col < p.dv)
                    Mma<T>::store2(dst + col, o[mt][j][2 * r] * inv, o[mt][j][2 * r + 1] * inv);
            }
        }
    }
}

}  // namespace flash_ort
