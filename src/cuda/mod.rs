//! CUDA side (feature `cuda`): the `cxx` bridge to `cpp/` (which launches the `kernels/`), device
//! properties through `cudarc`, and the API the ORT CUDA kernel calls: [`scratch_bytes`],
//! [`launch`], [`concat_kv`], [`device_count`]. Nothing here synchronizes or allocates.

mod device;

use crate::attention::{AttentionProblem, DType, MaskKind, Strides4};
use crate::{Error, Result};

pub use device::{device_count, device_props, DeviceProps};

#[cxx::bridge(namespace = "flash_ort")]
mod ffi {
    /// One attention call as `cpp/bridge.cc` sees it. Pointers are device addresses (0 = none);
    /// strides are in elements, indexed (batch, head, seq, dim).
    struct AttnArgs {
        q: u64,
        k: u64,
        v: u64,
        mask: u64,
        nonpad: u64,
        out: u64,
        scratch: u64,
        scratch_len: u64,
        stream: u64,
        device: i32,
        /// 0 fp32, 1 fp16, 2 bf16.
        dtype: i32,
        /// 0 none, 1 bool, 2 fp32, 3 fp16, 4 bf16 (additive).
        mask_kind: i32,
        batch: i64,
        q_heads: i64,
        kv_heads: i64,
        q_len: i64,
        kv_len: i64,
        head_dim: i64,
        v_head_dim: i64,
        q_strides: [i64; 4],
        k_strides: [i64; 4],
        v_strides: [i64; 4],
        out_strides: [i64; 4],
        mask_strides: [i64; 4],
        scale: f32,
        softcap: f32,
        /// −1 = unbounded; causal is already folded into `window_right` (≤ 0).
        window_left: i64,
        window_right: i64,
        sm_count: i32,
        /// Shared memory per SM in bytes (occupancy for the split-KV choice).
        smem_per_sm: i32,
    }

    /// What a call needs before launch.
    struct AttnPlan {
        num_splits: i32,
        scratch_bytes: u64,
        head_dim_padded: i32,
    }

    struct ConcatArgs {
        past: u64,
        src: u64,
        present: u64,
        new_strides: [i64; 4],
        batch: i64,
        heads: i64,
        past_len: i64,
        new_len: i64,
        dim: i64,
        elem_bytes: i32,
        stream: u64,
        device: i32,
    }

    unsafe extern "C++" {
        include!("flash-ort/cpp/bridge.h");
        fn plan_attention(args: &AttnArgs) -> Result<AttnPlan>;
        /// Enqueues the kernels. Unsafe: the pointers must be valid device memory of the sizes
        /// the arguments describe.
        unsafe fn launch_attention(args: &AttnArgs) -> Result<()>;
        unsafe fn launch_concat(args: &ConcatArgs) -> Result<()>;
    }
}

/// Device addresses of one call's tensors (`0` = absent).
#[derive(Clone, Copy, Debug, Default)]
pub struct DevicePtrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    /// 0 = none.
    pub mask: u64,
    /// 0 = none; int64 `[B]` on the device, clamped to `0..=kv_len` by the kernel.
    pub nonpad_kv_seqlen: u64,
    pub out: u64,
}

/// Turns a C++ exception message into the library error: "not implemented: …" and
/// "invalid argument: …" keep their meaning, anything else is a device failure.
fn map_err(e: cxx::Exception) -> Error {
    let msg = e.what().to_string();
    if let Some(rest) = msg.strip_prefix("not implemented: ") {
        Error::NotImplemented(format!("CUDA: {rest}"))
    } else if let Some(rest) = msg.strip_prefix("invalid argument: ") {
        Error::InvalidArgument(format!("CUDA: {rest}"))
    } else {
        Error::Device(format!("CUDA: {msg}"))
    }
}

fn strides_i64(s: Strides4) -> [i64; 4] {
    s.map(|x| x as i64)
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

fn window(w: Option<usize>) -> i64 {
    w.map_or(-1, |w| w.min(i64::MAX as usize) as i64)
}

fn args_for(
    p: &AttentionProblem,
    k_strides: Strides4,
    v_strides: Strides4,
    device: i32,
) -> Result<ffi::AttnArgs> {
    let props = device_props(device)?;
    let (mask_kind, mask_strides) = match &p.mask {
        None => (0, [0i64; 4]),
        Some(m) => {
            let kind = match m.kind {
                MaskKind::Bool => 1,
                MaskKind::Additive(DType::F32) => 2,
                MaskKind::Additive(DType::F16) => 3,
                MaskKind::Additive(DType::BF16) => 4,
            };
            (kind, strides_i64(m.strides))
        }
    };
    Ok(ffi::AttnArgs {
        q: 0,
        k: 0,
        v: 0,
        mask: 0,
        nonpad: 0,
        out: 0,
        scratch: 0,
        scratch_len: 0,
        stream: 0,
        device,
        dtype: dtype_code(p.dtype),
        mask_kind,
        batch: p.batch as i64,
        q_heads: p.q_heads as i64,
        kv_heads: p.kv_heads as i64,
        q_len: p.q_len as i64,
        kv_len: p.kv_len as i64,
        head_dim: p.head_dim as i64,
        v_head_dim: p.v_head_dim as i64,
        q_strides: strides_i64(p.q_strides),
        k_strides: strides_i64(k_strides),
        v_strides: strides_i64(v_strides),
        out_strides: strides_i64(p.out_strides),
        mask_strides,
        scale: p.scale,
        softcap: p.softcap,
        window_left: window(p.window_left),
        window_right: window(p.effective_window_right()),
        sm_count: props.sm_count,
        smem_per_sm: props.smem_per_sm,
    })
}

/// How a problem will run on `device`: split count and scratch size.
pub fn plan(p: &AttentionProblem, device: i32) -> Result<(usize, usize)> {
    // Strides do not change the plan.
    let args = args_for(p, p.k_strides, p.v_strides, device)?;
    let plan = ffi::plan_attention(&args).map_err(map_err)?;
    Ok((plan.num_splits as usize, plan.scratch_bytes as usize))
}

/// Scratch bytes (split-KV partials, LSE, fp16 copies of fp32 inputs) that [`launch`] needs for
/// this problem on this device; 0 if none.
pub fn scratch_bytes(p: &AttentionProblem, device: i32) -> Result<usize> {
    plan(p, device).map(|(_, bytes)| bytes)
}

/// Enqueues attention on `stream` (a `cudaStream_t`, null = the default stream) of `device`.
/// K/V are indexed with `k_strides`/`v_strides` over all `p.kv_len` positions. No allocation, no
/// synchronization; a failed launch comes back as [`Error::Device`].
#[allow(clippy::too_many_arguments)]
pub fn launch(
    p: &AttentionProblem,
    k_strides: Strides4,
    v_strides: Strides4,
    ptrs: &DevicePtrs,
    scratch: u64,
    scratch_len: usize,
    stream: *mut std::ffi::c_void,
    device: i32,
) -> Result<()> {
    if p.mask.is_some() != (ptrs.mask != 0) {
        return Err(Error::InvalidArgument(
            "CUDA: attn_mask presence does not match the validated problem".into(),
        ));
    }
    if p.has_nonpad_kv_seqlen != (ptrs.nonpad_kv_seqlen != 0) {
        return Err(Error::InvalidArgument(
            "CUDA: nonpad_kv_seqlen presence does not match the validated problem".into(),
        ));
    }
    let mut args = args_for(p, k_strides, v_strides, device)?;
    args.q = ptrs.q;
    args.k = ptrs.k;
    args.v = ptrs.v;
    args.mask = ptrs.mask;
    args.nonpad = ptrs.nonpad_kv_seqlen;
    args.out = ptrs.out;
    args.scratch = scratch;
    args.scratch_len = scratch_len as u64;
    args.stream = stream as u64;
    // SAFETY: the caller hands device buffers matching `p` (shapes validated by
    // `attention::validate`); the C++ side checks null/alignment/strides before launching.
    unsafe { ffi::launch_attention(&args) }.map_err(map_err)
}

/// Enqueues `present = concat(past [B,Hkv,P,dim] dense, new (indexed by new_strides))` into
/// `present [B,Hkv,P+S,dim]` on `stream` of `device`.
#[allow(clippy::too_many_arguments)]
pub fn concat_kv(
    p: &AttentionProblem,
    dim: usize,
    past: u64,
    new: u64,
    new_strides: Strides4,
    present: u64,
    stream: *mut std::ffi::c_void,
    device: i32,
) -> Result<()> {
    if p.past_len > 0 && past == 0 {
        return Err(Error::InvalidArgument(
            "CUDA: past_len > 0 but no past buffer".into(),
        ));
    }
    let args = ffi::ConcatArgs {
        past,
        src: new,
        present,
        new_strides: strides_i64(new_strides),
        batch: p.batch as i64,
        heads: p.kv_heads as i64,
        past_len: p.past_len as i64,
        new_len: p.new_kv_len as i64,
        dim: dim as i64,
        elem_bytes: p.dtype.size_of() as i32,
        stream: stream as u64,
        device,
    };
    // SAFETY: as for `launch`: device buffers of the described sizes, checked for null in C++.
    unsafe { ffi::launch_concat(&args) }.map_err(map_err)
}
