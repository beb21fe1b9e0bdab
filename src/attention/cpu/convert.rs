//! Moving rows between the typed tensor views and f32 tiles: widening fp16/bf16 on load,
//! rounding on store, with a fast path for unit-stride rows.

use super::super::{Elems, MaskData};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Writes `dst.len()` elements starting at `off`, `stride` apart, widened to f32.
/// Panics (caught by the task wrapper) only if the caller's bounds checks were wrong.
#[inline(always)]
pub fn load_row(src: Elems, off: usize, stride: usize, dst: &mut [f32]) {
    let n = dst.len();
    if n == 0 {
        return;
    }
    if stride == 1 {
        match src {
            Elems::F32(s) => dst.copy_from_slice(&s[off..off + n]),
            Elems::F16(s) => s[off..off + n].convert_to_f32_slice(dst),
            Elems::BF16(s) => bf16_to_f32(&s[off..off + n], dst),
        }
    } else {
        for (d, x) in dst.iter_mut().enumerate() {
            *x = src.get_f32(off + d * stride);
        }
    }
}

/// bf16 → f32 is exact: the bf16 bits are the f32's upper half.
#[inline(always)]
fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

/// A mask row as f32 additive terms over keys `j0..j0 + dst.len()`: bool false → −∞, true → 0.
/// `off` is the row's base offset, `stride` the key stride (0 when the key axis broadcasts).
#[inline(always)]
pub fn load_mask_row(mask: MaskData, off: usize, stride: usize, dst: &mut [f32]) {
    let n = dst.len();
    if n == 0 {
        return;
    }
    let bool_term = |b: u8| if b != 0 { 0.0 } else { f32::NEG_INFINITY };
    if stride == 0 {
        let v = match mask {
            MaskData::Bool(m) => bool_term(m[off]),
            MaskData::F32(m) => m[off],
            MaskData::F16(m) => m[off].to_f32(),
            MaskData::BF16(m) => m[off].to_f32(),
        };
        dst.fill(v);
        return;
    }
    let idx = |d: usize| off + d * stride;
    match mask {
        MaskData::Bool(m) if stride == 1 => {
            for (x, &b) in dst.iter_mut().zip(&m[off..off + n]) {
                *x = bool_term(b);
            }
        }
        MaskData::F32(m) if stride == 1 => dst.copy_from_slice(&m[off..off + n]),
        MaskData::F16(m) if stride == 1 => m[off..off + n].convert_to_f32_slice(dst),
        MaskData::BF16(m) if stride == 1 => bf16_to_f32(&m[off..off + n], dst),
        MaskData::Bool(m) => dst
            .iter_mut()
            .enumerate()
            .for_each(|(d, x)| *x = bool_term(m[idx(d)])),
        MaskData::F32(m) => dst.iter_mut().enumerate().for_each(|(d, x)| *x = m[idx(d)]),
        MaskData::F16(m) => dst
            .iter_mut()
            .enumerate()
            .for_each(|(d, x)| *x = m[idx(d)].to_f32()),
        MaskData::BF16(m) => dst
            .iter_mut()
            .enumerate()
            .for_each(|(d, x)| *x = m[idx(d)].to_f32()),
    }
}

/// Rounds an f32 row into f16 (round to nearest even, as `half` does).
#[inline(always)]
pub fn store_f16(src: &[f32], dst: &mut [f16]) {
    dst.convert_from_f32_slice(src);
}

/// Rounds an f32 row into bf16 (round to nearest even, NaN kept).
#[inline(always)]
pub fn store_bf16(src: &[f32], dst: &mut [bf16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(*s);
    }
}
