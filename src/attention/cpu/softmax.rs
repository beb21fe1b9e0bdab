//! The element-wise half of FlashAttention-2 on a transposed score tile `Sᵀ` (keys × queries,
//! row stride `ld`): softcap, masks, the running max / sum update and the exponentials. Scores
//! arrive in log2 units (the kernel folds `scale·log2 e` into Q), so the exponential is `2^x`.
//! Plain loops over query columns so LLVM vectorizes them with the caller's target features,
//! and an AVX-512 form.

/// `2^x` for `x ≤ 0` (including −∞, which gives exactly 0), branch-free so loops vectorize.
/// Relative error about 2 ulp: `x = n + f`, |f| ≤ ½, a degree-7 Taylor polynomial for
/// `e^(f·ln 2)`, and `2^n` built in the exponent bits. `FUSED`: the code runs where the CPU
/// has fused multiply-adds (the caller's target features); otherwise `f32::mul_add` would be
/// a call to a software fma, so the polynomial uses a multiply and an add.
#[inline(always)]
pub fn exp2_nonpos<const FUSED: bool>(x: f32) -> f32 {
    let mul_add = |a: f32, b: f32, c: f32| if FUSED { a.mul_add(b, c) } else { a * b + c };
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    // Not `f32::max`, which would turn a NaN into −125 (a NaN must stay NaN).
    let xc = if x < -125.0 { -125.0 } else { x };
    let y = xc + MAGIC;
    let n = y - MAGIC;
    let ni = (y.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    // Exact: n is the integer nearest to xc, and |xc| < 2^23.
    let r = (xc - n) * std::f32::consts::LN_2;
    let mut p: f32 = 1.0 / 5040.0;
    p = mul_add(p, r, 1.0 / 720.0);
    p = mul_add(p, r, 1.0 / 120.0);
    p = mul_add(p, r, 1.0 / 24.0);
    p = mul_add(p, r, 1.0 / 6.0);
    p = mul_add(p, r, 0.5);
    p = mul_add(p, r, 1.0);
    p = mul_add(p, r, 1.0);
    // n ∈ [-125, 0]: the biased exponent stays in 2..=127, a normal number.
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let v = p * scale;
    // Below −125 the true value is close to f32's smallest normal; masked keys (−∞) must give 0.
    if x < -125.0 {
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
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 paths only
pub struct RowState {
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    pub alpha: Vec<f32>,
    /// What the last update subtracted from each column's scores (the max, or 0 where no key
    /// was visible yet).
    m_ref: Vec<f32>,
    /// The current block's column maxima, when computed here.
    bmax: Vec<f32>,
}

impl RowState {
    /// State for `cols` columns (a multiple of [`LANES`]).
    pub fn new(cols: usize) -> Self {
        RowState {
            m: vec![f32::NEG_INFINITY; cols],
            l: vec![0.0; cols],
            alpha: vec![1.0; cols],
            m_ref: vec![0.0; cols],
            bmax: vec![f32::NEG_INFINITY; cols],
        }
    }

    /// Turns the scores of one key block (`keys` rows of `st`, row stride `ld`, the first
    /// `cols` columns, a multiple of [`LANES`]) into probabilities relative to the updated
    /// running max, and updates `l` and `alpha` (the factor the caller applies to its output
    /// accumulator). Returns whether some column's max moved from a finite value, i.e. whether
    /// the accumulator needs that rescale at all (otherwise every `alpha` of a column that had
    /// seen a key is 1, and the others scale an accumulator that is still 0).
    /// Works on 16 query columns at a time so that maxima and sums stay in registers.
    #[inline(always)]
    pub fn update<const FUSED: bool>(
        &mut self,
        st: &mut [f32],
        ld: usize,
        cols: usize,
        keys: usize,
    ) -> bool {
        let mut moved = false;
        for c0 in (0..cols).step_by(LANES) {
            let (Some(m), Some(l), Some(alpha)) = (
                self.m.get_mut(c0..c0 + LANES),
                self.l.get_mut(c0..c0 + LANES),
                self.alpha.get_mut(c0..c0 + LANES),
            ) else {
                return true;
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
                moved |= m_new > m[q] && m[q] > f32::NEG_INFINITY;
                // Where nothing is visible yet, subtract 0 so that −∞ − m_ref stays −∞.
                m_ref[q] = if m_new == f32::NEG_INFINITY {
                    0.0
                } else {
                    m_new
                };
                alpha[q] = exp2_nonpos::<FUSED>(m[q] - m_ref[q]);
                m[q] = m_new;
            }
            let mut sum = [0.0f32; LANES];
            for row in st.chunks_mut(ld).take(keys) {
                let Some(s) = lanes_mut(row, c0) else {
                    continue;
                };
                for ((x, &mr), acc) in s.iter_mut().zip(&m_ref).zip(sum.iter_mut()) {
                    let e = exp2_nonpos::<FUSED>(*x - mr);
                    *x = e;
                    *acc += e;
                }
            }
            for q in 0..LANES {
                l[q] = l[q] * alpha[q] + sum[q];
            }
        }
        moved
    }
}

/// The row-major form of [`RowState::update`], for the few-rows path: `s` holds `rows` rows
/// of `keys` scores (row stride `lds`, keys along the vector lanes). Turns them into
/// probabilities relative to each row's updated running max `m`, updates the sums `l`, sets
/// `alpha` (the factor for the output accumulator's rows) and returns whether some row's max
/// moved from a finite value. 16 independent lanes for the max and the sum, so both vectorize.
#[inline(always)]
pub fn update_rows<const FUSED: bool>(
    s: &mut [f32],
    lds: usize,
    rows: usize,
    keys: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) -> bool {
    let mut moved = false;
    for (r, row) in s.chunks_mut(lds).take(rows).enumerate() {
        let row = &mut row[..keys];
        let mut lanes = [f32::NEG_INFINITY; LANES];
        for chunk in row.chunks(LANES) {
            for (b, &x) in lanes.iter_mut().zip(chunk) {
                *b = fmax(*b, x);
            }
        }
        let bm = lanes.iter().fold(f32::NEG_INFINITY, |a, &x| fmax(a, x));
        let m_new = fmax(m[r], bm);
        moved |= m_new > m[r] && m[r] > f32::NEG_INFINITY;
        // Where nothing is visible yet, subtract 0 so that −∞ − m_ref stays −∞.
        let m_ref = if m_new == f32::NEG_INFINITY {
            0.0
        } else {
            m_new
        };
        alpha[r] = exp2_nonpos::<FUSED>(m[r] - m_ref);
        m[r] = m_new;
        let mut sums = [0.0f32; LANES];
        for chunk in row.chunks_mut(LANES) {
            for (x, acc) in chunk.iter_mut().zip(sums.iter_mut()) {
                let e = exp2_nonpos::<FUSED>(*x - m_ref);
                *x = e;
                *acc += e;
            }
        }
        l[r] = l[r] * alpha[r] + sums.iter().sum::<f32>();
    }
    moved
}

#[cfg(target_arch = "x86_64")]
impl RowState {
    /// [`RowState::update`] with AVX-512 intrinsics: `2^x = 2^⌊x⌋ · p(x − ⌊x⌋)` with the
    /// fraction from one `vreduceps`, a degree-5 polynomial for `2^f` on [0, 1) (relative error
    /// 1.5e-7 in f32) and `vscalefps` for `2^⌊x⌋`: 9 vector instructions per 16 scores (with
    /// the subtraction of the max and the running sum), against 13 for the round/subtract/
    /// degree-6 form this replaced. Walks each key row across 64 query columns at a time, so
    /// four independent exponentials are in flight and memory is read in row order.
    ///
    /// `block_max`, when given, is the per-column maximum of this block's scores (taken by
    /// the GEMM while the scores were in registers); otherwise it is computed here. `finite`
    /// promises that no score is ±∞ (no mask, softcap or boundary applied to this block),
    /// which drops the clamp that turns −∞ into an exact 0.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX-512DQ. (Shapes are checked: `cols` a multiple of
    /// [`LANES`] and at most `ld`, `st` holding `keys` rows of `ld`, the state and `block_max`
    /// `cols` columns; otherwise this falls back to the portable update.)
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub unsafe fn update_avx512(
        &mut self,
        st: &mut [f32],
        ld: usize,
        cols: usize,
        keys: usize,
        block_max: Option<&[f32]>,
        finite: bool,
    ) -> bool {
        let Some(moved) = self.prepare_avx512(st, ld, cols, keys, block_max) else {
            return self.update::<true>(st, ld, cols, keys);
        };
        let base = st.as_mut_ptr();
        let (mref, l) = (self.m_ref.as_ptr(), self.l.as_mut_ptr());
        let mut c0 = 0;
        while c0 < cols {
            let nv = ((cols - c0) / LANES).min(4);
            match (nv, finite) {
                (4, true) => exp_rows::<4, false>(base, ld, keys, c0, mref, l),
                (4, false) => exp_rows::<4, true>(base, ld, keys, c0, mref, l),
                (3, true) => exp_rows::<3, false>(base, ld, keys, c0, mref, l),
                (3, false) => exp_rows::<3, true>(base, ld, keys, c0, mref, l),
                (2, true) => exp_rows::<2, false>(base, ld, keys, c0, mref, l),
                (2, false) => exp_rows::<2, true>(base, ld, keys, c0, mref, l),
                (_, true) => exp_rows::<1, false>(base, ld, keys, c0, mref, l),
                (_, false) => exp_rows::<1, true>(base, ld, keys, c0, mref, l),
            }
            c0 += nv * LANES;
        }
        moved
    }

    /// The first half of [`RowState::update_avx512`]: the block's column maxima (from
    /// `block_max` or computed), the new running max, `alpha`, the reference [`RowState::m_ref`]
    /// the exponentials subtract, and `l` rescaled by `alpha` (the caller adds the block's
    /// sums). Returns whether some column's max moved from a finite value, or `None` when the
    /// shapes do not fit (nothing changed then).
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX-512DQ.
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    #[inline]
    pub unsafe fn prepare_avx512(
        &mut self,
        st: &[f32],
        ld: usize,
        cols: usize,
        keys: usize,
        block_max: Option<&[f32]>,
    ) -> Option<bool> {
        use std::arch::x86_64::*;
        if !cols.is_multiple_of(LANES)
            || cols > ld
            || (keys > 0 && st.len() < (keys - 1) * ld + cols)
            || self.m.len() < cols
            || self.l.len() < cols
            || self.alpha.len() < cols
            || self.m_ref.len() < cols
            || self.bmax.len() < cols
            || block_max.is_some_and(|b| b.len() < cols)
        {
            return None;
        }
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let bmax = match block_max {
            Some(b) => b.as_ptr(),
            None => {
                let mut c0 = 0;
                while c0 < cols {
                    let nv = ((cols - c0) / LANES).min(4);
                    let out = self.bmax.as_mut_ptr();
                    match nv {
                        4 => col_max::<4>(st.as_ptr(), ld, keys, c0, out),
                        3 => col_max::<3>(st.as_ptr(), ld, keys, c0, out),
                        2 => col_max::<2>(st.as_ptr(), ld, keys, c0, out),
                        _ => col_max::<1>(st.as_ptr(), ld, keys, c0, out),
                    }
                    c0 += nv * LANES;
                }
                self.bmax.as_ptr()
            }
        };
        let mut moved: __mmask16 = 0;
        // Per 16 columns: the new max, alpha, the reference subtracted from the scores, and
        // l scaled by alpha (the block's sum is added by the exponentials).
        for c0 in (0..cols).step_by(LANES) {
            let bm = _mm512_loadu_ps(bmax.add(c0));
            let m_old = _mm512_loadu_ps(self.m.as_ptr().add(c0));
            let m_new = _mm512_max_ps(m_old, bm);
            moved |= _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m_new, m_old)
                & _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(m_old, neg_inf);
            // Where nothing is visible yet, subtract 0 so that −∞ − m_ref stays −∞.
            let unset = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_new, neg_inf);
            let m_ref = _mm512_mask_mov_ps(m_new, unset, _mm512_setzero_ps());
            // m_old may be −∞ (first block): clamped.
            let alpha = exp2_avx512::<true>(_mm512_sub_ps(m_old, m_ref));
            _mm512_storeu_ps(self.m.as_mut_ptr().add(c0), m_new);
            _mm512_storeu_ps(self.m_ref.as_mut_ptr().add(c0), m_ref);
            _mm512_storeu_ps(self.alpha.as_mut_ptr().add(c0), alpha);
            let lp = self.l.as_mut_ptr().add(c0);
            _mm512_storeu_ps(lp, _mm512_mul_ps(_mm512_loadu_ps(lp), alpha));
        }
        Some(moved != 0)
    }
}

/// `out[c0 + c] = max_j st[j][c0 + c]` for `c < 16·V`: even and odd rows in separate chains,
/// so 2·V maxima are in flight instead of one chain of `keys` dependent ones per vector.
///
/// # Safety
/// AVX-512F; `st` holds `keys` rows of stride `ld` covering the columns, `out` covers them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
#[inline]
unsafe fn col_max<const V: usize>(
    st: *const f32,
    ld: usize,
    keys: usize,
    c0: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut even = [_mm512_set1_ps(f32::NEG_INFINITY); V];
    let mut odd = even;
    let mut j = 0;
    while j + 1 < keys {
        for v in 0..V {
            even[v] = _mm512_max_ps(even[v], _mm512_loadu_ps(st.add(j * ld + c0 + LANES * v)));
            odd[v] = _mm512_max_ps(
                odd[v],
                _mm512_loadu_ps(st.add((j + 1) * ld + c0 + LANES * v)),
            );
        }
        j += 2;
    }
    if j < keys {
        for (v, x) in even.iter_mut().enumerate() {
            *x = _mm512_max_ps(*x, _mm512_loadu_ps(st.add(j * ld + c0 + LANES * v)));
        }
    }
    for (v, (e, o)) in even.iter().zip(&odd).enumerate() {
        _mm512_storeu_ps(out.add(c0 + LANES * v), _mm512_max_ps(*e, *o));
    }
}

/// `2^x` on 16 lanes for `x ≤ 0`: `⌊x⌋` rides in `vscalefps` (which scales by `2^⌊src⌋`),
/// `vreduceps` gives `x − ⌊x⌋ ∈ [0, 1)`. With `CLAMP`, −∞ (and anything below −200) gives an
/// exact 0; without, `x` must be finite.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
#[inline]
pub unsafe fn exp2_avx512<const CLAMP: bool>(
    x: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = if CLAMP {
        _mm512_max_ps(x, _mm512_set1_ps(-200.0))
    } else {
        x
    };
    // imm8: 0 fraction bits kept, round down, suppress the precision exception.
    let f = _mm512_reduce_ps::<0x09>(x);
    let mut p = _mm512_set1_ps(EXP2_POLY[5]);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[4]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[3]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[2]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[1]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[0]));
    _mm512_scalef_ps(p, x)
}

/// `st[j][c0 + c] ← 2^(st[j][c0 + c] − m_ref[c0 + c])` for every key row `j < keys` and
/// `c < 16·V`, adding each column's sum of the results to `l`.
///
/// # Safety
/// AVX-512F/DQ; `base` holds `keys` rows of stride `ld` covering columns `c0..c0 + 16·V`,
/// and `m_ref` and `l` cover those columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
#[inline]
unsafe fn exp_rows<const V: usize, const CLAMP: bool>(
    base: *mut f32,
    ld: usize,
    keys: usize,
    c0: usize,
    m_ref: *const f32,
    l: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut mr = [_mm512_setzero_ps(); V];
    let mut sum = [_mm512_setzero_ps(); V];
    for (v, x) in mr.iter_mut().enumerate() {
        *x = _mm512_loadu_ps(m_ref.add(c0 + LANES * v));
    }
    for j in 0..keys {
        let row = base.add(j * ld + c0);
        for v in 0..V {
            let ptr = row.add(LANES * v);
            let e = exp2_avx512::<CLAMP>(_mm512_sub_ps(_mm512_loadu_ps(ptr), mr[v]));
            _mm512_storeu_ps(ptr, e);
            sum[v] = _mm512_add_ps(sum[v], e);
        }
    }
    for (v, s) in sum.iter().enumerate() {
        let lp = l.add(c0 + LANES * v);
        _mm512_storeu_ps(lp, _mm512_add_ps(_mm512_loadu_ps(lp), *s));
    }
}

/// `2^f ≈ Σ c_k f^k` on [0, 1), `c_0 = 1` exactly (so `2^0` is exactly 1): fitted for relative
/// error (8e-8 in exact arithmetic, 1.5e-7 evaluated in f32 by Horner with FMA).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 paths only
const EXP2_POLY: [f32; 6] = [
    1.0,
    0.693_151_3,
    0.240_164_46,
    0.055_799_87,
    0.009_017_092,
    0.001_867_100_6,
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

/// `max` that keeps a NaN from either side (a NaN score, from a NaN in Q or K, must reach
/// the output as on the AVX-512 path, not vanish behind a finite maximum): a compare and two
/// blends.
#[inline(always)]
pub(super) fn fmax(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    use super::super::gemm::Isa;
    use super::*;

    #[test]
    fn exp2_is_accurate_and_exact_at_the_ends() {
        fn check(exp2: fn(f32) -> f32, what: &str) {
            assert_eq!(exp2(0.0), 1.0, "{what}");
            assert_eq!(exp2(f32::NEG_INFINITY), 0.0, "{what}");
            assert_eq!(exp2(-1000.0), 0.0, "{what}");
            let mut worst = 0.0f64;
            let mut x = -125.0f32;
            while x <= 0.0 {
                let got = exp2(x) as f64;
                let want = (x as f64).exp2();
                worst = worst.max(((got - want) / want).abs());
                x += 0.000_731;
            }
            assert!(worst < 4e-7, "{what}: worst relative error {worst}");
        }
        check(exp2_nonpos::<true>, "fused");
        check(exp2_nonpos::<false>, "multiply and add");
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_exp2_is_accurate_and_exact_at_the_ends() {
        if Isa::detect_vector() != Isa::Avx512 {
            return;
        }
        use std::arch::x86_64::*;
        let one = |x: f32, clamp: bool| -> f32 {
            let mut out = [0.0f32; LANES];
            // SAFETY: AVX-512F/DQ detected above.
            unsafe {
                let v = _mm512_set1_ps(x);
                let e = if clamp {
                    exp2_avx512::<true>(v)
                } else {
                    exp2_avx512::<false>(v)
                };
                _mm512_storeu_ps(out.as_mut_ptr(), e);
            }
            out[0]
        };
        assert_eq!(one(0.0, false), 1.0);
        assert_eq!(one(f32::NEG_INFINITY, true), 0.0);
        assert_eq!(one(-1000.0, true), 0.0);
        assert_eq!(one(-1e30, false), 0.0);
        let mut worst = 0.0f64;
        let mut x = -126.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp2();
            for clamp in [false, true] {
                let got = one(x, clamp) as f64;
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_update_matches_portable() {
        if Isa::detect_vector() != Isa::Avx512 {
            return;
        }
        // (row stride, columns): 4-vector groups with a 1-vector tail, and a 3-vector group.
        for (ld, cols) in [(96, 80), (48, 48)] {
            let keys = 7;
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
                let input = st.clone();
                let mut st2 = st.clone();
                let moved_a = a.update::<true>(&mut st, ld, cols, keys);
                // SAFETY: AVX-512 detected above.
                let moved_b = unsafe { b.update_avx512(&mut st2, ld, cols, keys, None, false) };
                assert_eq!(moved_a, round == 1);
                assert_eq!(moved_b, round == 1);
                for j in 0..keys {
                    for c in 0..ld {
                        let (x, y) = (st[j * ld + c], st2[j * ld + c]);
                        if c >= cols {
                            assert_eq!(y.to_bits(), input[j * ld + c].to_bits(), "untouched");
                            continue;
                        }
                        assert!((x - y).abs() <= 4e-7 * x.abs() + 1e-8, "{x} vs {y}");
                    }
                }
                for (x, y) in a.l.iter().zip(&b.l).take(cols) {
                    assert!((x - y).abs() <= 4e-7 * x.abs() + 1e-8, "{x} vs {y}");
                }
                assert_eq!(st2[3], 0.0);
                assert_eq!(b.l[3], 0.0);
                assert_eq!(a.m[..cols], b.m[..cols]);
                assert!(b.alpha.iter().all(|x| x.is_finite()));
            }
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
        rs.update::<false>(&mut st, 16, 16, 2);
        assert_eq!(st[0], 0.0);
        assert_eq!(st[16], 0.0);
        assert_eq!(rs.l[0], 0.0);
        // Scores are in log2 units.
        assert!((rs.l[1] - 1.25).abs() < 1e-6);
        assert!(rs.alpha.iter().all(|a| a.is_finite()));
    }
}
