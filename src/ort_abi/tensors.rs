//! Reading inputs and creating outputs through an `OrtKernelContext`, and translating ORT's
//! element types and shapes into the crate's [`TensorDesc`].

use std::ffi::c_void;
use std::ptr;

use ort_sys::{
    ONNXTensorElementDataType as T, OrtApi, OrtKernelContext, OrtTensorTypeAndShapeInfo, OrtValue,
};

use super::api::{api, check};
use crate::attention::{DType, ElemType, InputDescs, TensorDesc};
use crate::{Error, Result};

pub fn elem_type(t: T) -> ElemType {
    match t {
        T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT => ElemType::F32,
        T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 => ElemType::F16,
        T::ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 => ElemType::BF16,
        T::ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL => ElemType::Bool,
        T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 => ElemType::I64,
        T::ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE => ElemType::Other("double"),
        T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 => ElemType::Other("int32"),
        T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 => ElemType::Other("uint8"),
        T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 => ElemType::Other("int8"),
        _ => ElemType::Other("an unsupported type"),
    }
}

pub fn onnx_type(d: DType) -> T {
    match d {
        DType::F32 => T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
        DType::F16 => T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
        DType::BF16 => T::ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16,
    }
}

/// Element type and dims (−1 for unknown) of a type-and-shape info, plus symbolic dim names
/// (empty string where none).
pub fn read_type_shape(
    api: &OrtApi,
    info: *const OrtTensorTypeAndShapeInfo,
) -> Result<(TensorDesc, Vec<String>)> {
    let mut t = T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    let mut rank = 0usize;
    // SAFETY: `info` is a live type-and-shape info from the host; buffers are sized by `rank`.
    unsafe {
        check(
            (api.GetTensorElementType)(info, &mut t),
            "GetTensorElementType",
        )?;
        check(
            (api.GetDimensionsCount)(info, &mut rank),
            "GetDimensionsCount",
        )?;
    }
    let mut dims = vec![0i64; rank];
    let mut syms: Vec<*const std::ffi::c_char> = vec![ptr::null(); rank];
    // SAFETY: as above.
    unsafe {
        check(
            (api.GetDimensions)(info, dims.as_mut_ptr(), rank),
            "GetDimensions",
        )?;
        check(
            (api.GetSymbolicDimensions)(info, syms.as_mut_ptr(), rank),
            "GetSymbolicDimensions",
        )?;
    }
    let names = syms
        .iter()
        .map(|&p| {
            if p.is_null() {
                String::new()
            } else {
                unsafe { std::ffi::CStr::from_ptr(p) }
                    .to_string_lossy()
                    .into_owned()
            }
        })
        .collect();
    Ok((TensorDesc::new(elem_type(t), &dims), names))
}

/// One present input: its description and data pointer (null only when it has no elements).
pub struct Input {
    pub desc: TensorDesc,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub value: *const OrtValue,
    pub data: *const c_void,
}

impl Input {
    pub fn elements(&self) -> usize {
        self.desc.shape.iter().map(|&d| d.max(0) as usize).product()
    }
}

/// The kernel context of one `Compute` call.
pub struct KernelContext {
    pub ctx: *mut OrtKernelContext,
    api: &'static OrtApi,
}

impl KernelContext {
    pub fn new(ctx: *mut OrtKernelContext) -> Result<Self> {
        if ctx.is_null() {
            return Err(Error::Other("null kernel context".into()));
        }
        Ok(KernelContext { ctx, api: api()? })
    }

    pub fn api(&self) -> &'static OrtApi {
        self.api
    }

    pub fn input_count(&self) -> Result<usize> {
        let mut n = 0;
        // SAFETY: live context for this call.
        check(
            unsafe { (self.api.KernelContext_GetInputCount)(self.ctx, &mut n) },
            "KernelContext_GetInputCount",
        )?;
        Ok(n)
    }

    pub fn output_count(&self) -> Result<usize> {
        let mut n = 0;
        // SAFETY: live context for this call.
        check(
            unsafe { (self.api.KernelContext_GetOutputCount)(self.ctx, &mut n) },
            "KernelContext_GetOutputCount",
        )?;
        Ok(n)
    }

    /// Input `i`, or `None` when the node leaves that optional input out.
    pub fn input(&self, i: usize, name: &str) -> Result<Option<Input>> {
        if i >= self.input_count()? {
            return Ok(None);
        }
        let mut value: *const OrtValue = ptr::null();
        // SAFETY: index checked against the input count.
        check(
            unsafe { (self.api.KernelContext_GetInput)(self.ctx, i, &mut value) },
            name,
        )?;
        if value.is_null() {
            return Ok(None);
        }
        // Older hosts hand out an empty OrtValue (not null) for an omitted optional input.
        let mut has_value = 0;
        // SAFETY: `value` is a live OrtValue of this context.
        check(unsafe { (self.api.HasValue)(value, &mut has_value) }, name)?;
        if has_value == 0 {
            return Ok(None);
        }
        let mut info: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
        // SAFETY: `value` is a live input value; the info is released below.
        check(
            unsafe { (self.api.GetTensorTypeAndShape)(value, &mut info) },
            name,
        )?;
        let desc = read_type_shape(self.api, info);
        // SAFETY: created just above.
        unsafe { (self.api.ReleaseTensorTypeAndShapeInfo)(info) };
        let (desc, _) = desc?;
        let mut data: *mut c_void = ptr::null_mut();
        // SAFETY: GetTensorMutableData only returns the value's buffer; we never write inputs.
        check(
            unsafe { (self.api.GetTensorMutableData)(value as *mut OrtValue, &mut data) },
            name,
        )?;
        let input = Input { desc, value, data };
        if data.is_null() && input.elements() > 0 {
            return Err(Error::Other(format!(
                "input {name}: ORT returned no data for a non-empty tensor"
            )));
        }
        Ok(Some(input))
    }

    /// Allocates output `i` with `shape` and returns its buffer, or `None` when the node does not
    /// produce that optional output.
    pub fn output(&self, i: usize, shape: &[i64], name: &str) -> Result<Option<*mut c_void>> {
        if i >= self.output_count()? {
            return Ok(None);
        }
        let mut value: *mut OrtValue = ptr::null_mut();
        // SAFETY: index checked; shape buffer lives across the call.
        check(
            unsafe {
                (self.api.KernelContext_GetOutput)(
                    self.ctx,
                    i,
                    shape.as_ptr(),
                    shape.len(),
                    &mut value,
                )
            },
            name,
        )?;
        if value.is_null() {
            return Ok(None);
        }
        let mut data: *mut c_void = ptr::null_mut();
        // SAFETY: a live output value we own for this call.
        check(
            unsafe { (self.api.GetTensorMutableData)(value, &mut data) },
            name,
        )?;
        let n: i64 = shape.iter().product();
        if data.is_null() && n > 0 {
            return Err(Error::Other(format!(
                "output {name}: ORT returned no buffer"
            )));
        }
        Ok(Some(data))
    }
}

/// Names of the operator's inputs, in order, for messages.
pub const INPUT_NAMES: [&str; 7] = [
    "Q",
    "K",
    "V",
    "attn_mask",
    "past_key",
    "past_value",
    "nonpad_kv_seqlen",
];

/// The inputs of one `Compute` call, read once: Q, K and V are required, the rest optional.
pub struct CallInputs {
    pub q: Input,
    pub k: Input,
    pub v: Input,
    pub attn_mask: Option<Input>,
    pub past_key: Option<Input>,
    pub past_value: Option<Input>,
    pub nonpad_kv_seqlen: Option<Input>,
}

impl CallInputs {
    pub fn read(ctx: &KernelContext) -> Result<Self> {
        let [q, k, v, attn_mask, past_key, past_value, nonpad_kv_seqlen] =
            std::array::from_fn(|i| ctx.input(i, INPUT_NAMES[i]));
        let required = |x: Result<Option<Input>>, name: &str| {
            x?.ok_or_else(|| Error::InvalidArgument(format!("input {name} is required")))
        };
        Ok(CallInputs {
            q: required(q, "Q")?,
            k: required(k, "K")?,
            v: required(v, "V")?,
            attn_mask: attn_mask?,
            past_key: past_key?,
            past_value: past_value?,
            nonpad_kv_seqlen: nonpad_kv_seqlen?,
        })
    }

    /// Types and shapes, for validation.
    pub fn descs(&self) -> InputDescs {
        let d = |x: &Option<Input>| x.as_ref().map(|x| x.desc.clone());
        InputDescs {
            q: Some(self.q.desc.clone()),
            k: Some(self.k.desc.clone()),
            v: Some(self.v.desc.clone()),
            attn_mask: d(&self.attn_mask),
            past_key: d(&self.past_key),
            past_value: d(&self.past_value),
            nonpad_kv_seqlen: d(&self.nonpad_kv_seqlen),
        }
    }
}
