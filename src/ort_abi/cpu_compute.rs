//! One `Compute` on the CPU execution provider: typed views of ORT's buffers, the KV-cache
//! outputs, and the FlashAttention kernel run on ORT's intra-op thread pool.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use half::{bf16, f16};

use super::api::check;
use super::tensors::{CallInputs, Input, KernelContext};
use crate::attention::{
    cpu, extent, kv_cache, AttentionProblem, CpuInputs, DType, Elems, ElemsMut, MaskData, MaskKind,
    ParallelFor, Strides4,
};
use crate::{Error, Result};

/// # Safety
/// `data` must point to `len` elements of `dtype` that stay valid and unmodified for `'a`.
unsafe fn elems<'a>(dtype: DType, data: *const c_void, len: usize) -> Elems<'a> {
    if len == 0 {
        return match dtype {
            DType::F32 => Elems::F32(&[]),
            DType::F16 => Elems::F16(&[]),
            DType::BF16 => Elems::BF16(&[]),
        };
    }
    match dtype {
        DType::F32 => Elems::F32(std::slice::from_raw_parts(data.cast(), len)),
        DType::F16 => Elems::F16(std::slice::from_raw_parts(data.cast::<f16>(), len)),
        DType::BF16 => Elems::BF16(std::slice::from_raw_parts(data.cast::<bf16>(), len)),
    }
}

/// # Safety
/// `data` must point to `len` writable elements of `dtype`, not aliased for `'a`.
unsafe fn elems_mut<'a>(dtype: DType, data: *mut c_void, len: usize) -> ElemsMut<'a> {
    if len == 0 {
        return match dtype {
            DType::F32 => ElemsMut::F32(&mut []),
            DType::F16 => ElemsMut::F16(&mut []),
            DType::BF16 => ElemsMut::BF16(&mut []),
        };
    }
    match dtype {
        DType::F32 => ElemsMut::F32(std::slice::from_raw_parts_mut(data.cast(), len)),
        DType::F16 => ElemsMut::F16(std::slice::from_raw_parts_mut(data.cast::<f16>(), len)),
        DType::BF16 => ElemsMut::BF16(std::slice::from_raw_parts_mut(data.cast::<bf16>(), len)),
    }
}

/// Owned scratch for K/V when past is given but present is not requested.
enum Scratch {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Scratch {
    fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => Scratch::F32(vec![0.0; len]),
            DType::F16 => Scratch::F16(vec![f16::ZERO; len]),
            DType::BF16 => Scratch::BF16(vec![bf16::ZERO; len]),
        }
    }
    fn as_mut_ptr(&mut self) -> *mut c_void {
        match self {
            Scratch::F32(v) => v.as_mut_ptr().cast(),
            Scratch::F16(v) => v.as_mut_ptr().cast(),
            Scratch::BF16(v) => v.as_mut_ptr().cast(),
        }
    }
}

/// Where the keys (or values) the kernel reads live after the KV-cache step.
struct KvSource {
    data: *const c_void,
    len: usize,
    strides: Strides4,
    _scratch: Option<Scratch>,
}

/// Writes present = concat(past, new) when asked, and returns the buffer attention reads.
#[allow(clippy::too_many_arguments)]
fn kv_source(
    ctx: &KernelContext,
    p: &AttentionProblem,
    out_index: usize,
    name: &str,
    dim: usize,
    past: Option<&Input>,
    new: &Input,
    new_strides: Strides4,
) -> Result<KvSource> {
    let present_len = p.batch * p.kv_heads * p.kv_len * dim;
    let present = ctx.output(out_index, &p.present_shape(dim), name)?;
    let new_len = new.elements();
    // SAFETY: input buffers hold `elements()` items of the validated dtype (checked by ORT's
    // shape and our validation) and are not written during this call.
    let new_elems = unsafe { elems(p.dtype, new.data, new_len) };
    let past_elems = past.map(|x| unsafe { elems(p.dtype, x.data, x.elements()) });
    match (present, past) {
        (Some(dst), _) => {
            // SAFETY: ORT allocated `present_len` elements for this output.
            let dst_mut = unsafe { elems_mut(p.dtype, dst, present_len) };
            kv_cache::concat_into(p, dim, past_elems, new_elems, new_strides, dst_mut)?;
            Ok(KvSource {
                data: dst,
                len: present_len,
                strides: p.present_strides(dim),
                _scratch: None,
            })
        }
        (None, Some(_)) => {
            let mut scratch = Scratch::zeros(p.dtype, present_len);
            let ptr = scratch.as_mut_ptr();
            // SAFETY: scratch holds `present_len` elements and is only borrowed here.
            let dst_mut = unsafe { elems_mut(p.dtype, ptr, present_len) };
            kv_cache::concat_into(p, dim, past_elems, new_elems, new_strides, dst_mut)?;
            Ok(KvSource {
                data: ptr,
                len: present_len,
                strides: p.present_strides(dim),
                _scratch: Some(scratch),
            })
        }
        (None, None) => Ok(KvSource {
            data: new.data,
            len: new_len,
            strides: new_strides,
            _scratch: None,
        }),
    }
}

pub fn run(ctx: &KernelContext, p: &AttentionProblem, inputs: &CallInputs) -> Result<()> {
    let (q, k, v) = (&inputs.q, &inputs.k, &inputs.v);

    let k_src = kv_source(
        ctx,
        p,
        1,
        "present_key",
        p.head_dim,
        inputs.past_key.as_ref(),
        k,
        p.k_strides,
    )?;
    let v_src = kv_source(
        ctx,
        p,
        2,
        "present_value",
        p.v_head_dim,
        inputs.past_value.as_ref(),
        v,
        p.v_strides,
    )?;

    let out_shape = p.out_shape();
    let out_len = extent([p.batch, p.q_heads, p.q_len, p.v_head_dim], p.out_strides);
    let out_ptr = ctx
        .output(0, &out_shape, "Y")?
        .ok_or_else(|| Error::Other("output Y is required".into()))?;

    let mask = match (inputs.attn_mask.as_ref(), p.mask) {
        (Some(m), Some(desc)) => {
            let n = m.elements();
            // SAFETY: the mask buffer holds `n` elements of the type its descriptor names.
            Some(unsafe {
                match desc.kind {
                    MaskKind::Bool => MaskData::Bool(if n == 0 {
                        &[]
                    } else {
                        std::slice::from_raw_parts(m.data.cast(), n)
                    }),
                    MaskKind::Additive(t) => match elems(t, m.data, n) {
                        Elems::F32(s) => MaskData::F32(s),
                        Elems::F16(s) => MaskData::F16(s),
                        Elems::BF16(s) => MaskData::BF16(s),
                    },
                }
            })
        }
        _ => None,
    };
    let nonpad = inputs.nonpad_kv_seqlen.as_ref().map(|n| {
        let len = n.elements();
        // SAFETY: int64 tensor of `len` elements on the CPU provider.
        if len == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(n.data.cast::<i64>(), len) }
        }
    });

    // SAFETY: all buffers were sized from the validated problem; `check_buffers` inside the
    // kernel re-checks every length before indexing.
    let inp = unsafe {
        CpuInputs {
            q: elems(p.dtype, q.data, q.elements()),
            k: elems(p.dtype, k_src.data, k_src.len),
            k_strides: k_src.strides,
            v: elems(p.dtype, v_src.data, v_src.len),
            v_strides: v_src.strides,
            mask,
            nonpad_kv_seqlen: nonpad,
        }
    };
    // SAFETY: ORT allocated Y with `out_shape`, whose element count is `out_len`.
    let out = unsafe { elems_mut(p.dtype, out_ptr, out_len) };
    let pool = OrtPool::new(ctx);
    cpu::attention(p, &inp, out, &pool)?;
    pool.finish()
}

/// ORT's intra-op thread pool behind [`ParallelFor`]. Task panics are caught on the worker
/// and reported as an error after the loop, as is a failure of the pool itself.
struct OrtPool<'a> {
    ctx: &'a KernelContext,
    panicked: AtomicBool,
    error: Mutex<Option<Error>>,
}

// SAFETY: the pool is only driven from the thread running Compute; workers only touch the task
// closure (Sync) and the atomic flag.
unsafe impl Sync for OrtPool<'_> {}

struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    panicked: &'a AtomicBool,
}

unsafe extern "C" fn run_job(data: *mut c_void, i: usize) {
    // SAFETY: `data` is the `Job` on `for_each`'s stack, alive until ParallelFor returns.
    let job = &*(data as *const Job);
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.task)(i))).is_err() {
        job.panicked.store(true, Ordering::Relaxed);
    }
}

impl<'a> OrtPool<'a> {
    fn new(ctx: &'a KernelContext) -> Self {
        OrtPool {
            ctx,
            panicked: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }
    fn finish(&self) -> Result<()> {
        if let Some(e) = self.error.lock().ok().and_then(|mut e| e.take()) {
            return Err(e);
        }
        if self.panicked.load(Ordering::Relaxed) {
            return Err(Error::Other(
                "internal error: a CPU attention task panicked".into(),
            ));
        }
        Ok(())
    }
}

impl ParallelFor for OrtPool<'_> {
    fn for_each(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        let job = Job {
            task,
            panicked: &self.panicked,
        };
        let api = self.ctx.api();
        // SAFETY: `job` outlives the call, which returns only when all `n` tasks have run.
        let status = unsafe {
            (api.KernelContext_ParallelFor)(
                self.ctx.ctx,
                run_job,
                n,
                0,
                &job as *const Job as *mut c_void,
            )
        };
        if let Err(e) = check(status, "KernelContext_ParallelFor") {
            if let Ok(mut slot) = self.error.lock() {
                *slot = Some(e);
            }
        }
    }
}
