// flash_fwd_launch.cuh: launcher template of the forward kernel, instantiated once per
// (padded head size, dtype) by the generated flash_fwd_hdim<D>_<dtype>.cu files.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "flash_api.h"
#include "flash_fwd_kernel.cuh"
#include "flash_fwd_sm90.cuh"
#include "flash_fwd_sm90_ws.cuh"

#include <cudaTypedefs.h>

namespace flash_ort {

template <int kDType>
struct DTypeOf;
template <>
struct DTypeOf<kF16> {
    using type = __half;
};
template <>
struct DTypeOf<kBF16> {
    using type = __nv_bfloat16;
};

template <typename Cfg>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
    auto kernel = flash_fwd_kernel<Cfg>;
    const size_t smem = Cfg::kSmemBytes;
    // Raising the dynamic shared-memory limit is a host-side attribute (no stream work), cheap
    // enough per launch and safe under graph capture.
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("flash_fwd hdim ") + std::to_string(Cfg::kD) +
                                 ": cannot reserve " + std::to_string(smem) +
                                 " bytes of shared memory: " + cudaGetErrorString(err));
    }
    dim3 grid((p.m_rows + Cfg::kBlockM - 1) / Cfg::kBlockM, p.num_splits, p.batch * p.kv_heads);
    kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
    check_launch("flash_fwd_kernel");
}

// True when the current device is a Hopper (compute capability 9.0) and the build has sm_90a
// code: arch-specific cubins run only there. FLASH_ORT_DISABLE_SM90=1 forces the mma.sync kernel
// (A/B comparisons). One attribute query per device, cached.
inline bool use_sm90() {
#ifdef FLASH_ORT_SM90A
    static const bool disabled = getenv("FLASH_ORT_DISABLE_SM90") != nullptr &&
                                 atoi(getenv("FLASH_ORT_DISABLE_SM90")) != 0;
    if (disabled) return false;
    static std::atomic<int> cache[64];  // 0 unknown, 1 yes, 2 no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
    int v = cache[dev].load(std::memory_order_relaxed);
    if (v == 0) {
        int major = 0, minor = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        v = major == 9 && minor == 0 ? 1 : 2;
        cache[dev].store(v, std::memory_order_relaxed);
    }
    return v == 1;
#else
    return false;
#endif
}

template <typename Cfg>
void launch_sm90(const FwdParams& p, cudaStream_t stream) {
    auto kernel = sm90::flash_fwd_sm90_kernel<Cfg>;
    const size_t smem = Cfg::kSmemBytes;
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("flash_fwd_sm90 hdim ") + std::to_string(Cfg::kD) +
                                 ": cannot reserve " + std::to_string(smem) +
                                 " bytes of shared memory: " + cudaGetErrorString(err));
    }
    dim3 grid((p.m_rows + Cfg::kBlockM - 1) / Cfg::kBlockM, p.num_splits, p.batch * p.kv_heads);
    kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
    check_launch("flash_fwd_sm90_kernel");
}

// An integer environment switch; `fallback` when unset or empty. FLASH_ORT_SM90_WS=0 keeps the
// Hopper kernel without warp specialization (A/B comparisons); in a FLASH_ORT_TILE_EXPERIMENT
// build, FLASH_ORT_WS_CFG picks a tile variant of the warp-specialized one.
inline int env_int(const char* name, int fallback) {
    const char* v = getenv(name);
    return v != nullptr && *v != 0 ? atoi(v) : fallback;
}

// cuTensorMapEncodeTiled from the driver (the runtime is linked statically; the driver API is
// reached through the runtime's entry-point query, no -lcuda). Null when unavailable.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void* f = nullptr;
        cudaDriverEntryPointQueryResult q{};
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
                cudaSuccess ||
            q != cudaDriverEntryPointSuccess)
            return (PFN_cuTensorMapEncodeTiled_v12000) nullptr;
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
    }();
    return fn;
}

// TMA descriptor of K or V ([batch, heads, seq, dim] through `stride`, in elements) read in
// boxes of 64 columns x `rows` keys into 128-byte-swizzled shared memory; rows past `seq` and
// columns past `d` arrive as zeros. False when TMA cannot address the tensor (alignment).
// `l2_promote`: whether the copy engine widens its L2 fetches to 256 bytes. Prefill re-reads
// each K/V block from L2 in many CTAs and keeps it; decode streams every byte once, and there
// the promotion cost 10% of the read rate (H200, 2026-11-22: B = 8, Skv = 64k, 4064 GB/s with
// it against 4506 without). FLASH_ORT_TMA_L2=0|1 overrides both (A/B).
template <typename T>
bool make_kv_map(CUtensorMap* map, const void* ptr, const int64_t (&stride)[4], int d, int seq, int heads,
                 int batch, int rows, bool l2_promote) {
    const auto encode = tensor_map_encoder();
    if (encode == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 != 0 || d % 8 != 0) return false;
    const cuuint64_t dims[4] = {(cuuint64_t)d, (cuuint64_t)seq, (cuuint64_t)heads, (cuuint64_t)batch};
    cuuint64_t strides[3] = {(cuuint64_t)stride[2] * 2, (cuuint64_t)stride[1] * 2, (cuuint64_t)stride[0] * 2};
    for (int i = 0; i < 3; ++i) {
        // A dimension of size 1 is only ever at coordinate 0: any valid stride will do.
        if (dims[i + 1] == 1) strides[i] = 16;
        if (strides[i] == 0 || strides[i] % 16 != 0 || strides[i] >= (1ull << 40)) return false;
    }
    const cuuint32_t box[4] = {64, (cuuint32_t)rows, 1, 1};
    const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
    const CUtensorMapDataType dtype = std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                     : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    static const int forced = env_int("FLASH_ORT_TMA_L2", -1);
    const bool promote = forced >= 0 ? forced != 0 : l2_promote;
    return encode(map, dtype, 4, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  promote ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B : CU_TENSOR_MAP_L2_PROMOTION_NONE,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// TMA descriptor of Q for the persistent kernel, as a 4D tensor (dim, head, seq, batch) read in
// boxes of 64 columns x `group` heads x block_m / group queries: one box is the rows of one tile
// in the kernel's GQA order (row m = query m / group of head m % group), queries past q_len and
// columns past d arrive as zeros. False when TMA cannot address it or the box cannot be a tile
// (block_m not a multiple of the group).
template <typename T>
bool make_q_map(CUtensorMap* map, const FwdParams& p, int block_m) {
    const auto encode = tensor_map_encoder();
    if (encode == nullptr || reinterpret_cast<uintptr_t>(p.q) % 16 != 0 || p.d % 8 != 0 || p.group < 1 ||
        block_m % p.group != 0 || p.group > 256 || block_m / p.group > 256)
        return false;
    const cuuint64_t dims[4] = {(cuuint64_t)p.d, (cuuint64_t)p.q_heads, (cuuint64_t)p.q_len, (cuuint64_t)p.batch};
    cuuint64_t strides[3] = {(cuuint64_t)p.q_stride[1] * 2, (cuuint64_t)p.q_stride[2] * 2,
                             (cuuint64_t)p.q_stride[0] * 2};
    for (int i = 0; i < 3; ++i) {
        if (dims[i + 1] == 1) strides[i] = 16;
        if (strides[i] == 0 || strides[i] % 16 != 0 || strides[i] >= (1ull << 40)) return false;
    }
    const cuuint32_t box[4] = {64, (cuuint32_t)p.group, (cuuint32_t)(block_m / p.group), 1};
    const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
    const CUtensorMapDataType dtype = std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                     : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    return encode(map, dtype, 4, const_cast<void*>(p.q), dims, strides, box, elem_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Streaming multiprocessors of the current device (one attribute query per device, cached).
inline int sm_count() {
    static std::atomic<int> cache[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
    int v = cache[dev].load(std::memory_order_relaxed);
    if (v == 0) {
        if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) return 0;
        cache[dev].store(v, std::memory_order_relaxed);
    }
    return v;
}

// Tiles of the warp-specialized kernel for a row block of block_m.
inline int64_t ws_tiles(const FwdParams& p, int block_m) {
    return (int64_t)((p.m_rows + block_m - 1) / block_m) * p.num_splits * p.batch * p.kv_heads;
}

// Whether a prefill call runs the persistent form of the warp-specialized kernel: more tiles
// than SMs (otherwise every tile has an SM of its own anyway). FLASH_ORT_PERSISTENT: 0 never,
// 1 (default) calls without causal rows or windows, 2 every call (A/B).
inline bool want_persistent(const FwdParams& p, int block_m) {
    static const int mode = env_int("FLASH_ORT_PERSISTENT", 1);
    if (mode == 0) return false;
    const bool banded = p.window_left >= 0 || p.window_right >= 0;
    if (mode == 1 && banded) return false;
    const int sms = sm_count();
    return sms > 0 && ws_tiles(p, block_m) > sms;
}

// The warp-specialized Hopper kernel; false (nothing launched) when K/V (or Q, persistent) cannot
// be read by TMA.
template <typename Cfg>
bool launch_sm90_ws(const FwdParams& p, cudaStream_t stream) {
    using T = typename Cfg::T;
    sm90::KVMaps maps;
    const bool decode = Cfg::kConsumers == 1;  // the decode tile: every K/V byte read once
    if (!make_kv_map<T>(&maps.k, p.k, p.k_stride, p.d, p.kv_len, p.kv_heads, p.batch, Cfg::kBlockN, !decode) ||
        !make_kv_map<T>(&maps.v, p.v, p.v_stride, p.dv, p.kv_len, p.kv_heads, p.batch, Cfg::kBlockN, !decode))
        return false;
    if (Cfg::kPersistent && !make_q_map<T>(&maps.q, p, Cfg::kBlockM)) return false;
    auto kernel = sm90::flash_fwd_sm90_ws_kernel<Cfg>;
    const size_t smem = Cfg::kSmemBytes;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("flash_fwd_sm90_ws hdim ") + std::to_string(Cfg::kD) +
                                 ": cannot reserve " + std::to_string(smem) +
                                 " bytes of shared memory: " + cudaGetErrorString(err));
    }
    dim3 grid((p.m_rows + Cfg::kBlockM - 1) / Cfg::kBlockM, p.num_splits, p.batch * p.kv_heads);
    if constexpr (Cfg::kPersistent) {
        // One CTA per SM (the register file holds one), each walking every grid.x-th tile.
        grid = dim3((unsigned)std::min<int64_t>(ws_tiles(p, Cfg::kBlockM), std::max(1, sm_count())), 1, 1);
    }
    kernel<<<grid, Cfg::kThreads, smem, stream>>>(p, maps);
    check_launch("flash_fwd_sm90_ws_kernel");
    return true;
}
// A prefill tile config: its persistent form where want_persistent() says so and Q can be a TMA
// box, else one CTA per tile.
template <typename Cfg>
bool launch_sm90_prefill(const FwdParams& p, cudaStream_t stream) {
    using Persistent = sm90::WsConfig<Cfg::kD, Cfg::kBlockN, Cfg::kConsumers, Cfg::kStages, Cfg::kPingPong,
                                      typename Cfg::T, true>;
    return (want_persistent(p, Cfg::kBlockM) && launch_sm90_ws<Persistent>(p, stream)) ||
           launch_sm90_ws<Cfg>(p, stream);
}

// What the Hopper kernel covers (flash_fwd_sm90.cuh): head sizes 64 and 128, more than one
// decode tile of rows, no softcap, no mask or a mask that varies along keys only.
template <int kD>
bool sm90_covers(const FwdParams& p) {
    if constexpr (kD != 64 && kD != 128) {
        return false;
    } else {
        const bool key_mask_only =
            p.mask_kind == kMaskNone || (p.m_stride[1] == 0 && p.m_stride[2] == 0);
        return p.m_rows > kSmallRows && p.softcap == 0.f && key_mask_only && use_sm90();
    }
}

template <int kD, int kDType>
void run_fwd(const FwdParams& p, cudaStream_t stream) {
    using T = typename DTypeOf<kDType>::type;
    static_assert(FwdConfig<kD, fwd_tile(kD, true).block_m, fwd_tile(kD, true).block_n,
                            fwd_tile(kD, true).warps,
                            fwd_tile(kD, true).stages, T>::kSmemBytes ==
                      (size_t)fwd_smem_bytes(kD, fwd_tile(kD, true)),
                  "host and device shared-memory sizes agree");
    constexpr TileShape small = fwd_tile(kD, true);
    constexpr TileShape big = fwd_tile(kD, false);
    if (sm90_covers<kD>(p)) {
        if constexpr (kD == 64 || kD == 128) {
            if (hopper_ws_enabled()) {
                // Measured on an H200 (2026-11-22, fp16/bf16, S = 1k-16k): two consumer
                // warpgroups with 128-key blocks and ping-pong at D = 128 (590-654 TFLOP/s at
                // 16k, non-causal); at D = 64 three consumer warpgroups (192 rows, no ping-pong:
                // 469-501 at 4k-16k against 391-422 with two), except short causal rows, where
                // the 192-row tiles leave too few CTAs (176 against 206 at 1k).
                using TwoWg = sm90::WsConfig<kD, 128, 2, 2, true, T>;
                using ThreeWg = sm90::WsConfig<kD, 128, 3, 2, false, T>;
                const bool short_causal = sm90_short_causal(p.window_right, p.q_len);
                static_assert((kD != 64 || sm90_prefill_rows(kD, false) == ThreeWg::kBlockM) &&
                                      sm90_prefill_rows(kD, true) == TwoWg::kBlockM &&
                                      TwoWg::kBlockN == kSm90BlockN && ThreeWg::kBlockN == kSm90BlockN,
                              "the split-KV plan (cpp/bridge.cc) assumes these tiles");
                bool launched = false;
#ifdef FLASH_ORT_TILE_EXPERIMENT
                static const int cfg = env_int("FLASH_ORT_WS_CFG", 0);
                if (cfg == 1) launched = launch_sm90_ws<sm90::WsConfig<kD, 128, 2, 2, false, T>>(p, stream);
                if (cfg == 2) launched = launch_sm90_ws<sm90::WsConfig<kD, 64, 2, 2, true, T>>(p, stream);
                if (cfg == 3) launched = launch_sm90_ws<sm90::WsConfig<kD, 64, 2, 3, false, T>>(p, stream);
                if (cfg == 4) launched = launch_sm90_ws<ThreeWg>(p, stream);
                if (cfg == 5) launched = launch_sm90_ws<TwoWg>(p, stream);
                if constexpr (kD == 64) {  // deeper rings for the 192-row tile
                    if (cfg == 6) launched = launch_sm90_ws<sm90::WsConfig<kD, 128, 3, 3, false, T>>(p, stream);
                    if (cfg == 7) launched = launch_sm90_ws<sm90::WsConfig<kD, 64, 3, 4, false, T>>(p, stream);
                }
#endif
                if (!launched) {
                    // Persistent when there are more tiles than SMs (falls back when Q cannot be
                    // a TMA box, e.g. a GQA group that does not divide the row block).
                    if constexpr (kD == 64) {
                        launched = short_causal ? launch_sm90_prefill<TwoWg>(p, stream)
                                                : launch_sm90_prefill<ThreeWg>(p, stream);
                    } else {
                        launched = launch_sm90_prefill<TwoWg>(p, stream);
                    }
                }
                if (launched) return;
            }
            // The Hopper kernel without warp specialization (K/V that TMA cannot address, or the
            // A/B switch). Tiles measured on an H200 (2026-11-22, S = 1k-16k, fp16/bf16): two
            // warpgroups (128 rows) with 128-key blocks at D = 64 (273 TFLOP/s at 16k against 267
            // with one warpgroup x 64 keys), 64-key blocks at D = 128 (345 against 329 with 128 keys).
            constexpr int kBlockN = kD == 64 ? 128 : 64;
            return launch_sm90<sm90::Config<kD, kBlockN, 2, T>>(p, stream);
        }
    }
    if (p.m_rows <= kSmallRows) {
        if constexpr (kD == 64 || kD == 128) {
            const bool key_mask_only = p.mask_kind == kMaskNone || (p.m_stride[1] == 0 && p.m_stride[2] == 0);
            if (decode_on_sm90(kD, p.softcap != 0.f, key_mask_only) &&
                launch_sm90_ws<sm90::WsConfig<kD, kSm90DecodeTile.block_n, 1, kSm90DecodeTile.stages, false, T>>(p,
                                                                                                             stream))
                return;
        }
        launch_fwd<FwdConfig<kD, small.block_m, small.block_n, small.warps, small.stages, T>>(p, stream);
    } else {
#ifdef FLASH_ORT_TILE_EXPERIMENT
        // Dev-only A/B of tile shapes in one binary (FLASH_ORT_TILE=1|2).
        static const int alt = getenv("FLASH_ORT_TILE") ? atoi(getenv("FLASH_ORT_TILE")) : 0;
        if (kD <= 128 && alt == 1) return launch_fwd<FwdConfig<kD, 128, 64, 8, 2, T>>(p, stream);
        if (kD <= 128 && alt == 2) return launch_fwd<FwdConfig<kD, 64, 64, 4, 2, T>>(p, stream);
#endif
        launch_fwd<FwdConfig<kD, big.block_m, big.block_n, big.warps, big.stages, T>>(p, stream);
    }
}

}  // namespace flash_ort
