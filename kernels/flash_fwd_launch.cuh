// flash_fwd_launch.cuh: launcher template of the forward kernel, instantiated once per
// (padded head size, dtype) by the generated flash_fwd_hdim<D>_<dtype>.cu files.
#pragma once

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "flash_api.h"
#include "flash_fwd_kernel.cuh"

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
