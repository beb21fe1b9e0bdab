// bridge.cc: host launch code behind the cxx bridge: checks, split-KV planning, scratch layout,
// dispatch to the instantiated kernels, and the fp32 input path (convert to fp16, run, combine
// into fp32). Error messages starting with "not implemented:" map to Error::NotImplemented.
#include "flash-ort/cpp/bridge.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "flash-ort/kernels/flash_api.h"
#include "flash-ort/src/cuda/mod.rs.h"

namespace flash_ort {
namespace {

[[noreturn]] void not_implemented(const std::string& what) {
    throw std::runtime_error("not implemented: " + what);
}
[[noreturn]] void invalid(const std::string& what) {
    throw std::runtime_error("invalid argument: " + what);
}

constexpr int kHdims[] = {
#ifdef FLASH_ORT_HDIM_32
    32,
#endif
#ifdef FLASH_ORT_HDIM_64
    64,
#endif
#ifdef FLASH_ORT_HDIM_96
    96,
#endif
#ifdef FLASH_ORT_HDIM_128
    128,
#endif
#ifdef FLASH_ORT_HDIM_192
    192,
#endif
#ifdef FLASH_ORT_HDIM_256
    256,
#endif
    0};

std::string built_hdims() {
    std::string s;
    for (int d : kHdims) {
        if (d == 0) break;
        if (!s.empty()) s += ", ";
        s += std::to_string(d);
    }
    return s.empty() ? "none" : s;
}

// Smallest instantiated head size >= the problem's max(D, Dv); 0 if none.
int padded_hdim(int64_t d) {
    for (int h : kHdims) {
        if (h == 0) break;
        if (h >= d) return h;
    }
    return 0;
}

constexpr uint64_t kAlign = 256;
uint64_t align_up(uint64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

struct Layout {
    int d_pad = 0;
    int num_splits = 1;
    bool accum = false;     // partials + combine
    uint64_t o_accum = 0;   // byte offsets into scratch
    uint64_t lse_accum = 0;
    uint64_t q16 = 0, k16 = 0, v16 = 0;
    uint64_t total = 0;
};

Layout plan(const AttnArgs& a) {
    if (a.dtype != kF32 && a.dtype != kF16 && a.dtype != kBF16) invalid("unknown dtype code");
    if (a.batch <= 0 || a.q_heads <= 0 || a.kv_heads <= 0 || a.q_len < 0 || a.kv_len < 0 ||
        a.head_dim <= 0 || a.v_head_dim <= 0 || a.q_heads % a.kv_heads != 0) {
        invalid("inconsistent dimensions");
    }
    if (a.head_dim % 8 != 0 || a.v_head_dim % 8 != 0) {
        not_implemented("CUDA kernels need head sizes that are multiples of 8, got D = " +
                        std::to_string(a.head_dim) + ", Dv = " + std::to_string(a.v_head_dim));
    }
    Layout l;
    l.d_pad = padded_hdim(std::max(a.head_dim, a.v_head_dim));
    if (l.d_pad == 0) {
        not_implemented("no CUDA kernel for head size " +
                        std::to_string(std::max(a.head_dim, a.v_head_dim)) +
                        " (this build has head sizes " + built_hdims() + ")");
    }
    const int64_t group = a.q_heads / a.kv_heads;
    const int64_t m_rows = a.q_len * group;
    if (m_rows > 0x7fffffffLL || a.kv_len > 0x7fffffffLL || a.batch * a.kv_heads > 65535) {
        not_implemented("problem too large for one launch (rows " + std::to_string(m_rows) +
                        ", keys " + std::to_string(a.kv_len) + ", batch x kv_heads " +
                        std::to_string(a.batch * a.kv_heads) + ")");
    }
    const bool key_mask_only =
        a.mask_kind == kMaskNone || (a.mask_strides[1] == 0 && a.mask_strides[2] == 0);
    const bool sm90_decode =
        m_rows <= kSmallRows && decode_on_sm90(l.d_pad, a.softcap != 0.f, key_mask_only);
    const bool sm90_prefill =
        m_rows > kSmallRows && prefill_on_sm90(l.d_pad, a.softcap != 0.f, key_mask_only);
    // Split the KV axis (flash-decoding) when the grid would leave SMs idle: fill one wave of
    // resident CTAs, no more -- a second, partial wave costed ~25% in decode (H200) -- with at
    // least `min_blocks` KV blocks a split. Sized with the tile of the kernel that will run.
    int64_t block_m, block_n, per_sm, min_blocks = 2;
    if (sm90_decode || sm90_prefill) {
        // The warp-specialized Hopper kernel: one CTA per SM (128 KB of K/V stages, up to 255
        // registers a thread). In prefill only splits of 4+ key blocks (512 keys) pay for their
        // combine: planned with the mma.sync tile, BERT-base at B = 1, S = 512 (36 CTAs of 192
        // rows) ran 4 splits and their combine in 34 us a layer against 14 for cuDNN (H200,
        // 2026-11-22).
        block_m = sm90_decode ? kSm90DecodeTile.block_m
                              : sm90_prefill_rows(l.d_pad, sm90_short_causal(a.window_right, a.q_len));
        block_n = sm90_decode ? kSm90DecodeTile.block_n : kSm90BlockN;
        per_sm = 1;
        if (sm90_prefill) min_blocks = 4;
    } else {
        // The mma.sync kernel: resident CTAs limited by shared memory and registers (assuming
        // 255 registers a thread).
        const TileShape tile = fwd_tile(l.d_pad, m_rows <= kSmallRows);
        block_m = tile.block_m;
        block_n = tile.block_n;
        const int64_t smem = fwd_smem_bytes(l.d_pad, tile) + 1024;  // + the per-CTA reservation
        const int64_t by_smem = a.smem_per_sm > 0 ? a.smem_per_sm / smem : 1;
        const int64_t by_regs = 65536 / (32LL * tile.warps * 256);
        per_sm = std::max<int64_t>(1, std::min({by_smem, by_regs, (int64_t)32}));
    }
    const int64_t m_blocks = (m_rows + block_m - 1) / block_m;
    const int64_t n_blocks = (a.kv_len + block_n - 1) / block_n;
    const int64_t ctas = m_blocks * a.batch * a.kv_heads;
    const int64_t resident = per_sm * std::max(1, a.sm_count);
    int64_t splits = 1;
    if (ctas > 0 && ctas * 10 < resident * 8 && n_blocks >= 2 * min_blocks) {
        splits = std::min<int64_t>({resident / ctas, n_blocks / min_blocks, 128});
        splits = std::max<int64_t>(splits, 1);
    }
    l.num_splits = (int)splits;
    l.accum = splits > 1 || a.dtype == kF32;
    uint64_t off = 0;
    if (l.accum) {
        const uint64_t rows = (uint64_t)a.batch * a.q_heads * a.q_len;
        l.o_accum = off;
        off = align_up(off + (uint64_t)splits * rows * a.v_head_dim * sizeof(float));
        l.lse_accum = off;
        off = align_up(off + (uint64_t)splits * rows * sizeof(float));
    }
    if (a.dtype == kF32) {
        l.q16 = off;
        off = align_up(off + (uint64_t)a.batch * a.q_heads * a.q_len * a.head_dim * 2);
        l.k16 = off;
        off = align_up(off + (uint64_t)a.batch * a.kv_heads * a.kv_len * a.head_dim * 2);
        l.v16 = off;
        off = align_up(off + (uint64_t)a.batch * a.kv_heads * a.kv_len * a.v_head_dim * 2);
    }
    l.total = off;
    return l;
}

void check_ptr(uint64_t p, const char* name) {
    if (p == 0) invalid(std::string(name) + " is a null device pointer");
    if (p % 16 != 0) {
        not_implemented(std::string(name) + " is not 16-byte aligned (CUDA kernels load 16 bytes at a time)");
    }
}

void check_strides(const std::array<int64_t, 4>& s, const char* name) {
    if (s[3] != 1) not_implemented(std::string(name) + ": the head-size axis must be contiguous");
    for (int i = 0; i < 3; ++i) {
        if (s[i] % 8 != 0) {
            not_implemented(std::string(name) + ": strides must be multiples of 8 elements, got " +
                            std::to_string(s[i]) + " on axis " + std::to_string(i));
        }
    }
}

void set_device(int device) {
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) {
        throw std::runtime_error("cudaSetDevice(" + std::to_string(device) +
                                 ") failed: " + cudaGetErrorString(err));
    }
}

void dispatch(int d_pad, int dtype, const FwdParams& p, cudaStream_t s) {
#define FLASH_ORT_CASE(D)                                        \
    if (d_pad == D) {                                            \
        if (dtype == kBF16) return run_fwd<D, kBF16>(p, s);      \
        return run_fwd<D, kF16>(p, s);                           \
    }
#ifdef FLASH_ORT_HDIM_32
    FLASH_ORT_CASE(32)
#endif
#ifdef FLASH_ORT_HDIM_64
    FLASH_ORT_CASE(64)
#endif
#ifdef FLASH_ORT_HDIM_96
    FLASH_ORT_CASE(96)
#endif
#ifdef FLASH_ORT_HDIM_128
    FLASH_ORT_CASE(128)
#endif
#ifdef FLASH_ORT_HDIM_192
    FLASH_ORT_CASE(192)
#endif
#ifdef FLASH_ORT_HDIM_256
    FLASH_ORT_CASE(256)
#endif
#undef FLASH_ORT_CASE
    not_implemented("no CUDA kernel for padded head size " + std::to_string(d_pad));
}

}  // namespace

AttnPlan plan_attention(const AttnArgs& args) {
    Layout l = plan(args);
    AttnPlan out;
    out.num_splits = l.num_splits;
    out.scratch_bytes = l.total;
    out.head_dim_padded = l.d_pad;
    return out;
}

void launch_attention(const AttnArgs& a) {
    const Layout l = plan(a);
    if (a.scratch_len < l.total) {
        invalid("scratch buffer of " + std::to_string(a.scratch_len) + " bytes, this problem needs " +
                std::to_string(l.total));
    }
    if (l.total > 0) check_ptr(a.scratch, "scratch");
    const bool empty_q = a.q_len == 0;
    if (empty_q) return;  // nothing to write
    check_ptr(a.q, "Q");
    check_ptr(a.out, "Y");
    if (a.kv_len > 0) {
        check_ptr(a.k, "K");
        check_ptr(a.v, "V");
    }
    check_strides(a.q_strides, "Q");
    check_strides(a.k_strides, "K");
    check_strides(a.v_strides, "V");
    check_strides(a.out_strides, "Y");
    if (a.mask_kind < kMaskNone || a.mask_kind > kMaskBF16) invalid("unknown mask kind");
    if (a.mask_kind != kMaskNone && a.mask == 0) invalid("attn_mask kind given without a pointer");

    set_device(a.device);
    cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
    char* scratch = reinterpret_cast<char*>(a.scratch);

    FwdParams p{};
    p.q = reinterpret_cast<const void*>(a.q);
    p.k = reinterpret_cast<const void*>(a.k);
    p.v = reinterpret_cast<const void*>(a.v);
    p.mask = reinterpret_cast<const void*>(a.mask);
    p.nonpad = reinterpret_cast<const int64_t*>(a.nonpad);
    p.out = reinterpret_cast<void*>(a.out);
    for (int i = 0; i < 4; ++i) {
        p.q_stride[i] = a.q_strides[i];
        p.k_stride[i] = a.k_strides[i];
        p.v_stride[i] = a.v_strides[i];
        p.o_stride[i] = a.out_strides[i];
        p.m_stride[i] = a.mask_strides[i];
    }
    p.batch = (int)a.batch;
    p.q_heads = (int)a.q_heads;
    p.kv_heads = (int)a.kv_heads;
    p.group = (int)(a.q_heads / a.kv_heads);
    p.q_len = (int)a.q_len;
    p.kv_len = (int)a.kv_len;
    p.d = (int)a.head_dim;
    p.dv = (int)a.v_head_dim;
    p.m_rows = p.q_len * p.group;
    p.mask_kind = a.mask_kind;
    p.scale = a.scale;
    p.softcap = a.softcap;
    p.window_left = (int)std::max<int64_t>(-1, std::min<int64_t>(a.window_left, 0x7fffffff));
    p.window_right = (int)std::max<int64_t>(-1, std::min<int64_t>(a.window_right, 0x7fffffff));
    p.num_splits = l.num_splits;
    static const bool mask_warp_off = std::getenv("FLASH_ORT_MASK_WARP") != nullptr &&
                                      std::atoi(std::getenv("FLASH_ORT_MASK_WARP")) == 0;
    p.mask_warp = mask_warp_off ? 0 : 1;
    p.write_accum = l.accum ? 1 : 0;
    p.out_dtype = a.dtype;
    if (l.accum) {
        p.o_accum = reinterpret_cast<float*>(scratch + l.o_accum);
        p.lse_accum = reinterpret_cast<float*>(scratch + l.lse_accum);
    }

    int kernel_dtype = a.dtype;
    if (a.dtype == kF32) {
        // fp32 inputs: rounded to fp16 (10-bit mantissa, range +-65504) into dense scratch copies;
        // scores, softmax and P·V still accumulate in fp32 and the combine writes fp32 out.
        run_convert_f32_to_f16(reinterpret_cast<const float*>(a.q), p.q_stride, p.batch,
                               p.q_heads, p.q_len, p.d, scratch + l.q16, stream);
        run_convert_f32_to_f16(reinterpret_cast<const float*>(a.k), p.k_stride, p.batch,
                               p.kv_heads, p.kv_len, p.d, scratch + l.k16, stream);
        run_convert_f32_to_f16(reinterpret_cast<const float*>(a.v), p.v_stride, p.batch,
                               p.kv_heads, p.kv_len, p.dv, scratch + l.v16, stream);
        p.q = scratch + l.q16;
        p.k = scratch + l.k16;
        p.v = scratch + l.v16;
        const int64_t qs[4] = {(int64_t)p.q_heads * p.q_len * p.d, (int64_t)p.q_len * p.d, p.d, 1};
        const int64_t ks[4] = {(int64_t)p.kv_heads * p.kv_len * p.d, (int64_t)p.kv_len * p.d, p.d, 1};
        const int64_t vs[4] = {(int64_t)p.kv_heads * p.kv_len * p.dv, (int64_t)p.kv_len * p.dv, p.dv, 1};
        for (int i = 0; i < 4; ++i) {
            p.q_stride[i] = qs[i];
            p.k_stride[i] = ks[i];
            p.v_stride[i] = vs[i];
        }
        kernel_dtype = kF16;
    }
    dispatch(l.d_pad, kernel_dtype, p, stream);
    if (l.accum) run_combine(p, stream);
}

void launch_concat(const ConcatArgs& a) {
    if (a.batch < 0 || a.heads < 0 || a.past_len < 0 || a.new_len < 0 || a.dim <= 0) {
        invalid("concat: negative dimensions");
    }
    if (a.elem_bytes != 2 && a.elem_bytes != 4) invalid("concat: element size must be 2 or 4");
    const int64_t n = a.batch * a.heads * (a.past_len + a.new_len) * a.dim;
    if (n == 0) return;
    if (a.present == 0) invalid("present is a null device pointer");
    if (a.past_len > 0 && a.past == 0) invalid("past is a null device pointer");
    if (a.new_len > 0 && a.src == 0) invalid("new K/V is a null device pointer");
    set_device(a.device);
    const int64_t ns[4] = {a.new_strides[0], a.new_strides[1], a.new_strides[2], a.new_strides[3]};
    run_concat(reinterpret_cast<const void*>(a.past), reinterpret_cast<const void*>(a.src), ns,
               reinterpret_cast<void*>(a.present), (int)a.batch, (int)a.heads, (int)a.past_len,
               (int)a.new_len, (int)a.dim, a.elem_bytes, reinterpret_cast<cudaStream_t>(a.stream));
}

}  // namespace flash_ort
