//! The element-wise half of FlashAttention-2 on a transposed score tile `Sᵀ` (keys × queries,
//! row stride `ld`): softcap, masks, the running max / sum update and the exponentials. Written
//! as plain loops over query columns so LLVM vectorizes them with the caller's target features.

/// `e^x` for `x ≤ 0` (including −∞, which gives exactly 0), branch-free so loops vectorize.
/// Relative error about 2 ulp: Cody–Waite reduction `x = n·ln2 + r`, |r| ≤ ln2/2, a degree-7
/// Taylor polynomial for `e^r`, and `2^n` built in the exponent bits.
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.max(-87.0);
    let y = xc.mul_add(LOG2E, MAGIC);
    let n = y - MAGIC;
    let ni = (y.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    // mul_add becomes one FMA instruction in the AVX2/AVX-512 instantiations.
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p: f32 = 1.0 / 5040.0;
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // n ∈ [-126, 0]: the biased exponent stays in 1..=127, a normal number.
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let v = p * scale;
    // Below −87 the true value is under f32's smallest normal; masked keys (−∞) must give 0.
    if x < -87.0 {
        0.0
    } else {
        v
    }
}

/// `s ← c·tanh(s / c)` on the first `cols` entries of `rows` rows.
#[inline(always)]
pub fn softcap(st: &mut [f32], ld: usize, rows: usize, cols: usize, cap: f32) {
    let inv = 1.0 / cap;
    for row in st.chunks_mut(ld).take(rows) {
        for x in &mut row[..cols] {
            *x = cap * (*x * inv).tanh();
        }
    }
}

/// Running state of one query tile, per query column: max `m`, sum `l`, and `alpha`, the
/// factor by which the last update rescaled earlier contributions.
pub struct RowState {
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    pub alpha: Vec<f32>,
}

impl RowState {
    /// State for `cols` columns (a multiple of [`LANES`]).
    pub fn new(cols: usize) -> Self {
        RowState {
            m: vec![f32::NEG_INFINITY; cols],
            l: vec![0.0; cols],
            alpha: vec![1.0; cols],
        }
    }

    /// Turns the scores of one key block (`keys` rows of `st`, `ld` query columns, `ld` a
    /// multiple of [`LANES`]) into probabilities relative to the updated running max, and
    /// updates `l` and `alpha` (the factor the caller applies to its output accumulator).
    /// Works on 16 query columns at a time so that maxima and sums stay in registers.
    #[inline(always)]
    pub fn update(&mut self, st: &mut [f32], ld: usize, keys: usize) {
        for c0 in (0..ld).step_by(LANES) {
            let (Some(m), Some(l), Some(alpha)) = (
                self.m.get_mut(c0..c0 + LANES),
                self.l.get_mut(c0..c0 + LANES),
                self.alpha.get_mut(c0..c0 + LANES),
            ) else {
                return;
            };
            let mut bm = [f32::NEG_INFINITY; LANES];
            for row in st.chunks(ld).take(keys) {
                let Some(s) = lanes(row, c0) else { continue };
                for (b, &x) in bm.iter_mut().zip(s) {
                    *b = fmax(*b, x);
                }
            }
            let mut m_ref = [0.0f32; LANES];
            for q in 0..LANES {
                let m_new = fmax(m[q], bm[q]);
                // Where nothing is visible yet, subtract 0 so that −∞ − m_ref stays −∞.
                m_ref[q] = if m_new == f32::NEG_INFINITY {
                    0.0
                } else {
                    m_new
                };
                alpha[q] = exp_nonpos(m[q] - m_ref[q]);
                m[q] = m_new;
            }
            let mut sum = [0.0f32; LANES];
            for row in st.chunks_mut(ld).take(keys) {
                let Some(s) = lanes_mut(row, c0) else {
                    continue;
                };
                for ((x, &mr), acc) in s.iter_mut().zip(&m_ref).zip(sum.iter_mut()) {
                    let e = exp_nonpos(*x - mr);
                    *x = e;
                    *acc += e;
                }
            }
            for q in 0..LANES {
                l[q] = l[q] * alpha[q] + sum[q];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl RowState {
    /// [`RowState::update`] with AVX-512 intrinsics: `e^x = 2^n · p(f)` with `n` from
    /// `vrndscaleps`, a degree-6 polynomial for `2^f` (|f| ≤ ½, fitted for relative error
    /// 1e-7) and `vscalefps` for `2^n`, about 14 instructions per 16 scores against 22 for the
    /// portable form.
    ///
    /// `block_max`, when given, is the per-column maximum of this block's scores (taken by
    /// the GEMM while the scores were in registers); otherwise it is computed here.
    ///
    /// # Safety
    /// The CPU must support AVX-512F. (Shapes are checked: `ld` a multiple of [`LANES`], `st`
    /// holding `keys` rows of `ld`, the state and `block_max` `ld` columns; otherwise this
    /// falls back to the portable update.)
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn update_avx512(
        &mut self,
        st: &mut [f32],
        ld: usize,
        keys: usize,
        block_max: Option<&[f32]>,
    ) {
        use std::arch::x86_64::*;
        if !ld.is_multiple_of(LANES)
            || st.len() < keys * ld
            || self.m.len() < ld
            || self.l.len() < ld
            || self.alpha.len() < ld
            || block_max.is_some_and(|b| b.len() < ld)
        {
            return self.update(st, ld, keys);
        }
        let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
        // Below 2^-200 every f32 is 0: clamping there also turns −∞ into an exact 0 without
        // producing NaN in f = t − round(t).
        let lowest = _mm512_set1_ps(-200.0);
        let c = EXP2_POLY.map(|x| _mm512_set1_ps(x));
        let exp = |x: __m512| -> __m512 {
            let t = _mm512_max_ps(_mm512_mul_ps(x, log2e), lowest);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let f = _mm512_sub_ps(t, n);
            let mut p = c[6];
            p = _mm512_fmadd_ps(p, f, c[5]);
            p = _mm512_fmadd_ps(p, f, c[4]);
            p = _mm512_fmadd_ps(p, f, c[3]);
            p = _mm512_fmadd_ps(p, f, c[2]);
            p = _mm512_fmadd_ps(p, f, c[1]);
            p = _mm512_fmadd_ps(p, f, c[0]);
            _mm512_scalef_ps(p, n)
        };
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let base = st.as_mut_ptr();
        for c0 in (0..ld).step_by(LANES) {
            let bm = match block_max {
                Some(b) => _mm512_loadu_ps(b.as_ptr().add(c0)),
                None => {
                    let mut bm = neg_inf;
                    for j in 0..keys {
                        bm = _mm512_max_ps(bm, _mm512_loadu_ps(base.add(j * ld + c0)));
                    }
                    bm
                }
            };
            let m_old = _mm512_loadu_ps(self.m.as_ptr().add(c0));
            let m_new = _mm512_max_ps(m_old, bm);
            // Where nothing is visible yet, subtract 0 so that −∞ − m_ref stays −∞.
            let unset = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_new, neg_inf);
            let m_ref = _mm512_mask_mov_ps(m_new, unset, _mm512_setzero_ps());
            let alpha = exp(_mm512_sub_ps(m_old, m_ref));
            _mm512_storeu_ps(self.m.as_mut_ptr().add(c0), m_new);
            _mm512_storeu_ps(self.alpha.as_mut_ptr().add(c0), alpha);
            let mut sum = _mm512_setzero_ps();
            for j in 0..keys {
                let ptr = base.add(j * ld + c0);
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(ptr), m_ref));
                _mm512_storeu_ps(ptr, e);
                sum = _mm512_add_ps(sum, e);
            }
            let lp = self.l.as_mut_ptr().add(c0);
            _mm512_storeu_ps(lp, _mm512_fmadd_ps(_mm512_loadu_ps(lp), alpha, sum));
        }
    }
}

/// `2^f ≈ Σ c_k f^k` on |f| ≤ ½: weighted least-squares fit, max relative error 9.7e-8 when
/// evaluated in f32 (Horner, FMA).
const EXP2_POLY: [f32; 7] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_46,
    0.055_503_286,
    0.009_618_489,
    0.001_339_993_1,
    0.000_153_458_17,
];

/// Query columns processed together: one AVX-512 register of f32.
pub const LANES: usize = 16;

#[inline(always)]
fn lanes(row: &[f32], c0: usize) -> Option<&[f32; LANES]> {
    row.get(c0..c0 + LANES)?.try_into().ok()
}

#[inline(always)]
fn lanes_mut(row: &mut [f32], c0: usize) -> Option<&mut [f32; LANES]> {
    row.get_mut(c0..c0 + LANES)?.try_into().ok()
}

/// `max` without NaN bookkeeping (scores are never NaN), one `vmaxps`.
#[inline(always)]
fn fmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::Isa;
    use super::*;

    #[test]
    fn exp_is_accurate_and_exact_at_the_ends() {
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-1000.0), 0.0);
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = exp_nonpos(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }

    #[test]
    fn avx512_update_matches_portable() {
        if Isa::detect() != Isa::Avx512 {
            return;
        }
        let (ld, keys) = (32, 7);
        let mut st: Vec<f32> = (0..ld * keys)
            .map(|i| match i % 11 {
                0 => f32::NEG_INFINITY,
                k => (k as f32 - 5.0) * 1.7,
            })
            .collect();
        // Column 3 fully masked.
        for j in 0..keys {
            st[j * ld + 3] = f32::NEG_INFINITY;
        }
        let scores = st.clone();
        let (mut a, mut b) = (RowState::new(ld), RowState::new(ld));
        // Two blocks in a row: the second exercises alpha and the running sums.
        for round in 0..2 {
            st.copy_from_slice(&scores);
            st.iter_mut().for_each(|x| *x += round as f32);
            let mut st2 = st.clone();
            a.update(&mut st, ld, keys);
            // SAFETY: AVX-512 detected above.
            unsafe { b.update_avx512(&mut st2, ld, keys, None) };
            for (x, y) in st.iter().zip(&st2).chain(a.l.iter().zip(&b.l)) {
                // Probabilities are ≤ 1: small ones may differ by more ulps (x·log2e rounding).
                assert!((x - y).abs() <= 4e-7 * x.abs() + 1e-8, "{x} vs {y}");
            }
            assert_eq!(st2[3], 0.0);
            assert_eq!(b.l[3], 0.0);
            assert_eq!(a.m, b.m);
            assert!(b.alpha.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn fully_masked_columns_stay_zero_without_nan() {
        // Two keys × 16 query columns; column 0 fully masked, column 1 sees scores 1 and 3.
        let mut st = vec![0.0f32; 32];
        st[0] = f32::NEG_INFINITY;
        st[16] = f32::NEG_INFINITY;
        st[1] = 1.0;
        st[17] = 3.0;
        let mut rs = RowState::new(16);
        rs.update(&mut st, 16, 2);
        assert_eq!(st[0], 0.0);
        assert_eq!(st[16], 0.0);
        assert_eq!(rs.l[0], 0.0);
        assert!((rs.l[1] - (1.0 + (-2.0f32).exp())).abs() < 1e-6);
        assert!(rs.alpha.iter().all(|a| a.is_finite()));
    }
}
