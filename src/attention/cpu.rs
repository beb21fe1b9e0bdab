//! CPU attention entry point. Interim version: correct but naive (fp64 reference per call);
//! the FlashAttention-2 tiled kernel replaces it.

use super::{check_buffers, reference, AttentionProblem, CpuInputs, ElemsMut, ParallelFor};
use crate::Result;
use half::{bf16, f16};

/// Computes Y for a validated problem. `out` is Y in the problem's output layout.
pub fn attention(
    p: &AttentionProblem,
    inp: &CpuInputs,
    out: ElemsMut,
    _par: &dyn ParallelFor,
) -> Result<()> {
    check_buffers(p, inp, out.len(), out.dtype())?;
    let y = reference::attention_f64(p, inp);
    match out {
        ElemsMut::F32(o) => o.iter_mut().zip(&y).for_each(|(o, y)| *o = *y as f32),
        ElemsMut::F16(o) => o
            .iter_mut()
            .zip(&y)
            .for_each(|(o, y)| *o = f16::from_f64(*y)),
        ElemsMut::BF16(o) => o
            .iter_mut()
            .zip(&y)
            .for_each(|(o, y)| *o = bf16::from_f64(*y)),
    }
    Ok(())
}
