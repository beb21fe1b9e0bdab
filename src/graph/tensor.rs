//! Reading small constant tensors (shape vectors, scalars, mask buffers) out of `TensorProto`s,
//! with a size cap so a crafted file cannot make us allocate much.

use std::borrow::Cow;

use super::onnx::{tensor_proto::DataType, TensorProto};

/// Largest constant we ever materialize, in elements (mask buffers of 2048×2048 fit).
pub const MAX_ELEMENTS: usize = 1 << 22;

/// Element count from the tensor's dims, `None` when negative or overflowing.
pub fn element_count(t: &TensorProto) -> Option<usize> {
    t.dims.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

fn raw(t: &TensorProto) -> Option<&[u8]> {
    if super::io::is_external(t) {
        return None;
    }
    t.raw_data.as_deref()
}

/// Integer contents (int64, int32, int16, int8, uint8, bool) of a non-external tensor.
pub fn ints(t: &TensorProto) -> Option<Vec<i64>> {
    let n = element_count(t)?;
    if n > MAX_ELEMENTS {
        return None;
    }
    let dt = DataType::try_from(t.data_type?).ok()?;
    let out: Vec<i64> = if let Some(r) = raw(t) {
        let w = match dt {
            DataType::Int64 | DataType::Uint64 => 8,
            DataType::Int32 | DataType::Uint32 => 4,
            DataType::Int16 | DataType::Uint16 => 2,
            DataType::Int8 | DataType::Uint8 | DataType::Bool => 1,
            _ => return None,
        };
        if r.len() != n.checked_mul(w)? {
            return None;
        }
        r.chunks_exact(w)
            .map(|c| match dt {
                DataType::Int64 | DataType::Uint64 => {
                    i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))
                }
                DataType::Int32 => i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64,
                DataType::Uint32 => u32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64,
                DataType::Int16 => i16::from_le_bytes(c.try_into().unwrap_or([0; 2])) as i64,
                DataType::Uint16 => u16::from_le_bytes(c.try_into().unwrap_or([0; 2])) as i64,
                DataType::Int8 => c[0] as i8 as i64,
                _ => c[0] as i64,
            })
            .collect()
    } else {
        match dt {
            DataType::Int64 => t.int64_data.clone(),
            DataType::Uint64 => t.uint64_data.iter().map(|&v| v as i64).collect(),
            DataType::Int32
            | DataType::Int16
            | DataType::Int8
            | DataType::Uint16
            | DataType::Uint8
            | DataType::Bool => t.int32_data.iter().map(|&v| v as i64).collect(),
            _ => return None,
        }
    };
    (out.len() == n).then_some(out)
}

/// Float contents (float, double, float16, bfloat16) of a non-external tensor.
pub fn floats(t: &TensorProto) -> Option<Vec<f64>> {
    let n = element_count(t)?;
    if n > MAX_ELEMENTS {
        return None;
    }
    let dt = DataType::try_from(t.data_type?).ok()?;
    let out: Vec<f64> = if let Some(r) = raw(t) {
        let w = match dt {
            DataType::Double => 8,
            DataType::Float => 4,
            DataType::Float16 | DataType::Bfloat16 => 2,
            _ => return None,
        };
        if r.len() != n.checked_mul(w)? {
            return None;
        }
        r.chunks_exact(w)
            .map(|c| match dt {
                DataType::Double => f64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
                DataType::Float => f32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64,
                DataType::Float16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
                _ => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
            })
            .collect()
    } else {
        match dt {
            DataType::Float => t.float_data.iter().map(|&v| v as f64).collect(),
            DataType::Double => t.double_data.clone(),
            // float16/bfloat16 values sit in the low 16 bits of int32_data.
            DataType::Float16 => t
                .int32_data
                .iter()
                .map(|&v| half::f16::from_bits(v as u16).to_f64())
                .collect(),
            DataType::Bfloat16 => t
                .int32_data
                .iter()
                .map(|&v| half::bf16::from_bits(v as u16).to_f64())
                .collect(),
            _ => return None,
        }
    };
    (out.len() == n).then_some(out)
}

/// Numeric contents as f64 whatever the element type.
pub fn numbers(t: &TensorProto) -> Option<Vec<f64>> {
    floats(t).or_else(|| ints(t).map(|v| v.into_iter().map(|x| x as f64).collect()))
}

/// Whether the element type is a float type FlashAttention accepts (float, float16, bfloat16).
pub fn is_attention_float(elem: i32) -> bool {
    elem == DataType::Float as i32
        || elem == DataType::Float16 as i32
        || elem == DataType::Bfloat16 as i32
}

/// Whether the element type is any floating type.
pub fn is_float(elem: i32) -> bool {
    is_attention_float(elem) || elem == DataType::Double as i32
}

/// A rank-0 int64 tensor (used for new constants the rewrite adds).
pub fn int64_tensor(name: &str, dims: &[i64], vals: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        int64_data: vals.to_vec(),
        ..Default::default()
    }
}

/// Bytes per element of a fixed-width numeric type.
pub fn elem_width(elem: i32) -> Option<usize> {
    Some(match DataType::try_from(elem).ok()? {
        DataType::Double | DataType::Int64 | DataType::Uint64 => 8,
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16 => 2,
        DataType::Int8 | DataType::Uint8 | DataType::Bool => 1,
        _ => return None,
    })
}

/// The contents of a non-external numeric tensor as the little-endian bytes `raw_data` holds
/// (borrowed when it is stored that way). No size cap: the bytes are already in memory.
pub fn le_bytes(t: &TensorProto) -> Option<Cow<'_, [u8]>> {
    if super::io::is_external(t) || t.segment.is_some() {
        return None;
    }
    let elem = t.data_type?;
    let len = element_count(t)?.checked_mul(elem_width(elem)?)?;
    if let Some(r) = t.raw_data.as_deref() {
        return (r.len() == len).then_some(Cow::Borrowed(r));
    }
    let out: Vec<u8> = match DataType::try_from(elem).ok()? {
        DataType::Float => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Double => t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Int64 => t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Uint64 => t.uint64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Uint32 => t
            .uint64_data
            .iter()
            .flat_map(|&v| (v as u32).to_le_bytes())
            .collect(),
        DataType::Int32 => t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        // float16/bfloat16 and the narrow ints sit in the low bits of int32_data.
        DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16 => t
            .int32_data
            .iter()
            .flat_map(|&v| (v as u16).to_le_bytes())
            .collect(),
        DataType::Int8 | DataType::Uint8 | DataType::Bool => {
            t.int32_data.iter().map(|&v| v as u8).collect()
        }
        _ => return None,
    };
    (out.len() == len).then_some(Cow::Owned(out))
}
