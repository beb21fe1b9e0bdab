// flash_fwd_launch.cuh: launcher template of the forward kernel, instantiated once per
// (padded head size, dtype) by the generated flash_fwd_hdim<D>_<dtype>.cu files.
#pragma once

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "flash_api.h"
#include "flash_fwd_kernel.cuh"
#include "flash_fwd_sm90.cuh"

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
            // Tiles measured on an H200 (2026-11-22, S = 1k-16k, fp16/bf16): two warpgroups
            // (128 rows) with 128-key blocks at D = 64 (273 TFLOP/s at 16k against 267 with one
            // warpgroup x 64 keys), 64-key blocks at D = 128 (345 against 329 with 128 keys).
            constexpr int kBlockN = kD == 64 ? 128 : 64;
            return launch_sm90<sm90::Config<kD, kBlockN, 2, T>>(p, stream);
        }
    }
    if (p.m_rows <= kSmallRows) {
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
