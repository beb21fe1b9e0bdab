//! The `OrtCustomOp` tables: one per (execution provider, dtype), all with the same 7-in/3-out
//! signature as ORT requires for overloads of one name. Callbacks recover the [`FlashOp`] that
//! embeds the table and never unwind.

use std::ffi::{c_char, c_void};

use ort_sys::{
    ONNXTensorElementDataType as T, OrtApi, OrtCustomOp,
    OrtCustomOpInputOutputCharacteristic as Ch, OrtKernelContext, OrtKernelInfo, OrtMemType,
    OrtShapeInferContext, OrtStatusPtr,
};

use super::api::{cstr, guard};
use super::kernel::FlashKernel;
use super::tensors::onnx_type;
use crate::attention::DType;

/// Where a kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda,
}

/// An `OrtCustomOp` followed by what our callbacks need to know about it.
#[repr(C)]
pub struct FlashOp {
    /// Must stay the first field: ORT hands callbacks a pointer to it.
    base: OrtCustomOp,
    pub provider: Provider,
    pub dtype: DType,
}

pub const OP_NAME: &[u8] = b"FlashAttention\0";
pub const DOMAIN: &[u8] = b"com.flash\0";
/// The newest `OrtCustomOp` layout this library fills (KernelComputeV2 ≥ 16, InferOutputShapeFn ≥ 17).
pub const OP_STRUCT_VERSION: u32 = 17;

const NUM_INPUTS: usize = 7;
const NUM_OUTPUTS: usize = 3;

impl FlashOp {
    /// Builds a table that declares `version` (≤ the host's API version, ≥ 17).
    pub fn new(provider: Provider, dtype: DType, version: u32) -> Self {
        // SAFETY: OrtCustomOp is a C struct of an integer and nullable function pointers, for which
        // all-zero is a valid value (no callback).
        let mut base: OrtCustomOp = unsafe { std::mem::zeroed() };
        base.version = version;
        base.CreateKernel = None;
        base.GetName = Some(get_name);
        base.GetExecutionProviderType = Some(get_provider);
        base.GetInputType = Some(get_input_type);
        base.GetInputTypeCount = Some(get_input_count);
        base.GetOutputType = Some(get_output_type);
        base.GetOutputTypeCount = Some(get_output_count);
        base.KernelCompute = None;
        base.KernelDestroy = Some(kernel_destroy);
        base.GetInputCharacteristic = Some(input_characteristic);
        base.GetOutputCharacteristic = Some(output_characteristic);
        base.GetInputMemoryType = Some(input_memory_type);
        base.GetVariadicInputMinArity = Some(zero);
        base.GetVariadicInputHomogeneity = Some(zero);
        base.GetVariadicOutputMinArity = Some(zero);
        base.GetVariadicOutputHomogeneity = Some(zero);
        base.CreateKernelV2 = Some(create_kernel);
        base.KernelComputeV2 = Some(kernel_compute);
        base.InferOutputShapeFn = Some(infer_shape);
        base.GetStartVersion = Some(start_version);
        base.GetEndVersion = None;
        FlashOp {
            base,
            provider,
            dtype,
        }
    }

    pub fn as_ort(&self) -> *const OrtCustomOp {
        &self.base
    }
}

/// SAFETY (for every callback below): ORT only passes back pointers to tables we registered,
/// which are `FlashOp`s (repr(C), `base` first) leaked for the life of the process.
unsafe fn this<'a>(op: *const OrtCustomOp) -> &'a FlashOp {
    &*(op as *const FlashOp)
}

unsafe extern "system" fn get_name(_: *const OrtCustomOp) -> *const c_char {
    cstr(OP_NAME)
}

unsafe extern "system" fn get_provider(op: *const OrtCustomOp) -> *const c_char {
    match this(op).provider {
        Provider::Cpu => cstr(b"CPUExecutionProvider\0"),
        Provider::Cuda => cstr(b"CUDAExecutionProvider\0"),
    }
}

unsafe extern "system" fn get_input_count(_: *const OrtCustomOp) -> usize {
    NUM_INPUTS
}

unsafe extern "system" fn get_output_count(_: *const OrtCustomOp) -> usize {
    NUM_OUTPUTS
}

unsafe extern "system" fn get_input_type(op: *const OrtCustomOp, index: usize) -> T {
    match index {
        // attn_mask: bool, float or Q's type — the one dynamically typed input ORT allows.
        3 => T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
        6 => T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
        _ => onnx_type(this(op).dtype),
    }
}

unsafe extern "system" fn get_output_type(op: *const OrtCustomOp, _index: usize) -> T {
    onnx_type(this(op).dtype)
}

unsafe extern "system" fn input_characteristic(_: *const OrtCustomOp, index: usize) -> Ch {
    if index < 3 {
        Ch::INPUT_OUTPUT_REQUIRED
    } else {
        Ch::INPUT_OUTPUT_OPTIONAL
    }
}

unsafe extern "system" fn output_characteristic(_: *const OrtCustomOp, index: usize) -> Ch {
    if index == 0 {
        Ch::INPUT_OUTPUT_REQUIRED
    } else {
        Ch::INPUT_OUTPUT_OPTIONAL
    }
}

unsafe extern "system" fn input_memory_type(_: *const OrtCustomOp, _index: usize) -> OrtMemType {
    // Everything, nonpad_kv_seqlen included, stays on the provider's device: a CUDA kernel reads
    // the lengths on the GPU so that no host copy or synchronisation is needed.
    OrtMemType::OrtMemTypeDefault
}

unsafe extern "system" fn zero(_: *const OrtCustomOp) -> i32 {
    0
}

unsafe extern "system" fn start_version(_: *const OrtCustomOp) -> i32 {
    1
}

unsafe extern "system" fn create_kernel(
    op: *const OrtCustomOp,
    _api: *const OrtApi,
    info: *const OrtKernelInfo,
    kernel: *mut *mut c_void,
) -> OrtStatusPtr {
    guard(|| {
        let op = this(op);
        let k = FlashKernel::create(op.provider, op.dtype, info)?;
        *kernel = Box::into_raw(Box::new(k)).cast();
        Ok(())
    })
}

unsafe extern "system" fn kernel_compute(
    kernel: *mut c_void,
    ctx: *mut OrtKernelContext,
) -> OrtStatusPtr {
    guard(|| {
        // SAFETY: `kernel` was made by `create_kernel` and lives until `kernel_destroy`; compute
        // only reads it, so concurrent Run calls are fine.
        let k = &*(kernel as *const FlashKernel);
        k.compute(ctx)
    })
}

unsafe extern "system" fn kernel_destroy(kernel: *mut c_void) {
    if !kernel.is_null() {
        // SAFETY: made by Box::into_raw in `create_kernel`, destroyed once by ORT.
        let _ = std::panic::catch_unwind(|| drop(Box::from_raw(kernel as *mut FlashKernel)));
    }
}

unsafe extern "system" fn infer_shape(
    _op: *const OrtCustomOp,
    ctx: *mut OrtShapeInferContext,
) -> OrtStatusPtr {
    guard(|| super::shape_infer::infer(ctx))
}
