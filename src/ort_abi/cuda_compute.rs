//! One `Compute` on the CUDA execution provider: device pointers, ORT's compute stream, the
//! device taken from Q's memory info, scratch from ORT's allocator for that device. Nothing here
//! synchronises, blocks or allocates outside ORT, so CUDA graph capture works.

use std::ffi::c_void;
use std::ptr;

use ort_sys::{OrtAllocator, OrtMemoryInfo};

use super::api::check;
use super::tensors::{CallInputs, Input, KernelContext};
use crate::attention::{AttentionProblem, Strides4};
use crate::cuda::{self, DevicePtrs};
use crate::{Error, Result};

/// A block from ORT's device allocator, returned to it on drop, right after the enqueue. That is
/// safe only because the block is allocated on this kernel's compute stream
/// (`KernelContext_GetScratchBuffer`): ORT's arena then makes any other stream that gets the
/// block next wait for this one. A block from the allocator's plain `Alloc` carries no stream,
/// and concurrent `Run` calls (each on a stream of its own) were handed the same block while this
/// kernel still used it: wrong results in 6 of 80 runs of 8 threads (fp32 MiniLM on an H200).
struct DeviceScratch {
    alloc: *mut OrtAllocator,
    ptr: *mut c_void,
    release_allocator: unsafe extern "system" fn(*mut OrtAllocator),
}

impl Drop for DeviceScratch {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from this allocator (its Alloc, or KernelContext_GetScratchBuffer on
        // the same device allocator); the allocator wrapper is ours to release.
        unsafe {
            if !self.ptr.is_null() {
                if let Some(free) = (*self.alloc).Free {
                    free(self.alloc, self.ptr);
                }
            }
            (self.release_allocator)(self.alloc);
        }
    }
}

fn device_scratch(
    ctx: &KernelContext,
    mem: *const OrtMemoryInfo,
    bytes: usize,
    stream: *mut c_void,
) -> Result<Option<DeviceScratch>> {
    if bytes == 0 {
        return Ok(None);
    }
    let api = ctx.api();
    let mut alloc: *mut OrtAllocator = ptr::null_mut();
    // SAFETY: `mem` describes the device Q lives on; the allocator wrapper is released on drop.
    check(
        unsafe { (api.KernelContext_GetAllocator)(ctx.ctx, mem, &mut alloc) },
        "KernelContext_GetAllocator",
    )?;
    if alloc.is_null() {
        return Err(Error::Device("ORT returned no device allocator".into()));
    }
    let mut s = DeviceScratch {
        alloc,
        ptr: ptr::null_mut(),
        release_allocator: api.ReleaseAllocator,
    };
    if stream.is_null() {
        // No compute stream (the legacy default stream orders everything anyway).
        // SAFETY: a live allocator; Alloc returns null on failure.
        s.ptr = unsafe {
            (*alloc)
                .Alloc
                .map(|a| a(alloc, bytes))
                .unwrap_or(ptr::null_mut())
        };
    } else {
        // SAFETY: live context with a compute stream (ORT dereferences it unchecked, hence the
        // branch); the block comes from the same device allocator that frees it on drop.
        check(
            unsafe { (api.KernelContext_GetScratchBuffer)(ctx.ctx, mem, bytes, &mut s.ptr) },
            "KernelContext_GetScratchBuffer",
        )?;
    }
    if s.ptr.is_null() {
        return Err(Error::Device(format!(
            "could not allocate {bytes} bytes of device scratch"
        )));
    }
    Ok(Some(s))
}

pub fn run(ctx: &KernelContext, p: &AttentionProblem, inputs: &CallInputs) -> Result<()> {
    let (q, k, v) = (&inputs.q, &inputs.k, &inputs.v);
    let api = ctx.api();

    let mut mem: *const OrtMemoryInfo = ptr::null();
    // SAFETY: Q is a live input value.
    check(
        unsafe { (api.GetTensorMemoryInfo)(q.value, &mut mem) },
        "GetTensorMemoryInfo",
    )?;
    let mut device = 0i32;
    // SAFETY: `mem` belongs to Q's value.
    check(
        unsafe { (api.MemoryInfoGetId)(mem, &mut device) },
        "MemoryInfoGetId",
    )?;
    let mut stream: *mut c_void = ptr::null_mut();
    // SAFETY: live context; the CUDA EP returns its compute stream (null = legacy default).
    check(
        unsafe { (api.KernelContext_GetGPUComputeStream)(ctx.ctx, &mut stream) },
        "KernelContext_GetGPUComputeStream",
    )?;

    let esize = p.dtype.size_of();
    // present = concat(past, new) on the device, into the output when requested, else scratch.
    let mut scratch_kv = Vec::new();
    let mut kv = |out_index: usize,
                  name: &str,
                  dim: usize,
                  past: Option<&Input>,
                  new: &Input,
                  strides: Strides4|
     -> Result<(u64, Strides4)> {
        let present = ctx.output(out_index, &p.present_shape(dim), name)?;
        let target = match (present, past) {
            (Some(dst), _) => dst,
            (None, Some(_)) => {
                let bytes = p.batch * p.kv_heads * p.kv_len * dim * esize;
                let s = device_scratch(ctx, mem, bytes, stream)?
                    .ok_or_else(|| Error::Other("empty KV scratch".into()))?;
                let ptr = s.ptr;
                scratch_kv.push(s);
                ptr
            }
            (None, None) => return Ok((new.data as u64, strides)),
        };
        cuda::concat_kv(
            p,
            dim,
            past.map_or(0, |x| x.data as u64),
            new.data as u64,
            strides,
            target as u64,
            stream,
            device,
        )?;
        Ok((target as u64, p.present_strides(dim)))
    };
    let (k_ptr, k_strides) = kv(
        1,
        "present_key",
        p.head_dim,
        inputs.past_key.as_ref(),
        k,
        p.k_strides,
    )?;
    let (v_ptr, v_strides) = kv(
        2,
        "present_value",
        p.v_head_dim,
        inputs.past_value.as_ref(),
        v,
        p.v_strides,
    )?;

    let out = ctx
        .output(0, &p.out_shape(), "Y")?
        .ok_or_else(|| Error::Other("output Y is required".into()))?;
    let ptrs = DevicePtrs {
        q: q.data as u64,
        k: k_ptr,
        v: v_ptr,
        mask: inputs.attn_mask.as_ref().map_or(0, |m| m.data as u64),
        nonpad_kv_seqlen: inputs
            .nonpad_kv_seqlen
            .as_ref()
            .map_or(0, |n| n.data as u64),
        out: out as u64,
    };
    let bytes = cuda::scratch_bytes(p, device)?;
    let scratch = device_scratch(ctx, mem, bytes, stream)?;
    let (s_ptr, s_len) = scratch.as_ref().map_or((0, 0), |s| (s.ptr as u64, bytes));
    cuda::launch(p, k_strides, v_strides, &ptrs, s_ptr, s_len, stream, device)
}
