//! Naive attention in fp64: the oracle the kernels are tested against, and the same computation
//! rounded to the problem's dtype. It follows DESIGN.md's order of operations literally
//! (scale → softcap → mask → softmax → P·V) one row at a time.

use super::{AttentionProblem, CpuInputs, MaskData, MaskKind};

/// Whether key `j` is visible to query `i` of batch `b`, head `h`, and the additive mask value.
/// Returns `None` when the key is masked out.
pub fn mask_term(
    p: &AttentionProblem,
    inp: &CpuInputs,
    b: usize,
    h: usize,
    i: usize,
    j: usize,
) -> Option<f64> {
    let (lo, hi) = p.visible_keys(i);
    if j < lo || j >= hi {
        return None;
    }
    if let Some(n) = inp.nonpad_kv_seqlen {
        if j as i64 >= n[b] {
            return None;
        }
    }
    match (&p.mask, &inp.mask) {
        (Some(desc), Some(data)) => {
            let s = desc.strides;
            let idx = b * s[0] + h * s[1] + i * s[2] + j * s[3];
            let add = match (desc.kind, data) {
                (MaskKind::Bool, MaskData::Bool(m)) => return (m[idx] != 0).then_some(0.0),
                (_, MaskData::F32(m)) => m[idx] as f64,
                (_, MaskData::F16(m)) => m[idx].to_f64(),
                (_, MaskData::BF16(m)) => m[idx].to_f64(),
                (_, MaskData::Bool(_)) => unreachable!("validated: bool data has a bool desc"),
            };
            // A key whose additive mask is −inf is invisible; it contributes exactly nothing.
            (add != f64::NEG_INFINITY).then_some(add)
        }
        _ => Some(0.0),
    }
}

/// Element offset of (batch, head, position, dim) through `strides`.
fn at(strides: super::Strides4, b: usize, h: usize, s: usize, d: usize) -> usize {
    b * strides[0] + h * strides[1] + s * strides[2] + d * strides[3]
}

/// Y in the problem's output layout (dense, `out_strides`), computed in fp64.
/// Rows with no visible key are zero.
pub fn attention_f64(p: &AttentionProblem, inp: &CpuInputs) -> Vec<f64> {
    naive::<f64>(p, inp, |x| x, Normalize::Output)
}

/// Naive attention carried out in the problem's own element type, the way an eager framework
/// runs it in fp16/bf16: each intermediate (scores, scaled, softcapped, masked, probabilities,
/// output) is rounded to that type, products are accumulated in f32. The fp16/bf16 acceptance
/// criterion compares the kernel's error against this computation's error (both against
/// [`attention_f64`]). For f32 problems it is a plain f32 computation.
pub fn attention_in_dtype(p: &AttentionProblem, inp: &CpuInputs) -> Vec<f64> {
    use super::DType;
    use half::{bf16, f16};
    let round: fn(f32) -> f32 = match p.dtype {
        DType::F32 => |x| x,
        DType::F16 => |x| f16::from_f32(x).to_f32(),
        DType::BF16 => |x| bf16::from_f32(x).to_f32(),
    };
    naive::<f32>(p, inp, round, Normalize::Probabilities)
}

/// The float type a naive attention accumulates in: f64 for the oracle, f32 for the in-dtype run.
trait Real:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
{
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn from_f32(x: f32) -> Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    fn max(self, other: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// Where a naive attention divides by the softmax denominator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Normalize {
    /// Once per output element, after P·V with the unnormalized weights.
    Output,
    /// Each probability before P·V, then rounded: P materialized, as an eager framework does.
    Probabilities,
}

/// The naive computation both variants share, in `T` with every intermediate passed through
/// `round` (the identity where nothing is rounded). Rows with no visible key are zero.
fn naive<T: Real>(
    p: &AttentionProblem,
    inp: &CpuInputs,
    round: impl Fn(T) -> T,
    normalize: Normalize,
) -> Vec<f64> {
    let out_len = super::extent([p.batch, p.q_heads, p.q_len, p.v_head_dim], p.out_strides);
    let mut out = vec![0.0f64; out_len];
    let mut scores = vec![T::ZERO; p.kv_len];
    let mut visible = vec![false; p.kv_len];
    let scale = T::from_f32(p.scale);
    let softcap = T::from_f32(p.softcap);
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kvh = p.kv_head_of(h);
            for i in 0..p.q_len {
                let mut max = T::NEG_INFINITY;
                for j in 0..p.kv_len {
                    visible[j] = false;
                    let Some(add) = mask_term(p, inp, b, h, i, j) else {
                        continue;
                    };
                    let mut dot = T::ZERO;
                    for d in 0..p.head_dim {
                        let qv = inp.q.get_f32(at(p.q_strides, b, h, i, d));
                        let kv = inp.k.get_f32(at(inp.k_strides, b, kvh, j, d));
                        dot += T::from_f32(qv) * T::from_f32(kv);
                    }
                    let mut s = round(round(dot) * scale);
                    if p.softcap > 0.0 {
                        s = round(softcap * (s / softcap).tanh());
                    }
                    s = round(s + T::from_f64(add));
                    scores[j] = s;
                    visible[j] = true;
                    max = max.max(s);
                }
                if max == T::NEG_INFINITY {
                    continue; // no visible key: the row stays zero
                }
                let mut sum = T::ZERO;
                for j in 0..p.kv_len {
                    if visible[j] {
                        scores[j] = (scores[j] - max).exp();
                        sum += scores[j];
                    }
                }
                if normalize == Normalize::Probabilities {
                    for j in 0..p.kv_len {
                        if visible[j] {
                            scores[j] = round(scores[j] / sum);
                        }
                    }
                }
                for dv in 0..p.v_head_dim {
                    let mut acc = T::ZERO;
                    for j in 0..p.kv_len {
                        if visible[j] {
                            let vv = inp.v.get_f32(at(inp.v_strides, b, kvh, j, dv));
                            acc += scores[j] * T::from_f32(vv);
                        }
                    }
                    let y = match normalize {
                        Normalize::Output => acc / sum,
                        Normalize::Probabilities => acc,
                    };
                    out[at(p.out_strides, b, h, i, dv)] = round(y).to_f64();
                }
            }
        }
    }
    out
}
