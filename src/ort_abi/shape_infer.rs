//! Output type and shape inference, so ORT can plan memory and downstream shapes before Run.
//! Unknown or symbolic dimensions propagate as symbols where they can; a dimension that cannot
//! be derived is left unknown rather than guessed.

use std::ffi::{c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

use ort_sys::{OrtApi, OrtOpAttr, OrtOpAttrType, OrtShapeInferContext, OrtTensorTypeAndShapeInfo};

use super::api::{api, check, succeeded};
use super::tensors::read_type_shape;
use crate::attention::TensorDesc;
use crate::{Error, Result};

/// Numbers the symbols given to unknown output dims (see `set_output`).
static UNKNOWN_DIMS: AtomicUsize = AtomicUsize::new(0);

/// One output dimension: a known size, a symbol, or unknown.
#[derive(Clone, Debug, PartialEq)]
enum Dim {
    Known(i64),
    Sym(String),
    Unknown,
}

fn dim_of(desc: &TensorDesc, syms: &[String], i: usize) -> Dim {
    match desc.shape.get(i) {
        Some(&d) if d >= 0 => Dim::Known(d),
        _ => match syms.get(i) {
            Some(s) if !s.is_empty() => Dim::Sym(s.clone()),
            _ => Dim::Unknown,
        },
    }
}

fn mul(a: &Dim, b: i64) -> Dim {
    match a {
        Dim::Known(x) => Dim::Known(x * b),
        _ => Dim::Unknown,
    }
}

fn div(a: &Dim, b: i64) -> Dim {
    match a {
        Dim::Known(x) if b > 0 && x % b == 0 => Dim::Known(x / b),
        _ => Dim::Unknown,
    }
}

struct Ctx {
    api: &'static OrtApi,
    ctx: *mut OrtShapeInferContext,
}

impl Ctx {
    fn input(&self, i: usize) -> Result<Option<(TensorDesc, Vec<String>)>> {
        let mut n = 0usize;
        // SAFETY: live inference context.
        check(
            unsafe { (self.api.ShapeInferContext_GetInputCount)(self.ctx, &mut n) },
            "ShapeInferContext_GetInputCount",
        )?;
        if i >= n {
            return Ok(None);
        }
        let mut info: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
        // SAFETY: index in range; an absent optional input reports an error or a null info.
        if !succeeded(unsafe {
            (self.api.ShapeInferContext_GetInputTypeShape)(self.ctx, i, &mut info)
        }) || info.is_null()
        {
            return Ok(None);
        }
        // The info belongs to the inference context (it must not be released here).
        let r = read_type_shape(self.api, info);
        // An absent optional input can come back as an undefined type with no shape.
        match r {
            Ok((d, _))
                if matches!(d.elem, crate::attention::ElemType::Other(_)) && d.shape.is_empty() =>
            {
                Ok(None)
            }
            Ok(x) => Ok(Some(x)),
            Err(_) => Ok(None),
        }
    }

    fn attr_int(&self, name: &str) -> Result<Option<i64>> {
        let c = CString::new(name).map_err(|_| Error::Other("attribute name".into()))?;
        let mut attr: *const OrtOpAttr = ptr::null();
        // SAFETY: live inference context; a missing attribute gives an error or a null attr.
        if !succeeded(unsafe {
            (self.api.ShapeInferContext_GetAttribute)(self.ctx, c.as_ptr(), &mut attr)
        }) || attr.is_null()
        {
            return Ok(None);
        }
        let mut v = 0i64;
        let mut written = 0usize;
        // SAFETY: reading one INT into an i64 buffer of matching size.
        let ok = succeeded(unsafe {
            (self.api.ReadOpAttr)(
                attr,
                OrtOpAttrType::ORT_OP_ATTR_INT,
                &mut v as *mut i64 as *mut c_void,
                std::mem::size_of::<i64>(),
                &mut written,
            )
        });
        Ok(ok.then_some(v))
    }

    fn set_output(&self, index: usize, like: &TensorDesc, dims: &[Dim]) -> Result<()> {
        let api = self.api;
        let mut info: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
        // SAFETY: creating, filling and releasing our own info object.
        unsafe {
            check(
                (api.CreateTensorTypeAndShapeInfo)(&mut info),
                "CreateTensorTypeAndShapeInfo",
            )?;
            let result = (|| {
                let t = super::tensors::onnx_type(match like.elem {
                    crate::attention::ElemType::F16 => crate::attention::DType::F16,
                    crate::attention::ElemType::BF16 => crate::attention::DType::BF16,
                    _ => crate::attention::DType::F32,
                });
                check((api.SetTensorElementType)(info, t), "SetTensorElementType")?;
                let values: Vec<i64> = dims
                    .iter()
                    .map(|d| if let Dim::Known(x) = d { *x } else { -1 })
                    .collect();
                check(
                    (api.SetDimensions)(info, values.as_ptr(), values.len()),
                    "SetDimensions",
                )?;
                // ORT's memory planner treats equal symbol names as equal sizes, and "" counts
                // as a name: every unknown dim gets a unique one, or unrelated tensors would be
                // planned into one buffer (seen on fused T5/BART encoder-decoder graphs).
                let names: Vec<CString> = dims
                    .iter()
                    .map(|d| {
                        let name = match d {
                            Dim::Sym(s) => s.clone(),
                            Dim::Unknown => format!(
                                "flash_unk_{}",
                                UNKNOWN_DIMS.fetch_add(1, Ordering::Relaxed)
                            ),
                            Dim::Known(_) => String::new(),
                        };
                        CString::new(name).unwrap_or_default()
                    })
                    .collect();
                let mut ptrs: Vec<*const std::ffi::c_char> =
                    names.iter().map(|s| s.as_ptr()).collect();
                check(
                    (api.SetSymbolicDimensions)(info, ptrs.as_mut_ptr(), ptrs.len()),
                    "SetSymbolicDimensions",
                )?;
                check(
                    (api.ShapeInferContext_SetOutputTypeShape)(self.ctx, index, info),
                    "ShapeInferContext_SetOutputTypeShape",
                )
            })();
            (api.ReleaseTensorTypeAndShapeInfo)(info);
            result
        }
    }
}

pub fn infer(ctx: *mut OrtShapeInferContext) -> Result<()> {
    let c = Ctx { api: api()?, ctx };
    let Some((q, qs)) = c.input(0)? else {
        return Ok(());
    };
    let Some((k, _)) = c.input(1)? else {
        return Ok(());
    };
    let Some((v, vs)) = c.input(2)? else {
        return Ok(());
    };
    let rank = q.shape.len();
    let (hq_attr, hkv_attr) = (c.attr_int("q_num_heads")?, c.attr_int("kv_num_heads")?);

    // (batch, q heads, q len, Dv) as far as they can be known.
    let (b, hq, sq, dv) = match rank {
        4 if k.shape.len() == 4 && v.shape.len() == 4 => (
            dim_of(&q, &qs, 0),
            dim_of(&q, &qs, 1),
            dim_of(&q, &qs, 2),
            dim_of(&v, &vs, 3),
        ),
        3 if k.shape.len() == 3 && v.shape.len() == 3 => {
            let (Some(hq), Some(hkv)) = (hq_attr, hkv_attr) else {
                return Err(Error::InvalidArgument(
                    "3D inputs need attributes q_num_heads and kv_num_heads".into(),
                ));
            };
            (
                dim_of(&q, &qs, 0),
                Dim::Known(hq),
                dim_of(&q, &qs, 1),
                div(&dim_of(&v, &vs, 2), hkv),
            )
        }
        _ => return Ok(()), // run time reports the rank mismatch with the actual shapes
    };
    let y = if rank == 4 {
        vec![b, hq, sq, dv]
    } else {
        let hidden = match (&hq, &dv) {
            (Dim::Known(h), dv) => mul(dv, *h),
            _ => Dim::Unknown,
        };
        vec![b, sq, hidden]
    };
    c.set_output(0, &q, &y)?;

    // present_key/present_value get their element type from ORT's own inference; their shapes
    // are left to run time because the inference context does not say how many outputs the node
    // has, and hosts before 1.2x abort (not error) on an out-of-range output index.
    Ok(())
}
