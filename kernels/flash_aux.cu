// flash_aux.cu: the small kernels around the forward kernel: the split-KV combine, the fp32 ->
// fp16 input conversion, and the past/new KV concatenation into present_key/present_value.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "flash_api.h"
#include "flash_fwd_launch.cuh"

namespace flash_ort {

bool hopper_ws_enabled() {
    static const bool ws = env_int("FLASH_ORT_SM90_WS", 1) != 0;
    return ws && use_sm90();
}

void check_launch(const char* what) {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string(what) + " launch failed: " +
                                 cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
    }
}

__device__ __forceinline__ void store_out(void* base, int64_t idx, int dtype, float v) {
    switch (dtype) {
        case kF32:
            static_cast<float*>(base)[idx] = v;
            break;
        case kF16:
            static_cast<__half*>(base)[idx] = __float2half_rn(v);
            break;
        default:
            static_cast<__nv_bfloat16*>(base)[idx] = __float2bfloat16_rn(v);
            break;
    }
}

// One CTA per output row (b, h, i): weights exp(lse_s - max) over the splits, then each thread
// merges a strided subset of the Dv columns. A row no split saw gets zeros.
__global__ void combine_kernel(const __grid_constant__ FwdParams p) {
    const int64_t row = blockIdx.x;  // ((b * Hq) + h) * Sq + i
    const int64_t rows = (int64_t)p.batch * p.q_heads * p.q_len;
    const int i = (int)(row % p.q_len);
    const int h = (int)((row / p.q_len) % p.q_heads);
    const int b = (int)(row / ((int64_t)p.q_len * p.q_heads));
    float mx = -INFINITY;
    for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_accum[s * rows + row]);
    float wsum = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
        float l = p.lse_accum[s * rows + row];
        wsum += l == -INFINITY ? 0.f : __expf(l - mx);
    }
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    const int64_t out_base = b * p.o_stride[0] + h * p.o_stride[1] + (int64_t)i * p.o_stride[2];
    for (int c = threadIdx.x; c < p.dv; c += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < p.num_splits; ++s) {
            float l = p.lse_accum[s * rows + row];
            if (l == -INFINITY) continue;
            acc += __expf(l - mx) * p.o_accum[(s * rows + row) * p.dv + c];
        }
        store_out(p.out, out_base + c, p.out_dtype, acc * inv);
    }
}

void run_combine(const FwdParams& p, cudaStream_t stream) {
    const int64_t rows = (int64_t)p.batch * p.q_heads * p.q_len;
    if (rows == 0) return;
    if (rows > 0x7fffffffLL) throw std::runtime_error("combine: too many output rows");
    int threads = p.dv <= 64 ? 64 : 128;
    combine_kernel<<<(unsigned)rows, threads, 0, stream>>>(p);
    check_launch("flash_combine_kernel");
}

__global__ void convert_kernel(const float* __restrict__ src, int64_t s0, int64_t s1, int64_t s2,
                               int64_t s3, int h, int s, int d, int64_t n, __half* __restrict__ dst) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t x = e;
        const int dd = (int)(x % d);
        x /= d;
        const int ss = (int)(x % s);
        x /= s;
        const int hh = (int)(x % h);
        const int64_t bb = x / h;
        dst[e] = __float2half_rn(src[bb * s0 + hh * s1 + ss * s2 + dd * s3]);
    }
}

void run_convert_f32_to_f16(const float* src, const int64_t (&st)[4], int b, int h, int s, int d,
                            void* dst, cudaStream_t stream) {
    const int64_t n = (int64_t)b * h * s * d;
    if (n == 0) return;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535LL * 16);
    convert_kernel<<<(unsigned)blocks, threads, 0, stream>>>(src, st[0], st[1], st[2], st[3], h, s,
                                                            d, n, static_cast<__half*>(dst));
    check_launch("flash_convert_kernel");
}

// One thread per element of present; rows of the past part are dense copies.
template <typename E>
__global__ void concat_kernel(const E* __restrict__ past, const E* __restrict__ src, int64_t n0,
                              int64_t n1, int64_t n2, int64_t n3, E* __restrict__ present, int h,
                              int past_len, int new_len, int dim, int64_t n) {
    const int total = past_len + new_len;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t x = e;
        const int dd = (int)(x % dim);
        x /= dim;
        const int ss = (int)(x % total);
        x /= total;
        const int hh = (int)(x % h);
        const int64_t bb = x / h;
        E v;
        if (ss < past_len) {
            v = past[((bb * h + hh) * past_len + ss) * dim + dd];
        } else {
            v = src[bb * n0 + hh * n1 + (int64_t)(ss - past_len) * n2 + dd * n3];
        }
        present[e] = v;
    }
}

void run_concat(const void* past, const void* src, const int64_t (&ns)[4], void* present, int b,
                int h, int past_len, int new_len, int dim, int elem_bytes, cudaStream_t stream) {
    const int64_t n = (int64_t)b * h * (past_len + new_len) * dim;
    if (n == 0) return;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535LL * 16);
    if (elem_bytes == 2) {
        concat_kernel<uint16_t><<<(unsigned)blocks, threads, 0, stream>>>(
            static_cast<const uint16_t*>(past), static_cast<const uint16_t*>(src), ns[0], ns[1],
            ns[2], ns[3], static_cast<uint16_t*>(present), h, past_len, new_len, dim, n);
    } else if (elem_bytes == 4) {
        concat_kernel<uint32_t><<<(unsigned)blocks, threads, 0, stream>>>(
            static_cast<const uint32_t*>(past), static_cast<const uint32_t*>(src), ns[0], ns[1],
            ns[2], ns[3], static_cast<uint32_t*>(present), h, past_len, new_len, dim, n);
    } else {
        throw std::runtime_error("concat: unsupported element size " + std::to_string(elem_bytes));
    }
    check_launch("flash_concat_kernel");
}

}  // namespace flash_ort
