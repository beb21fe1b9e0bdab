// flash_fwd_sm90.cuh: the Hopper (sm_90a) forward kernel. Same algorithm and row mapping as
// flash_fwd_kernel.cuh (FlashAttention-2: online softmax in registers, P kept in registers for
// P·V, GQA rows packed per KV head, KV blocks visited last to first, split-KV partials), but the
// two products run on warpgroup MMAs (wgmma.mma_async): S = Q·Kᵀ with both operands read by the
// tensor cores straight from shared memory, O += P·V with P from registers and V from shared
// memory. Each warpgroup owns 64 query rows; a CTA has one or two of them sharing the K/V tiles.
//
// Shared memory holds every tile in wgmma's 128-byte-swizzle layout: a [rows, kD] tile is kD/64
// panels of [rows, 64] elements; row r of a panel is 128 bytes whose 16-byte chunks are stored at
// chunk ^ (r % 8). K and Q are read K-major (head dim contiguous), V MN-major (also head dim
// contiguous: the transpose is the descriptor's, no data moves).
//
// Scope (the launcher falls back to the mma.sync kernel otherwise): padded head size 64 or 128,
// more than 16 rows per (batch, KV head), no softcap, no mask or a key-padding mask (one row of
// additive/bool values per batch, staged per KV block in shared memory as fp32).
#pragma once

#include "flash_fwd_kernel.cuh"
#include "wgmma_ops.cuh"

namespace flash_ort {
namespace sm90 {

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Ties the registers to this point of the program: the compiler may not move reads or writes of
// accumulators across it, so nothing touches them while a wgmma that owns them is in flight.
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// cp.async writes shared memory through the generic proxy; wgmma reads it through the async
// proxy. This fence orders the former before the latter (with the barrier that follows it).
__device__ __forceinline__ void fence_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Byte offset of 16-byte chunk `chunk` (of kD / 8) of row r in a swizzled [kRows, kD] tile.
template <int kRows>
__device__ __forceinline__ uint32_t swizzled(int r, int chunk) {
    const int panel = chunk / 8, c = chunk % 8;
    return panel * kRows * 128 + r * 128 + ((c ^ (r & 7)) << 4);
}

// wgmma shared-memory matrix descriptor, 128-byte swizzle, offsets in bytes, as a low word
// (start address >> 4, lbo >> 4 at bit 16) and a high word that is the same for every operand
// here (sbo = 1024 >> 4, the 128-byte swizzle mode at bit 62):
//   K-major (Q, K, P): sbo = 1024 (next 8 rows); lbo unused inside one 128-byte row.
//   MN-major (V):      lbo = distance between 64-column panels, sbo = 1024 (next 8 keys).
// Descriptors of one tile differ only in the start address, and shared memory is below 256 KB,
// so the descriptor of base + off is the base's low word + off / 16: one uniform add per wgmma
// instead of rebuilding each descriptor.
__device__ __forceinline__ uint32_t desc_lo(uint32_t addr, uint32_t lbo) {
    return (addr >> 4) | ((lbo >> 4) << 16);
}
__device__ __forceinline__ uint64_t desc_of(uint32_t lo) {
    return ((uint64_t)((1024u >> 4) | (1u << 30)) << 32) | lo;
}
// `x` broadcast from lane 0: a value the compiler may keep in a uniform register (the caller
// knows it is the same across the warp).
__device__ __forceinline__ uint32_t warp_uniform(uint32_t x) {
    return __shfl_sync(0xffffffff, x, 0);
}

// S = Q Kᵀ for one warpgroup's 64 rows: kD / 16 wgmmas of m64 x kBlockN x k16 from the base words
// of this warpgroup's Q rows and of K's stage (both K-major), committed, not waited for.
template <int kD, int kBlockM, int kBlockN, typename T>
__device__ __forceinline__ void wgmma_qk(float (&s)[kBlockN / 2], uint32_t q_lo, uint32_t k_lo) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t col = (kk % 4) * 32;  // bytes into the panel's 128-byte rows
        const uint64_t da = desc_of(q_lo + (((kk / 4) * kBlockM * 128 + col) >> 4));
        const uint64_t db = desc_of(k_lo + (((kk / 4) * kBlockN * 128 + col) >> 4));
        wgmma::Ops<kBlockN, T>::ss(s, da, db, kk > 0 ? 1 : 0);
    }
    wg_commit();
}
// O += P V: P in the accumulator layout is the register A operand of m64nNk16 (two n8 tiles of S
// = one k16 slice), V's stage (base word v_lo) an MN-major operand; committed, not waited for.
template <int kD, int kBlockN, typename T>
__device__ __forceinline__ void wgmma_pv(float (&o)[kD / 2], const uint32_t (&pa)[kBlockN / 16][4], uint32_t v_lo) {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const uint64_t db = desc_of(v_lo + ((kk * 16 * 128) >> 4));
        wgmma::Ops<kD, T>::rs(o, pa[kk], db, 1);
    }
    wg_commit();
}

template <int kD_, int kBlockN_, int kWarpgroups_, typename T_>
struct Config {
    static constexpr int kD = kD_;
    // One or two warpgroups of 64 rows each. With one, several CTAs share an SM and their
    // softmax and MMA phases interleave freely; with two, K/V tiles are loaded once per 128 rows
    // but both warpgroups move in lockstep through the per-block barriers.
    static constexpr int kWarpgroups = kWarpgroups_;
    static constexpr int kBlockM = 64 * kWarpgroups;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kThreads = 128 * kWarpgroups;
    static constexpr int kMinBlocks = kWarpgroups == 1 ? 2 : 1;
    static_assert(kD % 64 == 0, "the swizzled layout uses whole 64-column panels");
    static_assert(kBlockN == 64 || kBlockN == 128, "S accumulators: m64n64 or m64n128");
    static constexpr int kQBytes = kBlockM * kD * 2;
    static constexpr int kKVBytes = kBlockN * kD * 2;
    static constexpr int kBiasBytes = 2 * kBlockN * 4;  // double-buffered key bias
    // + 1024: the dynamic shared memory base is only 16-byte aligned; the swizzle needs 1024.
    static constexpr size_t kSmemBytes = kQBytes + 4 * kKVBytes + kBiasBytes + 1024;
    using T = T_;
};

// Loads a [kRows, kD] tile into swizzled shared memory at `dst`; row r comes from row_ptr(r)
// (nullptr = zero row), columns >= dcols are zero.
template <typename Cfg, int kRows, typename RowPtr>
__device__ __forceinline__ void load_tile(uint32_t dst, RowPtr row_ptr, int dcols, const void* dummy) {
    constexpr int kChunksPerRow = Cfg::kD / 8;
    constexpr int kChunks = kRows * kChunksPerRow;
    static_assert(kChunks % Cfg::kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll 4
    for (int it = 0; it < kChunks / Cfg::kThreads; ++it) {
        const int c = threadIdx.x + it * Cfg::kThreads;
        const int r = c / kChunksPerRow, chunk = c % kChunksPerRow;
        const typename Cfg::T* src = row_ptr(r);
        const bool valid = src != nullptr && chunk * 8 < dcols;
        cp_async16(dst + swizzled<kRows>(r, chunk), valid ? (const void*)(src + chunk * 8) : dummy, valid);
    }
}

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) flash_fwd_sm90_kernel(const __grid_constant__ FwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using T = typename Cfg::T;
    constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
    constexpr int kNT = kBlockN / 8;  // n8 column tiles of S
    constexpr int kDT = kD / 8;       // n8 column tiles of O
    constexpr float kLog2e = 1.4426950408889634f;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    const uint32_t sQ = base;
    const uint32_t sK = sQ + Cfg::kQBytes;       // 2 stages
    const uint32_t sV = sK + 2 * Cfg::kKVBytes;  // 2 stages
    float* s_bias = reinterpret_cast<float*>(smem_raw + (base - raw) + Cfg::kQBytes + 4 * Cfg::kKVBytes);

    const int tid = threadIdx.x;
    // Broadcast from lane 0 so the compiler knows it is warp-uniform: the descriptors built from
    // the warpgroup index then live in uniform registers (see desc_lo).
    const int warp = __shfl_sync(0xffffffff, tid / 32, 0), lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const int wg = warp / 4;  // warpgroup: rows [64 wg, 64 wg + 64) of the CTA

    const int m_block = gridDim.x - 1 - blockIdx.x;  // heavy (late) row blocks first
    const int split = blockIdx.y;
    const int bh = blockIdx.z;
    const int b = bh / p.kv_heads, kvh = bh % p.kv_heads;
    const int m0 = m_block * kBlockM;
    const int m_end = min(m0 + kBlockM, p.m_rows);
    const int wg_m0 = m0 + wg * 64;
    const bool wg_active = wg_m0 < p.m_rows;  // uniform per warpgroup, as wgmma requires

    const KeyBounds kb(p, b);
    const int kv_end = kb.kv_end;
    const BlockRange range = block_range<kBlockN>(p, kb, m0, m_end, split);
    const int n_begin = range.n_begin, n_end = range.n_end;
    const int lo_last = range.lo_last, hi_first = range.hi_first;

    // This thread's two rows: g and g + 8 of its warp's 16 (the wgmma accumulator layout).
    auto row_m_of = [&](int r) { return wg_m0 + (warp % 4) * 16 + g + 8 * r; };
    int row_lo_k[2], row_hi_k[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = min(row_m_of(r), p.m_rows - 1) / p.group;
        row_lo_k[r] = kb.lo(i);
        row_hi_k[r] = kb.hi(i);
    }

    const T* q = static_cast<const T*>(p.q);
    const T* kbase = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
    const T* vbase = static_cast<const T*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1];

    float o[kD / 2];
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) o[i] = 0.f;
    float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};

    const bool has_mask = p.mask_kind != kMaskNone;  // a key-padding mask (launcher's scope)
    const bool additive = p.mask_kind >= kMaskF32;
    // As in flash_fwd_kernel.cuh: log2 units with the scale folded in, unless an additive mask
    // (which may hold -FLT_MAX) asks for natural units until after the max is subtracted.
    const float pre = additive ? p.scale : p.scale * kLog2e;
    const float post = additive ? kLog2e : 1.f;

    if (n_begin < n_end) {
        load_tile<Cfg, kBlockM>(
            sQ,
            [&](int r) -> const T* {
                const int m = m0 + r;
                if (m >= p.m_rows) return nullptr;
                const int i = m / p.group, h = kvh * p.group + m % p.group;
                return q + b * p.q_stride[0] + h * p.q_stride[1] + (int64_t)i * p.q_stride[2];
            },
            p.d, p.q);
        auto load_k = [&](int n, int stage) {
            const int key0 = n * kBlockN;
            load_tile<Cfg, kBlockN>(
                sK + stage * Cfg::kKVBytes,
                [&](int r) -> const T* {
                    const int key = key0 + r;
                    return key < kv_end ? kbase + (int64_t)key * p.k_stride[2] : nullptr;
                },
                p.d, p.k);
        };
        auto load_v = [&](int n, int stage) {
            const int key0 = n * kBlockN;
            load_tile<Cfg, kBlockN>(
                sV + stage * Cfg::kKVBytes,
                [&](int r) -> const T* {
                    const int key = key0 + r;
                    return key < kv_end ? vbase + (int64_t)key * p.v_stride[2] : nullptr;
                },
                p.dv, p.v);
        };
        // One key's mask value (thread tid < kBlockN owns key tid of a block). Keys past the end
        // are cut by the bounds check, so their value does not matter.
        auto load_bias = [&](int n) -> float {
            const int key = n * kBlockN + tid;
            if (!has_mask || tid >= kBlockN || key >= kv_end) return 0.f;
            return mask_value<T>(p.mask, p.mask_kind, b * p.m_stride[0] + (int64_t)key * p.m_stride[3]);
        };

        float s[kBlockN / 2];          // scores, then softmax numerators, of the current block
        uint32_t pa[kBlockN / 16][4];  // P of the block whose P·V is in flight
        // S = Q Kᵀ on K stage `stage`: kD / 16 wgmmas of m64 x kBlockN x k16 (not waited for).
        const uint32_t q_lo = desc_lo(warp_uniform(sQ + wg * 64 * 128), 16);
        auto issue_s = [&](int stage) {
            wgmma_qk<kD, kBlockM, kBlockN, T>(s, q_lo, desc_lo(warp_uniform(sK + stage * Cfg::kKVBytes), 16));
        };
        // O += P V on V stage `stage`.
        auto issue_pv = [&](int stage) {
            wgmma_pv<kD, kBlockN, T>(o, pa, desc_lo(warp_uniform(sV + stage * Cfg::kKVBytes), kBlockN * 128));
        };
        // Scores of block n -> softmax numerators in s, running max/sum updated; returns through
        // `alphas` the factors O must be scaled by (applied once O is no longer in flight).
        auto softmax = [&](int n, int bias_buf, float (&alphas)[2]) -> bool {
            const int key0 = n * kBlockN;
            const bool inside = key0 >= lo_last && key0 + kBlockN <= hi_first;
            const float* bias = s_bias + bias_buf * kBlockN;
            // kMode: 0 fast (no mask, block fully visible, scale folded into the exp2's FFMA),
            // 1 bounds (causal diagonal, windows, sequence end), 2 mask bias, 3 bias + bounds.
            auto run = [&](auto mode_tag) -> bool {
                constexpr int kMode = decltype(mode_tag)::value;
                constexpr bool kBounds = kMode == 1 || kMode == 3;
                constexpr bool kBias = kMode >= 2;
                if constexpr (kMode != 0) {
#pragma unroll
                    for (int j = 0; j < kNT; ++j) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int kl = j * 8 + 2 * t4 + (e & 1);  // key within the block
                            float x = s[j * 4 + e] * pre;
                            if constexpr (kBias) x += bias[kl];
                            if constexpr (kBounds) {
                                const int r = e / 2, key = key0 + kl;
                                x = (key < row_lo_k[r] || key >= row_hi_k[r]) ? -INFINITY : x;
                            }
                            s[j * 4 + e] = x;
                        }
                    }
                }
                bool moved = false;
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int j = 0; j < kNT; ++j) mx = fmaxf(mx, fmaxf(s[j * 4 + 2 * r], s[j * 4 + 2 * r + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                    if constexpr (kMode == 0) mx *= pre;
                    const float m_new = fmaxf(row_m[r], mx);
                    moved |= m_new != row_m[r];
                    const float m_use = m_new == -INFINITY ? 0.f : m_new;
                    alphas[r] = fast_exp2((row_m[r] - m_use) * post);
                    row_m[r] = m_new;
                    float sum = 0.f;
#pragma unroll
                    for (int j = 0; j < kNT; ++j) {
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            float& x = s[j * 4 + 2 * r + c];
                            if constexpr (kMode == 0) {
                                x = fast_exp2(fmaf(x, pre, -m_use));
                            } else {
                                x = fast_exp2((x - m_use) * post);
                            }
                            sum += x;
                        }
                    }
                    row_l[r] = row_l[r] * alphas[r] + sum;
                }
                return __any_sync(0xffffffff, moved);
            };
            if (!has_mask) {
                return inside && pre > 0.f ? run(std::integral_constant<int, 0>{})
                                           : run(std::integral_constant<int, 1>{});
            }
            return inside ? run(std::integral_constant<int, 2>{}) : run(std::integral_constant<int, 3>{});
        };
        auto rescale_o = [&](const float (&alphas)[2]) {
#pragma unroll
            for (int j = 0; j < kDT; ++j) {
                o[j * 4 + 0] *= alphas[0];
                o[j * 4 + 1] *= alphas[0];
                o[j * 4 + 2] *= alphas[1];
                o[j * 4 + 3] *= alphas[1];
            }
        };
        auto pack_p = [&]() {
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
                pa[kk][0] = Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
                pa[kk][1] = Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
                pa[kk][2] = Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
                pa[kk][3] = Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
            }
        };

        // Software pipeline over blocks it = 0 .. count-1 (block n = n_end - 1 - it), K and V in
        // two stages each: iteration it issues S_it = Q K_itᵀ and O += P_{it-1} V_{it-1}
        // together, computes the softmax of S_it while P·V runs on the tensor cores, and then
        // rescales O. Loads of K_{it+1} and V_it go out at the start of iteration it and are
        // waited for at the start of it + 1; the barrier there also means every warp is done
        // with the stages they overwrite (S_{it-1} and P·V_{it-2} finished in iteration it - 1).
        const int count = n_end - n_begin;
        load_k(n_end - 1, 0);
        cp_async_commit();
        float bias_next = load_bias(n_end - 1);
        // Start of block `it`: its mask values to shared memory, its K (and the previous block's
        // V) landed and visible to the tensor cores, then the next loads go out.
        auto begin_block = [&](int it) {
            const int n = n_end - 1 - it;
            if (has_mask && tid < kBlockN) s_bias[(it & 1) * kBlockN + tid] = bias_next;
            cp_async_wait<0>();
            fence_async_smem();
            __syncthreads();
            if (it + 1 < count) load_k(n - 1, (it + 1) & 1);
            load_v(n, it & 1);
            cp_async_commit();
            // The next block's mask values load while this block computes.
            if (has_mask && it + 1 < count) bias_next = load_bias(n - 1);
        };
        // Every warpgroup computes, even one whose rows are all past the end (zero Q rows,
        // results not stored): a branch around wgmma makes ptxas serialize all of them. The
        // first block is peeled so that no wgmma wait sits on a data-dependent path.
        if (count > 0) {
            begin_block(0);
            wg_fence();
            issue_s(0);
            wg_wait<0>();
            pin(s);
            float alphas[2];
            softmax(n_end - 1, 0, alphas);  // O is still zero: nothing to rescale
            pack_p();
        }
        for (int it = 1; it < count; ++it) {
            begin_block(it);
            wg_fence();
            issue_s(it & 1);
            issue_pv((it - 1) & 1);
            wg_wait<1>();
            pin(s);
            float alphas[2];
            const bool moved = softmax(n_end - 1 - it, it & 1, alphas);
            wg_wait<0>();
            pin(o);
            if (moved) rescale_o(alphas);
            pack_p();
        }
        // The last block's P·V.
        cp_async_wait<0>();
        fence_async_smem();
        __syncthreads();
        if (count > 0) {
            wg_fence();
            issue_pv((count - 1) & 1);
            wg_wait<0>();
            pin(o);
        }
    }

    if (!wg_active) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_l[r];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        row_l[r] = l;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int m = row_m_of(r);
        if (m >= p.m_rows) continue;
        const float l = row_l[r];
        const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: zeros, never NaN
        const int i = m / p.group, h = kvh * p.group + m % p.group;
        if (p.write_accum) {
            const int64_t row = (((int64_t)split * p.batch + b) * p.q_heads + h) * p.q_len + i;
            float* dst = p.o_accum + row * p.dv;
#pragma unroll
            for (int j = 0; j < kDT; ++j) {
                const int col = j * 8 + 2 * t4;
                if (col < p.dv)
                    *reinterpret_cast<float2*>(dst + col) =
                        make_float2(o[j * 4 + 2 * r] * inv, o[j * 4 + 2 * r + 1] * inv);
            }
            if (t4 == 0) {
                const float m_nat = row_m[r] * (additive ? 1.f : 0.6931471805599453f);
                p.lse_accum[row] = l > 0.f ? m_nat + logf(l) : -INFINITY;
            }
        } else {
            T* dst = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] +
                     (int64_t)i * p.o_stride[2];
#pragma unroll
            for (int j = 0; j < kDT; ++j) {
                const int col = j * 8 + 2 * t4;
                if (col < p.dv) Mma<T>::store2(dst + col, o[j * 4 + 2 * r] * inv, o[j * 4 + 2 * r + 1] * inv);
            }
        }
    }
#else
    __trap();  // launched only on sm_90 devices, from a build with sm_90a code
#endif
}

}  // namespace sm90
}  // namespace flash_ort
