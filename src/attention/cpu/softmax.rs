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
    let y = xc * LOG2E + MAGIC;
    let n = y - MAGIC;
    let ni = (y.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
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

/// Running state of one query tile: max `m`, the max actually subtracted `m_ref` (0 where `m`
/// is still −∞, so that −∞ − m_ref stays −∞ rather than NaN), sum `l` and the rescale `alpha`.
pub struct RowState {
    pub m: Vec<f32>,
    pub m_ref: Vec<f32>,
    pub l: Vec<f32>,
    pub alpha: Vec<f32>,
    pub block_max: Vec<f32>,
    pub block_sum: Vec<f32>,
}

impl RowState {
    pub fn new(cols: usize) -> Self {
        RowState {
            m: vec![f32::NEG_INFINITY; cols],
            m_ref: vec![0.0; cols],
            l: vec![0.0; cols],
            alpha: vec![1.0; cols],
            block_max: vec![0.0; cols],
            block_sum: vec![0.0; cols],
        }
    }

    /// Turns the scores of one key block (`keys` rows of `st`, `cols` query columns) into
    /// probabilities relative to the updated running max, and updates `l` and `alpha`
    /// (the factor the caller applies to its output accumulator).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // several arrays indexed by the same query column
    pub fn update(&mut self, st: &mut [f32], ld: usize, keys: usize, cols: usize) {
        let bm = &mut self.block_max[..cols];
        bm.fill(f32::NEG_INFINITY);
        for row in st.chunks(ld).take(keys) {
            for (m, &s) in bm.iter_mut().zip(&row[..cols]) {
                *m = m.max(s);
            }
        }
        for i in 0..cols {
            let m_new = self.m[i].max(bm[i]);
            let m_ref = if m_new == f32::NEG_INFINITY {
                0.0
            } else {
                m_new
            };
            self.alpha[i] = exp_nonpos(self.m[i] - m_ref);
            self.m[i] = m_new;
            self.m_ref[i] = m_ref;
        }
        let bs = &mut self.block_sum[..cols];
        bs.fill(0.0);
        let m_ref = &self.m_ref[..cols];
        for row in st.chunks_mut(ld).take(keys) {
            for ((s, &mr), sum) in row[..cols].iter_mut().zip(m_ref).zip(bs.iter_mut()) {
                let e = exp_nonpos(*s - mr);
                *s = e;
                *sum += e;
            }
        }
        for i in 0..cols {
            self.l[i] = self.l[i] * self.alpha[i] + bs[i];
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn fully_masked_columns_stay_zero_without_nan() {
        let mut st = vec![f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, 3.0];
        let mut rs = RowState::new(2);
        rs.update(&mut st, 2, 2, 2);
        assert_eq!(st[0], 0.0);
        assert_eq!(st[2], 0.0);
        assert_eq!(rs.l[0], 0.0);
        assert!((rs.l[1] - (1.0 + (-2.0f32).exp())).abs() < 1e-6);
        assert!(rs.alpha.iter().all(|a| a.is_finite()));
    }
}
