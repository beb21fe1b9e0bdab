//! The operator's semantics in one place: attributes parsed at kernel creation, input
//! descriptions checked once per call, and the validated [`AttentionProblem`] that both the CPU
//! and the CUDA kernels consume. Nothing here knows about ORT types.

use crate::{invalid, Error, Result};

/// Element types the operator computes in (Q, K, V, Y, past/present).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }
    pub fn size_of(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Element type of any input as seen at the boundary (a superset of [`DType`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemType {
    F32,
    F16,
    BF16,
    Bool,
    I64,
    /// Anything else; the string is the type's name for error messages.
    Other(&'static str),
}

impl ElemType {
    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "float",
            ElemType::F16 => "float16",
            ElemType::BF16 => "bfloat16",
            ElemType::Bool => "bool",
            ElemType::I64 => "int64",
            ElemType::Other(n) => n,
        }
    }
    fn as_dtype(self) -> Option<DType> {
        match self {
            ElemType::F32 => Some(DType::F32),
            ElemType::F16 => Some(DType::F16),
            ElemType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

/// Node attributes, read once when ORT creates the kernel. Defaults follow DESIGN.md.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionAttrs {
    pub is_causal: bool,
    /// `None` means 1/√D.
    pub scale: Option<f32>,
    pub q_num_heads: Option<usize>,
    pub kv_num_heads: Option<usize>,
    /// 0 disables softcapping.
    pub softcap: f32,
    /// −1 (unbounded) or a number of keys to the left of the aligned query position.
    pub window_left: i64,
    pub window_right: i64,
}

impl Default for AttentionAttrs {
    fn default() -> Self {
        AttentionAttrs {
            is_causal: false,
            scale: None,
            q_num_heads: None,
            kv_num_heads: None,
            softcap: 0.0,
            window_left: -1,
            window_right: -1,
        }
    }
}

impl AttentionAttrs {
    /// Builds attributes from raw integer/float values as ORT hands them over, rejecting the
    /// values no call could ever accept (so a bad model fails at session creation).
    #[allow(clippy::too_many_arguments)]
    pub fn from_raw(
        is_causal: Option<i64>,
        scale: Option<f32>,
        q_num_heads: Option<i64>,
        kv_num_heads: Option<i64>,
        softcap: Option<f32>,
        window_left: Option<i64>,
        window_right: Option<i64>,
    ) -> Result<Self> {
        let is_causal = match is_causal.unwrap_or(0) {
            0 => false,
            1 => true,
            v => invalid!("attribute is_causal: expected 0 or 1, got {v}"),
        };
        if let Some(s) = scale {
            if !s.is_finite() || s == 0.0 {
                invalid!("attribute scale: expected a finite non-zero number, got {s}");
            }
        }
        let heads = |name: &str, v: Option<i64>| -> Result<Option<usize>> {
            match v {
                None => Ok(None),
                Some(h) if h > 0 => Ok(Some(h as usize)),
                Some(h) => invalid!("attribute {name}: expected a positive head count, got {h}"),
            }
        };
        let softcap = softcap.unwrap_or(0.0);
        if !softcap.is_finite() || softcap < 0.0 {
            invalid!("attribute softcap: expected a finite value >= 0 (0 = off), got {softcap}");
        }
        let window = |name: &str, v: Option<i64>| -> Result<i64> {
            match v.unwrap_or(-1) {
                w if w >= -1 => Ok(w),
                w => {
                    invalid!("attribute {name}: expected -1 (unbounded) or a window >= 0, got {w}")
                }
            }
        };
        Ok(AttentionAttrs {
            is_causal,
            scale,
            q_num_heads: heads("q_num_heads", q_num_heads)?,
            kv_num_heads: heads("kv_num_heads", kv_num_heads)?,
            softcap,
            window_left: window("window_left", window_left)?,
            window_right: window("window_right", window_right)?,
        })
    }
}

/// Type and shape of one input, as reported by the host.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDesc {
    pub elem: ElemType,
    pub shape: Vec<i64>,
}

impl TensorDesc {
    pub fn new(elem: ElemType, shape: &[i64]) -> Self {
        TensorDesc {
            elem,
            shape: shape.to_vec(),
        }
    }
}

/// Descriptions of the seven inputs (absent optional inputs are `None`).
#[derive(Clone, Debug, Default)]
pub struct InputDescs {
    pub q: Option<TensorDesc>,
    pub k: Option<TensorDesc>,
    pub v: Option<TensorDesc>,
    pub attn_mask: Option<TensorDesc>,
    pub past_key: Option<TensorDesc>,
    pub past_value: Option<TensorDesc>,
    pub nonpad_kv_seqlen: Option<TensorDesc>,
}

/// Whether Q/K/V/Y are `[B, S, H·D]` (3D) or `[B, H, S, D]` (4D).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Bsh,
    Bhsd,
}

/// Element strides of a tensor indexed as (batch, head, seq, dim).
pub type Strides4 = [usize; 4];

/// What the attention mask holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// true (non-zero byte) = attend.
    Bool,
    /// Added to the (scaled, softcapped) scores; element type given.
    Additive(DType),
}

/// A mask broadcast to `[B, Hq, Sq, Ptot]`: a zero stride marks a broadcast axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskDesc {
    pub kind: MaskKind,
    pub strides: Strides4,
    /// Number of elements in the mask buffer (for bounds checks).
    pub len: usize,
}

/// A fully validated call: every dimension consistent, every index a kernel forms in bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionProblem {
    pub dtype: DType,
    pub layout: Layout,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    /// Keys/values passed in this call (K/V's sequence length).
    pub new_kv_len: usize,
    /// Keys/values from `past_key`/`past_value`.
    pub past_len: usize,
    /// `past_len + new_kv_len`: the keys each query attends over.
    pub kv_len: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub scale: f32,
    pub softcap: f32,
    pub is_causal: bool,
    /// Visible keys j for aligned query i' satisfy i' − left ≤ j ≤ i' + right (None = unbounded).
    pub window_left: Option<usize>,
    pub window_right: Option<usize>,
    pub mask: Option<MaskDesc>,
    pub has_past: bool,
    pub has_nonpad_kv_seqlen: bool,
    /// Strides of Q, new K, new V and Y in their own layout, as (b, h, s, d).
    pub q_strides: Strides4,
    pub k_strides: Strides4,
    pub v_strides: Strides4,
    pub out_strides: Strides4,
}

impl AttentionProblem {
    /// Offset added to a query index to align it with the key axis (bottom-right alignment).
    pub fn query_offset(&self) -> i64 {
        self.kv_len as i64 - self.q_len as i64
    }

    /// Query heads sharing one KV head (GQA group size; 1 for plain multi-head attention).
    pub fn group_size(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// The KV head query head `h` reads (repeat_interleave order).
    pub fn kv_head_of(&self, h: usize) -> usize {
        h / self.group_size()
    }

    /// Effective right window: causal clamps it to 0.
    pub fn effective_window_right(&self) -> Option<usize> {
        if self.is_causal {
            Some(0)
        } else {
            self.window_right
        }
    }

    /// The half-open range of key positions query `i` may see before masks and padding
    /// (`lo..hi`, clamped to `0..kv_len`; empty when nothing is visible).
    pub fn visible_keys(&self, i: usize) -> (usize, usize) {
        let aligned = i as i64 + self.query_offset();
        let lo = match self.window_left {
            Some(w) => aligned - w as i64,
            None => 0,
        };
        let hi = match self.effective_window_right() {
            Some(w) => aligned + w as i64 + 1,
            None => self.kv_len as i64,
        };
        let lo = lo.clamp(0, self.kv_len as i64) as usize;
        let hi = hi.clamp(0, self.kv_len as i64) as usize;
        (lo, hi.max(lo))
    }

    /// Shape of output Y.
    pub fn out_shape(&self) -> Vec<i64> {
        match self.layout {
            Layout::Bsh => vec![
                self.batch as i64,
                self.q_len as i64,
                (self.q_heads * self.v_head_dim) as i64,
            ],
            Layout::Bhsd => vec![
                self.batch as i64,
                self.q_heads as i64,
                self.q_len as i64,
                self.v_head_dim as i64,
            ],
        }
    }

    /// Shape of present_key (`present_value` uses `v_head_dim`).
    pub fn present_shape(&self, dim: usize) -> Vec<i64> {
        vec![
            self.batch as i64,
            self.kv_heads as i64,
            self.kv_len as i64,
            dim as i64,
        ]
    }

    /// Strides of a `[B, Hkv, kv_len, dim]` tensor (present_key/value, and K/V after concat).
    pub fn present_strides(&self, dim: usize) -> Strides4 {
        [self.kv_heads * self.kv_len * dim, self.kv_len * dim, dim, 1]
    }

    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.q_heads * self.q_len * self.kv_len) as f64
            * (self.head_dim + self.v_head_dim) as f64
    }
}

fn dim(shape: &[i64], i: usize, input: &str) -> Result<usize> {
    let d = shape[i];
    if d < 0 {
        invalid!(
            "input {input}: dimension {i} is {d}, expected a non-negative size (shape {shape:?})"
        );
    }
    Ok(d as usize)
}

fn dims_of(desc: &TensorDesc, input: &str) -> Result<Vec<usize>> {
    (0..desc.shape.len())
        .map(|i| dim(&desc.shape, i, input))
        .collect()
}

fn require_rank(desc: &TensorDesc, input: &str, expected: &[usize]) -> Result<()> {
    if !expected.contains(&desc.shape.len()) {
        let want = expected
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(" or ");
        invalid!(
            "input {input}: expected rank {want}, got rank {} (shape {:?})",
            desc.shape.len(),
            desc.shape
        );
    }
    Ok(())
}

fn require_type(desc: &TensorDesc, input: &str, want: DType) -> Result<()> {
    if desc.elem.as_dtype() != Some(want) {
        invalid!(
            "input {input}: expected element type {} (same as Q), got {}",
            want.name(),
            desc.elem.name()
        );
    }
    Ok(())
}

fn expect_dim(
    actual: usize,
    expected: usize,
    input: &str,
    what: &str,
    shape: &[i64],
) -> Result<()> {
    if actual != expected {
        invalid!("input {input}: expected {what} = {expected}, got {actual} (shape {shape:?})");
    }
    Ok(())
}

/// Checks one call's inputs against the attributes and returns the problem the kernels run.
pub fn validate(attrs: &AttentionAttrs, inputs: &InputDescs) -> Result<AttentionProblem> {
    let q = inputs
        .q
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("input Q is required".into()))?;
    let k = inputs
        .k
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("input K is required".into()))?;
    let v = inputs
        .v
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("input V is required".into()))?;
    let dtype = match q.elem.as_dtype() {
        Some(t) => t,
        None => {
            return Err(Error::NotImplemented(format!(
                "input Q: expected element type float, float16 or bfloat16, got {}",
                q.elem.name()
            )))
        }
    };
    require_type(k, "K", dtype)?;
    require_type(v, "V", dtype)?;
    require_rank(q, "Q", &[3, 4])?;
    let rank = q.shape.len();
    require_rank(k, "K", &[rank])?;
    require_rank(v, "V", &[rank])?;
    let (qd, kd, vd) = (dims_of(q, "Q")?, dims_of(k, "K")?, dims_of(v, "V")?);

    let batch = qd[0];
    expect_dim(kd[0], batch, "K", "batch size (Q's dim 0)", &k.shape)?;
    expect_dim(vd[0], batch, "V", "batch size (Q's dim 0)", &v.shape)?;

    let (layout, q_heads, kv_heads, q_len, new_kv_len, head_dim, v_head_dim);
    if rank == 4 {
        layout = Layout::Bhsd;
        q_heads = qd[1];
        kv_heads = kd[1];
        q_len = qd[2];
        new_kv_len = kd[2];
        head_dim = qd[3];
        v_head_dim = vd[3];
        expect_dim(kd[3], head_dim, "K", "head size (Q's dim 3)", &k.shape)?;
        expect_dim(vd[1], kv_heads, "V", "KV heads (K's dim 1)", &v.shape)?;
        expect_dim(
            vd[2],
            new_kv_len,
            "V",
            "KV sequence length (K's dim 2)",
            &v.shape,
        )?;
        if let Some(h) = attrs.q_num_heads {
            expect_dim(q_heads, h, "Q", "heads (attribute q_num_heads)", &q.shape)?;
        }
        if let Some(h) = attrs.kv_num_heads {
            expect_dim(kv_heads, h, "K", "heads (attribute kv_num_heads)", &k.shape)?;
        }
    } else {
        layout = Layout::Bsh;
        let (Some(hq), Some(hkv)) = (attrs.q_num_heads, attrs.kv_num_heads) else {
            invalid!(
                "3D inputs need attributes q_num_heads and kv_num_heads (got {:?} and {:?})",
                attrs.q_num_heads,
                attrs.kv_num_heads
            );
        };
        q_heads = hq;
        kv_heads = hkv;
        q_len = qd[1];
        new_kv_len = kd[1];
        expect_dim(
            vd[1],
            new_kv_len,
            "V",
            "KV sequence length (K's dim 1)",
            &v.shape,
        )?;
        if qd[2] % hq != 0 {
            invalid!(
                "input Q: hidden size {} is not divisible by q_num_heads = {hq} (shape {:?})",
                qd[2],
                q.shape
            );
        }
        head_dim = qd[2] / hq;
        expect_dim(
            kd[2],
            hkv * head_dim,
            "K",
            "hidden size (kv_num_heads x head size)",
            &k.shape,
        )?;
        if vd[2] % hkv != 0 {
            invalid!(
                "input V: hidden size {} is not divisible by kv_num_heads = {hkv} (shape {:?})",
                vd[2],
                v.shape
            );
        }
        v_head_dim = vd[2] / hkv;
    }
    if q_heads == 0 || kv_heads == 0 {
        invalid!("input Q/K: head counts must be positive, got q_heads = {q_heads}, kv_heads = {kv_heads}");
    }
    if q_heads % kv_heads != 0 {
        invalid!("input K: query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})");
    }
    if head_dim == 0 || v_head_dim == 0 {
        invalid!("input Q/V: head sizes must be positive, got D = {head_dim}, Dv = {v_head_dim}");
    }

    // Past keys/values: [B, Hkv, P, D] and [B, Hkv, P, Dv], both or neither.
    let past_len = match (&inputs.past_key, &inputs.past_value) {
        (None, None) => 0,
        (Some(_), None) | (None, Some(_)) => {
            invalid!("inputs past_key and past_value must be given together")
        }
        (Some(pk), Some(pv)) => {
            require_type(pk, "past_key", dtype)?;
            require_type(pv, "past_value", dtype)?;
            require_rank(pk, "past_key", &[4])?;
            require_rank(pv, "past_value", &[4])?;
            let (pkd, pvd) = (dims_of(pk, "past_key")?, dims_of(pv, "past_value")?);
            let want_k = [batch, kv_heads, pkd[2], head_dim];
            if pkd != want_k {
                invalid!(
                    "input past_key: expected shape {want_k:?} ([B, kv_heads, P, D]), got {:?}",
                    pk.shape
                );
            }
            let want_v = [batch, kv_heads, pkd[2], v_head_dim];
            if pvd != want_v {
                invalid!(
                    "input past_value: expected shape {want_v:?} ([B, kv_heads, P, Dv]), got {:?}",
                    pv.shape
                );
            }
            pkd[2]
        }
    };
    let kv_len = past_len + new_kv_len;

    let mask = match &inputs.attn_mask {
        None => None,
        Some(m) => Some(validate_mask(m, dtype, [batch, q_heads, q_len, kv_len])?),
    };

    if let Some(n) = &inputs.nonpad_kv_seqlen {
        if n.elem != ElemType::I64 {
            invalid!(
                "input nonpad_kv_seqlen: expected element type int64, got {}",
                n.elem.name()
            );
        }
        if n.shape != [batch as i64] {
            invalid!(
                "input nonpad_kv_seqlen: expected shape [{batch}] ([B]), got {:?}",
                n.shape
            );
        }
    }

    let scale = attrs.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    let window = |w: i64| (w >= 0).then_some(w as usize);

    let strides = |heads: usize, len: usize, d: usize| -> Strides4 {
        match layout {
            Layout::Bsh => [len * heads * d, d, heads * d, 1],
            Layout::Bhsd => [heads * len * d, len * d, d, 1],
        }
    };
    Ok(AttentionProblem {
        dtype,
        layout,
        batch,
        q_heads,
        kv_heads,
        q_len,
        new_kv_len,
        past_len,
        kv_len,
        head_dim,
        v_head_dim,
        scale,
        softcap: attrs.softcap,
        is_causal: attrs.is_causal,
        window_left: window(attrs.window_left),
        window_right: window(attrs.window_right),
        mask,
        has_past: inputs.past_key.is_some(),
        has_nonpad_kv_seqlen: inputs.nonpad_kv_seqlen.is_some(),
        q_strides: strides(q_heads, q_len, head_dim),
        k_strides: strides(kv_heads, new_kv_len, head_dim),
        v_strides: strides(kv_heads, new_kv_len, v_head_dim),
        out_strides: strides(q_heads, q_len, v_head_dim),
    })
}

/// A mask of rank 1–4 broadcasts (numpy rules, right-aligned) to `[B, Hq, Sq, Ptot]`.
fn validate_mask(m: &TensorDesc, dtype: DType, full: [usize; 4]) -> Result<MaskDesc> {
    let kind = match m.elem {
        ElemType::Bool => MaskKind::Bool,
        ElemType::F32 => MaskKind::Additive(DType::F32),
        e if e.as_dtype() == Some(dtype) => MaskKind::Additive(dtype),
        e => invalid!(
            "input attn_mask: expected element type bool, float or {} (Q's type), got {}",
            dtype.name(),
            e.name()
        ),
    };
    if m.shape.is_empty() || m.shape.len() > 4 {
        invalid!("input attn_mask: expected rank 1 to 4 (broadcastable to [B, q_heads, Sq, total_kv] = {full:?}), got shape {:?}", m.shape);
    }
    let md = dims_of(m, "attn_mask")?;
    let mut padded = [1usize; 4];
    padded[4 - md.len()..].copy_from_slice(&md);
    for axis in 0..4 {
        if padded[axis] != 1 && padded[axis] != full[axis] {
            invalid!(
                "input attn_mask: shape {:?} does not broadcast to [B, q_heads, Sq, total_kv] = {full:?} (axis {axis}: {} vs {})",
                m.shape,
                padded[axis],
                full[axis]
            );
        }
    }
    let mut strides = [0usize; 4];
    let mut acc = 1usize;
    for axis in (0..4).rev() {
        strides[axis] = if padded[axis] == 1 { 0 } else { acc };
        acc *= padded[axis];
    }
    Ok(MaskDesc {
        kind,
        strides,
        len: acc,
    })
}

/// Checks `nonpad_kv_seqlen` values once they are readable (host memory): 0 ≤ n ≤ total keys.
pub fn validate_nonpad_values(values: &[i64], kv_len: usize) -> Result<()> {
    for (b, &n) in values.iter().enumerate() {
        if n < 0 || n as u64 > kv_len as u64 {
            invalid!("input nonpad_kv_seqlen: value {n} at batch {b} is out of range, expected 0..={kv_len} (total KV length)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(elem: ElemType, shape: &[i64]) -> Option<TensorDesc> {
        Some(TensorDesc::new(elem, shape))
    }

    fn qkv4(b: i64, hq: i64, hkv: i64, sq: i64, skv: i64, dd: i64) -> InputDescs {
        InputDescs {
            q: d(ElemType::F32, &[b, hq, sq, dd]),
            k: d(ElemType::F32, &[b, hkv, skv, dd]),
            v: d(ElemType::F32, &[b, hkv, skv, dd]),
            ..Default::default()
        }
    }

    #[test]
    fn four_d_gqa_problem() {
        let p = validate(&AttentionAttrs::default(), &qkv4(2, 8, 2, 5, 7, 64)).unwrap();
        assert_eq!(
            (p.q_heads, p.kv_heads, p.group_size(), p.kv_head_of(7)),
            (8, 2, 4, 1)
        );
        assert_eq!(p.out_shape(), vec![2, 8, 5, 64]);
        assert!((p.scale - 0.125).abs() < 1e-7);
        assert_eq!(p.q_strides, [8 * 5 * 64, 5 * 64, 64, 1]);
    }

    #[test]
    fn three_d_needs_head_attributes_and_gets_strides() {
        let inputs = InputDescs {
            q: d(ElemType::F16, &[1, 3, 4 * 16]),
            k: d(ElemType::F16, &[1, 6, 2 * 16]),
            v: d(ElemType::F16, &[1, 6, 2 * 8]),
            ..Default::default()
        };
        let err = validate(&AttentionAttrs::default(), &inputs).unwrap_err();
        assert!(err.to_string().contains("q_num_heads"), "{err}");
        let attrs = AttentionAttrs {
            q_num_heads: Some(4),
            kv_num_heads: Some(2),
            ..Default::default()
        };
        let p = validate(&attrs, &inputs).unwrap();
        assert_eq!((p.head_dim, p.v_head_dim, p.layout), (16, 8, Layout::Bsh));
        assert_eq!(p.k_strides, [6 * 32, 16, 32, 1]);
        assert_eq!(p.out_shape(), vec![1, 3, 32]);
    }

    #[test]
    fn causal_is_bottom_right_aligned_and_windows_clamp() {
        let attrs = AttentionAttrs {
            is_causal: true,
            ..Default::default()
        };
        let p = validate(&attrs, &qkv4(1, 1, 1, 2, 5, 8)).unwrap();
        assert_eq!(p.visible_keys(0), (0, 4));
        assert_eq!(p.visible_keys(1), (0, 5));
        let attrs = AttentionAttrs {
            window_left: 1,
            window_right: 0,
            ..Default::default()
        };
        let p = validate(&attrs, &qkv4(1, 1, 1, 3, 3, 8)).unwrap();
        assert_eq!(p.visible_keys(0), (0, 1));
        assert_eq!(p.visible_keys(2), (1, 3));
        // Sq > Skv with causal: the first queries see nothing.
        let attrs = AttentionAttrs {
            is_causal: true,
            ..Default::default()
        };
        let p = validate(&attrs, &qkv4(1, 1, 1, 4, 2, 8)).unwrap();
        assert_eq!(p.visible_keys(0), (0, 0));
        assert_eq!(p.visible_keys(3), (0, 2));
    }

    #[test]
    fn mask_broadcast_strides() {
        let mut inputs = qkv4(2, 4, 4, 3, 5, 8);
        inputs.attn_mask = d(ElemType::Bool, &[2, 1, 1, 5]);
        let p = validate(&AttentionAttrs::default(), &inputs).unwrap();
        let m = p.mask.unwrap();
        assert_eq!(
            (m.kind, m.strides, m.len),
            (MaskKind::Bool, [5, 0, 0, 1], 10)
        );
        inputs.attn_mask = d(ElemType::F32, &[3, 5]);
        let m = validate(&AttentionAttrs::default(), &inputs)
            .unwrap()
            .mask
            .unwrap();
        assert_eq!(m.strides, [0, 0, 5, 1]);
        inputs.attn_mask = d(ElemType::F32, &[4, 5]);
        let err = validate(&AttentionAttrs::default(), &inputs)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("attn_mask") && err.contains("does not broadcast"),
            "{err}"
        );
    }

    #[test]
    fn bad_inputs_name_the_input() {
        let cases: Vec<(InputDescs, &str)> = vec![
            (
                InputDescs {
                    q: d(ElemType::F32, &[1, 2, 3]),
                    ..qkv4(1, 1, 1, 1, 1, 8)
                },
                "K",
            ),
            (
                InputDescs {
                    k: d(ElemType::F16, &[1, 1, 1, 8]),
                    ..qkv4(1, 1, 1, 1, 1, 8)
                },
                "input K: expected element type float",
            ),
            (qkv4(1, 3, 2, 1, 1, 8), "multiple of KV heads"),
            (
                InputDescs {
                    k: d(ElemType::F32, &[1, 1, 1, 4]),
                    ..qkv4(1, 1, 1, 1, 1, 8)
                },
                "input K: expected head size",
            ),
            (
                InputDescs {
                    past_key: d(ElemType::F32, &[1, 1, 2, 8]),
                    ..qkv4(1, 1, 1, 1, 1, 8)
                },
                "together",
            ),
            (
                InputDescs {
                    nonpad_kv_seqlen: d(ElemType::I64, &[2]),
                    ..qkv4(1, 1, 1, 1, 1, 8)
                },
                "nonpad_kv_seqlen",
            ),
        ];
        for (inputs, needle) in cases {
            let err = validate(&AttentionAttrs::default(), &inputs)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
        }
        let err =
            AttentionAttrs::from_raw(None, None, None, None, None, Some(-2), None).unwrap_err();
        assert!(err.to_string().contains("window_left"));
        assert!(validate_nonpad_values(&[3, 6], 5)
            .unwrap_err()
            .to_string()
            .contains("value 6 at batch 1"));
    }
}
