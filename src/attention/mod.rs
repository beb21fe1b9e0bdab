//! The operator's semantics and CPU implementation, independent of ORT: the validated problem
//! ([`params`]), typed views of tensor memory, the FlashAttention-2 CPU kernel ([`cpu`]), the
//! KV-cache concatenation ([`kv_cache`]) and a naive fp64 reference for tests ([`reference`]).

pub mod cpu;
pub mod kv_cache;
pub mod parallel;
pub mod params;
pub mod reference;

use half::{bf16, f16};

pub use parallel::{ParallelFor, Serial, ThreadScope};
pub use params::{
    validate, validate_nonpad_values, AttentionAttrs, AttentionProblem, DType, ElemType,
    InputDescs, Layout, MaskDesc, MaskKind, Strides4, TensorDesc,
};

/// Read-only elements of Q, K, V or past K/V in the problem's dtype.
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

/// Writable elements of Y or present K/V.
#[derive(Debug)]
pub enum ElemsMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

/// Mask elements: bool masks are bytes (non-zero = attend) so that no invalid `bool` is formed.
#[derive(Clone, Copy, Debug)]
pub enum MaskData<'a> {
    Bool(&'a [u8]),
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Elems<'_> {
    pub fn len(&self) -> usize {
        match self {
            Elems::F32(s) => s.len(),
            Elems::F16(s) => s.len(),
            Elems::BF16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            Elems::F32(_) => DType::F32,
            Elems::F16(_) => DType::F16,
            Elems::BF16(_) => DType::BF16,
        }
    }
    /// Element `i` widened to f32.
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            Elems::F32(s) => s[i],
            Elems::F16(s) => s[i].to_f32(),
            Elems::BF16(s) => s[i].to_f32(),
        }
    }
}

impl ElemsMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            ElemsMut::F32(s) => s.len(),
            ElemsMut::F16(s) => s.len(),
            ElemsMut::BF16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            ElemsMut::F32(_) => DType::F32,
            ElemsMut::F16(_) => DType::F16,
            ElemsMut::BF16(_) => DType::BF16,
        }
    }
}

impl MaskData<'_> {
    pub fn len(&self) -> usize {
        match self {
            MaskData::Bool(s) => s.len(),
            MaskData::F32(s) => s.len(),
            MaskData::F16(s) => s.len(),
            MaskData::BF16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The kind this buffer holds, to compare with the validated [`MaskDesc`].
    pub fn kind(&self) -> MaskKind {
        match self {
            MaskData::Bool(_) => MaskKind::Bool,
            MaskData::F32(_) => MaskKind::Additive(DType::F32),
            MaskData::F16(_) => MaskKind::Additive(DType::F16),
            MaskData::BF16(_) => MaskKind::Additive(DType::BF16),
        }
    }
}

/// Everything a CPU attention call reads. K and V hold all `kv_len` positions (past already
/// concatenated, see [`kv_cache`]) and are indexed through their own strides.
#[derive(Clone, Copy, Debug)]
pub struct CpuInputs<'a> {
    pub q: Elems<'a>,
    pub k: Elems<'a>,
    pub k_strides: Strides4,
    pub v: Elems<'a>,
    pub v_strides: Strides4,
    pub mask: Option<MaskData<'a>>,
    pub nonpad_kv_seqlen: Option<&'a [i64]>,
}

/// Largest element offset + 1 that a tensor of `dims` (b, h, s, d) reaches through `strides`.
pub fn extent(dims: [usize; 4], strides: Strides4) -> usize {
    if dims.contains(&0) {
        return 0;
    }
    1 + dims
        .iter()
        .zip(strides.iter())
        .map(|(d, s)| (d - 1) * s)
        .sum::<usize>()
}

/// Checks buffer sizes and types against the problem so kernels can index without bounds
/// surprises. Called by every entry point before any unsafe indexing.
pub fn check_buffers(
    p: &AttentionProblem,
    inp: &CpuInputs,
    out_len: usize,
    out_dtype: DType,
) -> crate::Result<()> {
    use crate::invalid;
    let want = [
        (
            "Q",
            inp.q,
            [p.batch, p.q_heads, p.q_len, p.head_dim],
            p.q_strides,
        ),
        (
            "K",
            inp.k,
            [p.batch, p.kv_heads, p.kv_len, p.head_dim],
            inp.k_strides,
        ),
        (
            "V",
            inp.v,
            [p.batch, p.kv_heads, p.kv_len, p.v_head_dim],
            inp.v_strides,
        ),
    ];
    for (name, elems, dims, strides) in want {
        if elems.dtype() != p.dtype {
            invalid!(
                "input {name}: element type {} does not match Q's {}",
                elems.dtype().name(),
                p.dtype.name()
            );
        }
        if elems.len() < extent(dims, strides) {
            invalid!(
                "input {name}: buffer holds {} elements, the shape needs {}",
                elems.len(),
                extent(dims, strides)
            );
        }
    }
    let out_need = extent([p.batch, p.q_heads, p.q_len, p.v_head_dim], p.out_strides);
    if out_dtype != p.dtype || out_len < out_need {
        invalid!(
            "output Y: expected {} elements of {}, got {} of {}",
            out_need,
            p.dtype.name(),
            out_len,
            out_dtype.name()
        );
    }
    match (&p.mask, &inp.mask) {
        (None, None) => {}
        (Some(desc), Some(data)) => {
            if desc.kind != data.kind() || data.len() < desc.len {
                invalid!("input attn_mask: buffer of {} elements does not match its validated shape ({} elements)", data.len(), desc.len);
            }
        }
        _ => invalid!("input attn_mask: presence does not match the validated problem"),
    }
    match (p.has_nonpad_kv_seqlen, inp.nonpad_kv_seqlen) {
        (false, None) => {}
        (true, Some(n)) => {
            if n.len() != p.batch {
                invalid!(
                    "input nonpad_kv_seqlen: expected {} values, got {}",
                    p.batch,
                    n.len()
                );
            }
            params::validate_nonpad_values(n, p.kv_len)?;
        }
        _ => invalid!("input nonpad_kv_seqlen: presence does not match the validated problem"),
    }
    Ok(())
}
