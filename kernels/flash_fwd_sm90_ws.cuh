// flash_fwd_sm90_ws.cuh: the warp-specialized Hopper (sm_90a) forward kernel. Same math and row
// mapping as flash_fwd_sm90.cuh (wgmma for S = Q·Kᵀ from shared memory and O += P·V with P from
// registers, online softmax in registers, S of block j and P·V of block j-1 in flight together),
// but the CTA is split by role, as in FlashAttention-3:
//   - warpgroup 0 is the producer: one warp issues TMA copies of whole K/V blocks (one thread, no
//     address math per element, swizzle done by the copy engine) into kStages-deep rings and
//     stages the key-padding mask bias, then gives most of its registers away (setmaxnreg);
//   - warpgroups 1..kConsumers own 64 query rows each and only compute. They meet the producer
//     through mbarriers (full: the block landed; empty: every consumer warp is done with it), never
//     through a CTA-wide barrier, so the two consumer warpgroups drift apart and, with kPingPong,
//     take turns on the tensor cores: one issues its GEMMs while the other runs its softmax.
// The one block that ends inside a batch's nonpad_kv_seqlen (keys past it are real memory that
// may hold anything, so they must be zeros, not just unread) is copied with cp.async zero-fill by
// the producer warp instead of TMA.
#pragma once

#include <cuda.h>

#include "flash_fwd_sm90.cuh"

namespace flash_ort {
namespace sm90 {

// TMA descriptors of K and V as 4D tensors (dim, seq, head, batch), built on the host per call;
// and, for the persistent kernel, of Q as (dim, head, seq, batch): one box of `group` heads x
// kBlockM / group queries is a tile's rows in GQA order (row m = query m / group, head m % group).
struct alignas(64) KVMaps {
    CUtensorMap k;
    CUtensorMap v;
    CUtensorMap q;
};

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
// Blocks until the barrier's phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    do {
        asm volatile(
            "{\n.reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// A [64 columns, rows] box of a 4D tensor map to shared memory; completion counted in bytes on `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                            int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, "
        "%4, %5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int kRegs>
__device__ __forceinline__ void regs_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void regs_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kD_, int kBlockN_, int kConsumers_, int kStages_, bool kPingPong_, typename T_,
          bool kPersistent_ = false>
struct WsConfig {
    static constexpr int kD = kD_;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kConsumers = kConsumers_;  // warpgroups of 64 query rows
    static constexpr int kStages = kStages_;        // depth of the K ring and of the V ring
    static constexpr bool kPingPong = kPingPong_ && kConsumers == 2;
    static constexpr int kBlockM = 64 * kConsumers;
    static constexpr int kThreads = 128 * (kConsumers + 1);
    // Registers per thread after the split (a multiple of 8; 128 x producer + consumers x 128 x
    // consumer <= 64K).
    // One consumer (decode tiles): 256 threads have all the registers they can use, no exchange.
    static constexpr bool kSetRegs = kConsumers > 1;
    static constexpr int kProducerRegs = kConsumers == 2 ? 24 : 32;
    static constexpr int kConsumerRegs = kConsumers == 2 ? 240 : 160;
    static_assert(kD % 64 == 0 && (kBlockN == 64 || kBlockN == 128), "whole swizzled panels");
    // Persistent: one CTA per SM walks tiles (static stride), its copy warp brings each tile's Q
    // by TMA into one of two buffers while the consumers still work on the previous tile, so no
    // tile pays a launch, a Q load or a K/V pipeline fill of its own.
    static constexpr bool kPersistent = kPersistent_;
    static constexpr int kQBufs = kPersistent ? 2 : 1;
    static constexpr int kQBytes = kBlockM * kD * 2;
    static constexpr int kKVBytes = kBlockN * kD * 2;
    // Per stage: the block's mask bias (fp32); after all stages one flag per stage (1.f: the
    // block's bias is all zeros, and the consumers take the bias-free path); + 2 floats a stage
    // keep the barriers 8-byte aligned.
    static constexpr int kBiasBytes = kStages * (kBlockN + 2) * 4;
    static constexpr int kBarBytes = (4 * kStages + 2 * kQBufs) * 8;
    // + 1024: the dynamic shared memory base is only 16-byte aligned; the swizzle needs 1024.
    static constexpr size_t kSmemBytes =
        kQBufs * kQBytes + 2 * kStages * kKVBytes + kBiasBytes + kBarBytes + 1024;
    using T = T_;
};

// One tile of work: query rows [m0, m_end) of one (batch, KV head), one split of its keys. Tiles
// are numbered row block fastest (the heaviest, latest rows first), then split, then (batch, KV
// head), so the CTAs that run together share one head's K/V through L2.
struct WsTile {
    int b, kvh, split, m0, m_end;
    __device__ __forceinline__ WsTile(const FwdParams& p, int t, int n_m, int block_m) {
        const int mb = n_m - 1 - t % n_m;
        const int rest = t / n_m;
        split = rest % p.num_splits;
        const int bh = rest / p.num_splits;
        b = bh / p.kv_heads;
        kvh = bh % p.kv_heads;
        m0 = mb * block_m;
        m_end = min(m0 + block_m, p.m_rows);
    }
};

// A tile with the keys its batch has and the KV blocks its rows visit (count of them, walked down
// from range.n_end - 1): what the copy warp, the mask warp and the consumers each need of it.
template <int kBlockN>
struct WsWork {
    WsTile w;
    KeyBounds kb;
    BlockRange range;
    int count;
    __device__ __forceinline__ WsWork(const FwdParams& p, int t, int n_m, int block_m)
        : w(p, t, n_m, block_m),
          kb(p, w.b),
          range(block_range<kBlockN>(p, kb, w.m0, w.m_end, w.split)),
          count(max(0, range.n_end - range.n_begin)) {}
};

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    flash_fwd_sm90_ws_kernel(const __grid_constant__ FwdParams p, const __grid_constant__ KVMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using T = typename Cfg::T;
    constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
    constexpr int kNT = kBlockN / 8;
    constexpr int kDT = kD / 8;
    constexpr int kConsumerWarps = 4 * Cfg::kConsumers;
    constexpr float kLog2e = 1.4426950408889634f;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    const uint32_t sQ = base;  // kQBufs buffers
    const uint32_t sK = sQ + Cfg::kQBufs * Cfg::kQBytes;
    const uint32_t sV = sK + kStages * Cfg::kKVBytes;
    const uint32_t bias_off = Cfg::kQBufs * Cfg::kQBytes + 2 * kStages * Cfg::kKVBytes;
    float* s_bias = reinterpret_cast<float*>(smem_raw + (base - raw) + bias_off);
    const uint32_t bars = base + bias_off + Cfg::kBiasBytes;
    auto full_k = [&](int s) { return bars + 8 * s; };
    auto full_v = [&](int s) { return bars + 8 * (kStages + s); };
    auto empty_k = [&](int s) { return bars + 8 * (2 * kStages + s); };
    auto empty_v = [&](int s) { return bars + 8 * (3 * kStages + s); };
    auto full_q = [&](int s) { return bars + 8 * (4 * kStages + s); };
    auto empty_q = [&](int s) { return bars + 8 * (4 * kStages + Cfg::kQBufs + s); };

    const int tid = threadIdx.x;
    // The warp index broadcast from lane 0: the compiler then knows it (and the role and warpgroup
    // derived from it) is the same for the whole warp, so shared-memory addresses built from it,
    // and the wgmma descriptors built from those, live in uniform registers.
    const int warp = __shfl_sync(0xffffffff, tid / 32, 0), lane = tid % 32;
    const int role = warp / 4;  // 0 producer, 1.. consumer warpgroups

    // The tiles of this CTA: one (its grid coordinates) or, persistent, every gridDim.x-th.
    const int n_m = (p.m_rows + kBlockM - 1) / kBlockM;
    const int num_tiles = n_m * p.num_splits * p.batch * p.kv_heads;
    const int tile_first = Cfg::kPersistent ? (int)blockIdx.x
                                            : (int)(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
    const int tile_step = Cfg::kPersistent ? (int)gridDim.x : num_tiles;
    auto work_of = [&](int t) { return WsWork<kBlockN>(p, t, n_m, kBlockM); };
    const bool has_mask = p.mask_kind != kMaskNone;

    // The key-padding mask's bias is staged by a warp of its own (warp 1), so its global-load
    // latency runs beside the K copy instead of before it. FLASH_ORT_MASK_WARP=0 (host side,
    // p.mask_warp) stages it in the copy warp, as before (A/B).
    const bool mask_warp = has_mask && p.mask_warp;
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) {
            // full_k: the copy warp's 32 lanes arrive (lane 0 with the TMA byte count), and the
            // mask warp's 32 when it stages the mask.
            mbar_init(full_k(s), mask_warp ? 64 : 32);
            mbar_init(full_v(s), 32);
            mbar_init(empty_k(s), has_mask ? 32 * kConsumerWarps : kConsumerWarps);
            mbar_init(empty_v(s), kConsumerWarps);
        }
        for (int s = 0; s < Cfg::kQBufs; ++s) {
            mbar_init(full_q(s), 1);
            mbar_init(empty_q(s), kConsumerWarps);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (role == 0) {
        // ----------------------------------------------------------------- producer
        if constexpr (Cfg::kSetRegs) regs_dec<Cfg::kProducerRegs>();
        // The mask bias of `key` as the softmax adds it; keys past the tile's batch's end read none.
        auto mask_bias = [&](const WsWork<kBlockN>& wk, int key) {
            return key < wk.kb.kv_end ? mask_value<T>(p.mask, p.mask_kind,
                                                      wk.w.b * p.m_stride[0] + (int64_t)key * p.m_stride[3])
                                      : 0.f;
        };
        // Both producer warps number the ring's blocks across all tiles of the CTA (gi), as the
        // consumers do.
        if (warp == 1 && mask_warp) {
            constexpr int kPer = kBlockN / 32;
            int gi = 0;
            for (int t = tile_first; t < num_tiles; t += tile_step) {
                const WsWork<kBlockN> wk = work_of(t);
                const BlockRange& range = wk.range;
                const int count = wk.count;
                // Block it's bias is read into registers before waiting for its stage, so the load
                // overlaps the wait.
                float next[kPer];
                auto load = [&](int it) {
                    const int key0 = (range.n_end - 1 - it) * kBlockN;
#pragma unroll
                    for (int r = 0; r < kPer; ++r) next[r] = mask_bias(wk, key0 + lane + 32 * r);
                };
                if (count > 0) load(0);
                for (int it = 0; it < count; ++it, ++gi) {
                    const int s = gi % kStages;
                    bool nz = false;
#pragma unroll
                    for (int r = 0; r < kPer; ++r) nz |= next[r] != 0.f;
                    nz = __any_sync(0xffffffff, nz);
                    mbar_wait(empty_k(s), ((gi / kStages) & 1) ^ 1);
#pragma unroll
                    for (int r = 0; r < kPer; ++r) s_bias[s * kBlockN + lane + 32 * r] = next[r];
                    if (lane == 0) s_bias[kStages * kBlockN + s] = nz ? 0.f : 1.f;
                    mbar_arrive(full_k(s));
                    if (it + 1 < count) load(it + 1);
                }
            }
            return;
        }
        if (warp != 0) return;
        int gi = 0, qi = 0;
        for (int t = tile_first; t < num_tiles; t += tile_step) {
            const WsWork<kBlockN> wk = work_of(t);
            const WsTile& w = wk.w;
            const BlockRange& range = wk.range;
            const int count = wk.count;
            const int kv_end = wk.kb.kv_end;
            if (count == 0) continue;  // the consumers write its zeros without Q
            if constexpr (Cfg::kPersistent) {
                const int qb = qi & 1;
                mbar_wait(empty_q(qb), ((qi >> 1) & 1) ^ 1);
                if (lane == 0) {
                    mbar_arrive_expect_tx(full_q(qb), Cfg::kQBytes);
#pragma unroll
                    for (int panel = 0; panel < kD / 64; ++panel)
                        tma_load_4d(sQ + qb * Cfg::kQBytes + panel * kBlockM * 128, &maps.q, full_q(qb), panel * 64,
                                    w.kvh * p.group, w.m0 / p.group, w.b);
                }
                ++qi;
            }
            const T* kbase = static_cast<const T*>(p.k) + w.b * p.k_stride[0] + w.kvh * p.k_stride[1];
            const T* vbase = static_cast<const T*>(p.v) + w.b * p.v_stride[0] + w.kvh * p.v_stride[1];
            // Rows [key0, key0 + kBlockN) of K or V by cp.async, zeros at and past kv_end; the lanes'
            // copies complete, become visible to the tensor cores' proxy, then count as arrivals.
            auto copy_manual = [&](uint32_t dst, const T* src_base, int64_t row_stride, int dcols, int key0,
                                   uint32_t bar) {
                constexpr int kChunksPerRow = kD / 8;
                for (int c = lane; c < kBlockN * kChunksPerRow; c += 32) {
                    const int r = c / kChunksPerRow, chunk = c % kChunksPerRow;
                    const int key = key0 + r;
                    const bool valid = key < kv_end && chunk * 8 < dcols;
                    const void* src = valid ? (const void*)(src_base + (int64_t)key * row_stride + chunk * 8)
                                            : (const void*)src_base;
                    cp_async16(dst + swizzled<kBlockN>(r, chunk), src, valid);
                }
                cp_async_commit();
                cp_async_wait<0>();
                fence_async_smem();
                mbar_arrive(bar);
            };
            // Stage s of K or V (`dst` in its ring): TMA for whole blocks, cp.async for the one that
            // ends inside nonpad_kv_seqlen; every lane arrives, lane 0 with the byte count.
            auto fill_stage = [&](uint32_t dst, const CUtensorMap* map, uint32_t bar, const T* src_base,
                                  int64_t row_stride, int dcols, int key0, bool manual) {
                if (manual) {
                    copy_manual(dst, src_base, row_stride, dcols, key0, bar);
                } else if (lane == 0) {
                    mbar_arrive_expect_tx(bar, Cfg::kKVBytes);
#pragma unroll
                    for (int panel = 0; panel < kD / 64; ++panel)
                        tma_load_4d(dst + panel * kBlockN * 128, map, bar, panel * 64, key0, w.kvh, w.b);
                } else {
                    mbar_arrive(bar);
                }
            };
            for (int it = 0; it < count; ++it, ++gi) {
                const int n = range.n_end - 1 - it;
                const int key0 = n * kBlockN;
                const int s = gi % kStages;
                const uint32_t phase = (gi / kStages) & 1;
                const bool manual = key0 + kBlockN > kv_end && kv_end < p.kv_len;
                mbar_wait(empty_k(s), phase ^ 1);
                if (has_mask && !mask_warp) {
                    bool nz = false;
                    for (int j = lane; j < kBlockN; j += 32) {
                        const float bv = mask_bias(wk, key0 + j);
                        s_bias[s * kBlockN + j] = bv;
                        nz |= bv != 0.f;
                    }
                    nz = __any_sync(0xffffffff, nz);
                    if (lane == 0) s_bias[kStages * kBlockN + s] = nz ? 0.f : 1.f;
                }
                fill_stage(sK + s * Cfg::kKVBytes, &maps.k, full_k(s), kbase, p.k_stride[2], p.d, key0, manual);
                mbar_wait(empty_v(s), phase ^ 1);
                fill_stage(sV + s * Cfg::kKVBytes, &maps.v, full_v(s), vbase, p.v_stride[2], p.dv, key0, manual);
            }
        }
        return;
    }

    // --------------------------------------------------------------------- consumers
    if constexpr (Cfg::kSetRegs) regs_inc<Cfg::kConsumerRegs>();
    const int wg = role - 1;  // rows [64 wg, 64 wg + 64) of the CTA
    const int ctid = tid - 128 * role;
    const int g = lane / 4, t4 = lane % 4;

    const bool additive = p.mask_kind >= kMaskF32;
    const float pre = additive ? p.scale : p.scale * kLog2e;
    const float post = additive ? kLog2e : 1.f;
    const float pp = pre * post;

    // Ping-pong: warpgroup w issues its GEMMs only after the other one issued its own, so one's
    // softmax runs while the other's GEMMs hold the tensor cores. Barrier 3 + w is "w's turn"; it
    // completes with w's 128 threads syncing and the other's 128 arriving. The turns run on
    // across the tiles of a persistent CTA.
    constexpr bool kPP = Cfg::kPingPong;
    bool pp_started = false;

    int gi = 0, qi = 0;  // ring blocks and Q buffers used so far, as the producer counts them
    float o[kD / 2];
    float row_m[2], row_l[2];
    float s[kBlockN / 2];
    uint32_t pa[kBlockN / 16][4];
    for (int t = tile_first; t < num_tiles; t += tile_step) {
        const WsWork<kBlockN> wk = work_of(t);
        const WsTile& w = wk.w;
        const KeyBounds& kb = wk.kb;
        const BlockRange& range = wk.range;
        const int n_end = range.n_end;
        const int count = wk.count;
        const int wg_m0 = w.m0 + wg * 64;
        const bool wg_active = wg_m0 < p.m_rows;

        auto row_m_of = [&](int r) { return wg_m0 + (warp % 4) * 16 + g + 8 * r; };
        int row_lo_k[2], row_hi_k[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = min(row_m_of(r), p.m_rows - 1) / p.group;
            row_lo_k[r] = kb.lo(i);
            row_hi_k[r] = kb.hi(i);
        }
        const int lo_last = range.lo_last, hi_first = range.hi_first;

#pragma unroll
        for (int i = 0; i < kD / 2; ++i) o[i] = 0.f;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_m[r] = -INFINITY;
            row_l[r] = 0.f;
        }

        if (count > 0) {
            uint32_t sQt = sQ;
            int qb = 0;
            if constexpr (Cfg::kPersistent) {
                qb = qi & 1;
                sQt = sQ + qb * Cfg::kQBytes;
                mbar_wait(full_q(qb), (qi >> 1) & 1);
            } else {
                // This warpgroup's 64 rows of Q (GQA rows interleave heads; cp.async, no map).
                const T* q = static_cast<const T*>(p.q);
                constexpr int kChunksPerRow = kD / 8;
#pragma unroll 4
                for (int c = ctid; c < 64 * kChunksPerRow; c += 128) {
                    const int r = wg * 64 + c / kChunksPerRow, chunk = c % kChunksPerRow;
                    const int m = w.m0 + r;
                    const bool valid = m < p.m_rows && chunk * 8 < p.d;
                    const T* src = q;
                    if (valid) {
                        const int i = m / p.group, h = w.kvh * p.group + m % p.group;
                        src = q + w.b * p.q_stride[0] + h * p.q_stride[1] + (int64_t)i * p.q_stride[2] + chunk * 8;
                    }
                    cp_async16(sQt + swizzled<kBlockM>(r, chunk), src, valid);
                }
                cp_async_commit();
                cp_async_wait<0>();
                fence_async_smem();
                named_sync(1 + wg, 128);
            }

            const uint32_t q_lo = desc_lo(warp_uniform(sQt + wg * 64 * 128), 16);
            auto issue_s = [&](int stage) {
                wgmma_qk<kD, kBlockM, kBlockN, T>(s, q_lo, desc_lo(warp_uniform(sK + stage * Cfg::kKVBytes), 16));
            };
            auto issue_pv = [&](int stage) {
                wgmma_pv<kD, kBlockN, T>(o, pa, desc_lo(warp_uniform(sV + stage * Cfg::kKVBytes), kBlockN * 128));
            };
            auto softmax = [&](int n, int stage, float (&alphas)[2]) -> bool {
                const int key0 = n * kBlockN;
                const bool inside = key0 >= lo_last && key0 + kBlockN <= hi_first;
                const float* bias = s_bias + stage * kBlockN;
                auto run = [&](auto mode_tag) -> bool {
                    constexpr int kMode = decltype(mode_tag)::value;
                    constexpr bool kBounds = kMode == 1 || kMode == 3;
                    constexpr bool kBias = kMode >= 2;
                    if constexpr (kMode != 0) {
#pragma unroll
                        for (int j = 0; j < kNT; ++j) {
#pragma unroll
                            for (int e = 0; e < 4; ++e) {
                                const int kl = j * 8 + 2 * t4 + (e & 1);
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
                                    x = fast_exp2(fmaf(x, pp, -m_use * post));
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
                // No mask, or a block whose mask bias is all zeros (e.g. BERT's valid keys): the
                // bias-free paths (mode 0 in log2 units through pp = pre * post).
                if (!has_mask || s_bias[kStages * kBlockN + stage] != 0.f) {
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
            // A stage is handed back by one lane per consumer warp once that warp's wgmmas reading
            // it completed. With a mask, every lane also read the K stage's bias, so every lane
            // arrives on empty_k: each lane's reads then come before the producer's next write of
            // the stage through the barrier itself.
            auto release = [&](uint32_t bar) {
                if (lane == 0) mbar_arrive(bar);
            };
            auto release_k = [&](int stage) {
                if (has_mask) {
                    mbar_arrive(empty_k(stage));
                } else {
                    release(empty_k(stage));
                }
            };
            // Warpgroup 1's arrival after the CTA's very last turn would have no partner: skip it.
            bool final_tile = true;
            if constexpr (kPP) {
                for (int t2 = t + tile_step; t2 < num_tiles && final_tile; t2 += tile_step) {
                    final_tile = work_of(t2).count == 0;
                }
                if (!pp_started) {
                    pp_started = true;
                    if (wg == 1) named_arrive(3 + 0, 256);  // warpgroup 0 goes first
                }
            }
            auto turn_begin = [&]() {
                if constexpr (kPP) named_sync(3 + wg, 256);
            };
            auto turn_end = [&](bool last) {
                if constexpr (kPP) {
                    if (!(last && final_tile && wg == 1)) named_arrive(3 + (1 - wg), 256);
                }
            };
            auto stage_of = [&](int it) { return (gi + it) % kStages; };
            auto phase_of = [&](int it) { return (uint32_t)(((gi + it) / kStages) & 1); };

            // Block it = 0 (n = n_end - 1): S only.
            mbar_wait(full_k(stage_of(0)), phase_of(0));
            turn_begin();
            wg_fence();
            issue_s(stage_of(0));
            turn_end(count == 1);
            wg_wait<0>();
            pin(s);
            {
                float alphas[2];
                softmax(n_end - 1, stage_of(0), alphas);
            }
            release_k(stage_of(0));
            pack_p();
            for (int it = 1; it < count; ++it) {
                const int st = stage_of(it), prev = stage_of(it - 1);
                mbar_wait(full_k(st), phase_of(it));
                mbar_wait(full_v(prev), phase_of(it - 1));
                turn_begin();
                wg_fence();
                issue_s(st);
                issue_pv(prev);
                turn_end(it == count - 1);
                wg_wait<1>();
                pin(s);
                float alphas[2];
                const bool moved = softmax(n_end - 1 - it, st, alphas);
                release_k(st);
                wg_wait<0>();
                pin(o);
                release(empty_v(prev));
                if (moved) rescale_o(alphas);
                pack_p();
            }
            {
                const int last = stage_of(count - 1);
                mbar_wait(full_v(last), phase_of(count - 1));
                wg_fence();
                issue_pv(last);
                wg_wait<0>();
                pin(o);
                release(empty_v(last));
            }
            gi += count;
            if constexpr (Cfg::kPersistent) {
                release(empty_q(qb));
                ++qi;
            } else {
                (void)qb;
            }
        }

        if (wg_active) {
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
                const int i = m / p.group, h = w.kvh * p.group + m % p.group;
                if (p.write_accum) {
                    const int64_t row = (((int64_t)w.split * p.batch + w.b) * p.q_heads + h) * p.q_len + i;
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
                    T* dst = static_cast<T*>(p.out) + w.b * p.o_stride[0] + h * p.o_stride[1] +
                             (int64_t)i * p.o_stride[2];
#pragma unroll
                    for (int j = 0; j < kDT; ++j) {
                        const int col = j * 8 + 2 * t4;
                        if (col < p.dv)
                            Mma<T>::store2(dst + col, o[j * 4 + 2 * r] * inv, o[j * 4 + 2 * r + 1] * inv);
                    }
                }
            }
        }
    }
#else
    __trap();
#endif
}

}  // namespace sm90
}  // namespace flash_ort
