//! The kernel object ORT creates per node: attributes parsed once, then `compute` per Run.
//! It is immutable after creation, so concurrent `Run` calls on one session are safe.

use std::ffi::CString;

use ort_sys::{OrtKernelContext, OrtKernelInfo};

use super::api::{api, succeeded};
use super::op::Provider;
use super::tensors::{CallInputs, KernelContext};
use crate::attention::{validate, AttentionAttrs, AttentionProblem, DType};
use crate::{Error, Result};

pub struct FlashKernel {
    pub provider: Provider,
    pub dtype: DType,
    pub attrs: AttentionAttrs,
}

fn attr_i64(info: *const OrtKernelInfo, name: &str) -> Result<Option<i64>> {
    let api = api()?;
    let c = CString::new(name).map_err(|_| Error::Other("attribute name".into()))?;
    let mut v = 0i64;
    // SAFETY: `info` is live during kernel creation; a missing attribute returns an error status.
    let ok = succeeded(unsafe { (api.KernelInfoGetAttribute_int64)(info, c.as_ptr(), &mut v) });
    Ok(ok.then_some(v))
}

fn attr_f32(info: *const OrtKernelInfo, name: &str) -> Result<Option<f32>> {
    let api = api()?;
    let c = CString::new(name).map_err(|_| Error::Other("attribute name".into()))?;
    let mut v = 0f32;
    // SAFETY: as in `attr_i64`.
    let ok = succeeded(unsafe { (api.KernelInfoGetAttribute_float)(info, c.as_ptr(), &mut v) });
    Ok(ok.then_some(v))
}

impl FlashKernel {
    pub fn create(provider: Provider, dtype: DType, info: *const OrtKernelInfo) -> Result<Self> {
        let attrs = AttentionAttrs::from_raw(
            attr_i64(info, "is_causal")?,
            attr_f32(info, "scale")?,
            attr_i64(info, "q_num_heads")?,
            attr_i64(info, "kv_num_heads")?,
            attr_f32(info, "softcap")?,
            attr_i64(info, "window_left")?,
            attr_i64(info, "window_right")?,
        )?;
        Ok(FlashKernel {
            provider,
            dtype,
            attrs,
        })
    }

    pub fn compute(&self, ctx: *mut OrtKernelContext) -> Result<()> {
        let ctx = KernelContext::new(ctx)?;
        let inputs = CallInputs::read(&ctx)?;
        let descs = inputs.descs();
        let problem: AttentionProblem = validate(&self.attrs, &descs)?;
        if problem.dtype != self.dtype {
            return Err(Error::InvalidArgument(format!(
                "input Q: this kernel was registered for {}, got {}",
                self.dtype.name(),
                problem.dtype.name()
            )));
        }
        match self.provider {
            Provider::Cpu => super::cpu_compute::run(&ctx, &problem, &inputs),
            #[cfg(feature = "cuda")]
            Provider::Cuda => super::cuda_compute::run(&ctx, &problem, &inputs),
            #[cfg(not(feature = "cuda"))]
            Provider::Cuda => Err(Error::NotImplemented(
                "this build of flash-ort has no CUDA support".into(),
            )),
        }
    }
}
