//! `present = concat(past, new)` along the sequence axis, into `[B, Hkv, P + S, D]`.

use super::{AttentionProblem, Elems, ElemsMut, Strides4};
use crate::{invalid, Result};

/// Copies `past` (`[B, Hkv, P, dim]`, dense) and the new keys or values (`new`, indexed by
/// `new_strides`) into `present` (`[B, Hkv, P + S, dim]`, dense).
pub fn concat_into(
    p: &AttentionProblem,
    dim: usize,
    past: Option<Elems>,
    new: Elems,
    new_strides: Strides4,
    present: ElemsMut,
) -> Result<()> {
    let (b_n, h_n, past_len, s_n) = (p.batch, p.kv_heads, p.past_len, p.new_kv_len);
    let present_len = b_n * h_n * p.kv_len * dim;
    if present.len() < present_len {
        invalid!(
            "present buffer holds {} elements, expected {present_len}",
            present.len()
        );
    }
    if new.len() < super::extent([b_n, h_n, s_n, dim], new_strides) {
        invalid!(
            "new K/V buffer holds {} elements, too few for its shape",
            new.len()
        );
    }
    if let Some(past) = past {
        if past.dtype() != new.dtype() {
            invalid!(
                "past and new K/V differ in element type: {} vs {}",
                past.dtype().name(),
                new.dtype().name()
            );
        }
        if past.len() < b_n * h_n * past_len * dim {
            invalid!(
                "past buffer holds {} elements, expected {}",
                past.len(),
                b_n * h_n * past_len * dim
            );
        }
    }
    macro_rules! copy {
        ($dst:expr, $new:expr, $past:expr) => {{
            let dst = $dst;
            for b in 0..b_n {
                for h in 0..h_n {
                    let row0 = (b * h_n + h) * p.kv_len * dim;
                    if let Some(past) = $past {
                        let src0 = (b * h_n + h) * past_len * dim;
                        dst[row0..row0 + past_len * dim]
                            .copy_from_slice(&past[src0..src0 + past_len * dim]);
                    }
                    for s in 0..s_n {
                        let d0 = row0 + (past_len + s) * dim;
                        let base = b * new_strides[0] + h * new_strides[1] + s * new_strides[2];
                        for d in 0..dim {
                            dst[d0 + d] = $new[base + d * new_strides[3]];
                        }
                    }
                }
            }
        }};
    }
    match (present, new, past) {
        (ElemsMut::F32(dst), Elems::F32(n), past) => copy!(
            dst,
            n,
            past.map(|x| if let Elems::F32(x) = x { x } else { &[][..] })
        ),
        (ElemsMut::F16(dst), Elems::F16(n), past) => copy!(
            dst,
            n,
            past.map(|x| if let Elems::F16(x) = x { x } else { &[][..] })
        ),
        (ElemsMut::BF16(dst), Elems::BF16(n), past) => copy!(
            dst,
            n,
            past.map(|x| if let Elems::BF16(x) = x { x } else { &[][..] })
        ),
        _ => invalid!("present, past and new K/V must share one element type"),
    }
    Ok(())
}
