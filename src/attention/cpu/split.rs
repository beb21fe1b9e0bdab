//! fp32 operands as sums of bf16 parts, packed into AMX tile layouts.
//!
//! `x = hi + mid + lo` exactly: `hi` is `x` rounded to bf16 (to nearest even), `mid` the
//! remainder `x − hi` (at most 16 significant bits) truncated to bf16, `lo` what is left (at
//! most 8 bits, so exact). `|mid| ≤ 2⁻⁸|x|` and `|lo| < 2⁻¹⁵|x|`, so the cross products the
//! GEMM drops (mid·lo, lo·mid, lo·lo) are below 2⁻²²·|x·y| together (typically far less),
//! under the fp32 rounding bound of a 64-term dot product itself; bf16 × bf16 products are
//! exact in the fp32 accumulator. Σ x·y comes out at fp32 accuracy. Softmax numerators (in
//! [0, 1]) are split by truncation instead, which is cheaper and as exact
//! ([`avx512::split_pairs`]).
//!
//! Edge cases. Non-finite inputs: for NaN and ±∞, `x − hi` is NaN, so `mid` and `lo` are NaN
//! and every dot product that touches `x` is NaN (the GEMM always includes the hi·mid and mid·hi
//! products) — an infinite input gives NaN rather than the fp32 path's ±∞ or NaN, never a
//! finite value. A finite `x` that would round up to ∞ in bf16 (|x| > 3.39e38) keeps its
//! truncated `hi` instead, so it stays finite. The AMX unit treats bf16 denormals (below
//! 1.2e-38) as zero, so parts that small are lost: absolute errors of that order.
//!
//! Layouts, in tiles of 16 rows × 64 bytes (512 u16), tile-major so that each tile load reads
//! 1 KiB contiguously:
//! - [`APack`] (the GEMM's left operand, M × K): tile `(part, row tile, k chunk)` holds 16 rows
//!   of 32 consecutive k.
//! - [`BPack`] (right operand, K × N, "VNNI"): tile `(part, k chunk, column tile)` holds 16
//!   rows of k pairs, each row 16 columns × (k even, k odd).

use super::amx::TILE_WORDS;
use crate::{Error, Result};

const HIGH: u32 = 0xFFFF_0000;

/// The three bf16 parts of `x` (see the module docs), as bf16 bit patterns: the scalar
/// statement of what the vector packers compute (tests compare the two).
#[cfg(test)]
pub fn split3(x: f32) -> [u16; 3] {
    let b = x.to_bits();
    let rne = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & HIGH;
    // Rounded up to ±∞ from a finite value: truncate instead.
    let hi = if rne & 0x7FFF_FFFF == 0x7F80_0000 && b & 0x7F80_0000 != 0x7F80_0000 {
        b & HIGH
    } else {
        rne
    };
    let r1 = x - f32::from_bits(hi);
    let mid = r1.to_bits() & HIGH;
    let lo = (r1 - f32::from_bits(mid)).to_bits() & HIGH;
    [(hi >> 16) as u16, (mid >> 16) as u16, (lo >> 16) as u16]
}

/// How many bf16 parts represent every value of an input type exactly (or to fp32 accuracy):
/// bf16 1, fp16 2 (11 significant bits), fp32 3.
pub fn parts_for(elems: super::super::Elems) -> usize {
    match elems {
        super::super::Elems::BF16(_) => 1,
        super::super::Elems::F16(_) => 2,
        super::super::Elems::F32(_) => 3,
    }
}

/// u16 storage whose first element sits on a 64-byte boundary.
#[derive(Default)]
pub struct Words {
    buf: Vec<u16>,
    off: usize,
    len: usize,
}

impl Words {
    /// Words the packers overwrite before any product reads them (see
    /// [`super::scratch::reused`]).
    fn scratch(len: usize) -> Words {
        let buf = super::scratch::reused(len + 32, 0u16);
        let off = buf.as_ptr().align_offset(64).min(31);
        Words { buf, off, len }
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        super::scratch::recycle(std::mem::take(&mut self.buf));
    }
}

impl std::ops::Deref for Words {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for Words {
    fn deref_mut(&mut self) -> &mut [u16] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// A packed left operand: `parts` × `mt` row tiles × `kc` k chunks.
#[derive(Default)]
pub struct APack {
    pub buf: Words,
    pub parts: usize,
    pub mt: usize,
    pub kc: usize,
}

impl APack {
    pub fn new(parts: usize, mt: usize, kc: usize) -> APack {
        let mut a = APack {
            buf: Words::default(),
            parts,
            mt,
            kc,
        };
        a.buf = Words::scratch(a.words());
        a
    }
    pub fn words(&self) -> usize {
        self.parts * self.mt * self.kc * TILE_WORDS
    }
    /// `rows` rows of `kc` chunks fit this pack (both A packers check this before writing).
    fn check_fits(&self, rows: usize, kc: usize) -> Result<()> {
        if rows > 16 * self.mt || kc > self.kc || self.words() > self.buf.len() {
            return Err(internal("A block larger than its pack"));
        }
        Ok(())
    }
    fn row(&mut self, part: usize, row: usize, chunk: usize) -> *mut u16 {
        let t = (part * self.mt + row / 16) * self.kc + chunk;
        // SAFETY (of the callers' writes): checked by the packers against `mt`, `kc`, `parts`.
        unsafe { self.buf.as_mut_ptr().add(t * TILE_WORDS + (row % 16) * 32) }
    }
}

/// A packed right operand: `parts` × `kc` k chunks × `nt` column tiles.
#[derive(Default)]
pub struct BPack {
    pub buf: Words,
    pub parts: usize,
    pub kc: usize,
    pub nt: usize,
}

impl BPack {
    pub fn new(parts: usize, kc: usize, nt: usize) -> BPack {
        let mut b = BPack {
            buf: Words::default(),
            parts,
            kc,
            nt,
        };
        b.buf = Words::scratch(b.words());
        b
    }
    pub fn words(&self) -> usize {
        self.parts * self.kc * self.nt * TILE_WORDS
    }
}

fn internal(what: &str) -> Error {
    Error::Other(format!(
        "internal error in the CPU attention kernel (AMX packing): {what}"
    ))
}

#[cfg(target_arch = "x86_64")]
pub use avx512::{pack_a_cols, pack_a_rows, pack_b_pairs, softmax_pack_p, transpose16};

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{internal, APack, BPack, Result, HIGH, TILE_WORDS};
    use std::arch::x86_64::*;

    /// [`super::split3`] on 16 lanes, each part as f32 bits (the bf16 in the high half, the
    /// low half zero). With `GUARD`, finite values that would round to ∞ are truncated
    /// (operands that may be huge; softmax numerators in [0, 1] need no guard).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    pub unsafe fn split<const GUARD: bool>(x: __m512) -> [__m512i; 3] {
        let b = _mm512_castps_si512(x);
        let high = _mm512_set1_epi32(HIGH as i32);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let rne = _mm512_and_si512(
            _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb),
            high,
        );
        let hi = if GUARD {
            let exp = _mm512_set1_epi32(0x7F80_0000);
            let ovf =
                _mm512_cmpeq_epi32_mask(_mm512_and_si512(rne, _mm512_set1_epi32(0x7FFF_FFFF)), exp)
                    & _mm512_cmpneq_epi32_mask(_mm512_and_si512(b, exp), exp);
            _mm512_mask_and_epi32(rne, ovf, b, high)
        } else {
            rne
        };
        let r1 = _mm512_sub_ps(x, _mm512_castsi512_ps(hi));
        let mid = _mm512_and_si512(_mm512_castps_si512(r1), high);
        let lo = _mm512_and_si512(
            _mm512_castps_si512(_mm512_sub_ps(r1, _mm512_castsi512_ps(mid))),
            high,
        );
        [hi, mid, lo]
    }

    /// The 32 bf16 (high halves) of two vectors of parts, in order.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn narrow(a: __m512i, b: __m512i) -> __m512i {
        let idx = _mm512_set_epi16(
            63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21,
            19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
        );
        _mm512_permutex2var_epi16(a, idx, b)
    }

    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// Packs rows `0..rows` of an f32 matrix (row `r` is `src[off + r·rs..][..cols]`) as A
    /// (rows = M, columns = K): `kc = ⌈cols/32⌉` chunks, zero past `cols` and in the rows
    /// from `rows` to the next multiple of 16. Used for a K block (keys × head dim).
    ///
    /// # Safety
    /// The CPU must support AVX-512F/BW. Extents are checked.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_a_rows(
        dst: &mut APack,
        src: &[f32],
        off: usize,
        rs: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let kc = cols.div_ceil(32);
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        dst.check_fits(rows, kc)?;
        if off + (rows - 1) * rs + cols > src.len() {
            return Err(internal("A source out of bounds"));
        }
        let parts = dst.parts;
        for r in 0..rows.next_multiple_of(16) {
            for c in 0..kc {
                let (x0, x1) = if r < rows {
                    let p = src.as_ptr().add(off + r * rs + 32 * c);
                    let n = cols - 32 * c;
                    (
                        _mm512_maskz_loadu_ps(lanes(n), p),
                        _mm512_maskz_loadu_ps(lanes(n.saturating_sub(16)), p.add(16)),
                    )
                } else {
                    (_mm512_setzero_ps(), _mm512_setzero_ps())
                };
                let (s0, s1) = (split::<true>(x0), split::<true>(x1));
                for part in 0..parts {
                    _mm512_storeu_si512(dst.row(part, r, c).cast(), narrow(s0[part], s1[part]));
                }
            }
        }
        Ok(())
    }

    /// Packs the transpose of an f32 block as A: row `e < rows` of the pack is column `e` of
    /// the block, `src[off + j·rs + e]` for `j < cols`; zero past `cols` (to `kc = ⌈cols/32⌉`
    /// chunks) and in rows `rows..` up to a multiple of 16. Used for a V block (A = Vᵀ: head
    /// dim × keys), transposed 16 × 16 in registers.
    ///
    /// # Safety
    /// AVX-512F/BW. Extents are checked.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_a_cols(
        dst: &mut APack,
        src: &[f32],
        off: usize,
        rs: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let kc = cols.div_ceil(32);
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        dst.check_fits(rows, kc)?;
        if off + (cols - 1) * rs + rows > src.len() {
            return Err(internal("A source out of bounds"));
        }
        let parts = dst.parts;
        for m in 0..rows.div_ceil(16) {
            let e0 = 16 * m;
            let mask = lanes(rows - e0);
            for c in 0..kc {
                // Keys 32c.. and 32c + 16.., each as 16 vectors of 16 head-dim lanes, turned
                // into 16 vectors (one per head-dim row) of 16 keys.
                let mut t = [[_mm512_setzero_ps(); 16]; 2];
                for (h, th) in t.iter_mut().enumerate() {
                    for (i, x) in th.iter_mut().enumerate() {
                        let j = 32 * c + 16 * h + i;
                        if j < cols {
                            *x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(off + j * rs + e0));
                        }
                    }
                    transpose16(th);
                }
                for (e, (&x0, &x1)) in t[0].iter().zip(&t[1]).enumerate() {
                    let (s0, s1) = (split::<true>(x0), split::<true>(x1));
                    for part in 0..parts {
                        _mm512_storeu_si512(
                            dst.row(part, e0 + e, c).cast(),
                            narrow(s0[part], s1[part]),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Transposes a 16 × 16 f32 block held as 16 row vectors.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn transpose16(r: &mut [__m512; 16]) {
        // Pairs of rows interleaved, then quads: u[4g + k] holds, in its four 128-bit lanes,
        // rows 4g..4g+4 of columns k, k + 4, k + 8, k + 12.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let pd = |x: __m512| _mm512_castps_pd(x);
            let (a, b) = (pd(t[4 * g]), pd(t[4 * g + 2]));
            let (c, d) = (pd(t[4 * g + 1]), pd(t[4 * g + 3]));
            u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
            u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
            u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
        }
        // Then the 128-bit lanes gathered across the four row groups.
        for k in 0..4 {
            let a0 = _mm512_shuffle_f32x4::<0x88>(u[k], u[4 + k]);
            let a1 = _mm512_shuffle_f32x4::<0xDD>(u[k], u[4 + k]);
            let b0 = _mm512_shuffle_f32x4::<0x88>(u[8 + k], u[12 + k]);
            let b1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + k], u[12 + k]);
            r[k] = _mm512_shuffle_f32x4::<0x88>(a0, b0);
            r[k + 8] = _mm512_shuffle_f32x4::<0xDD>(a0, b0);
            r[k + 4] = _mm512_shuffle_f32x4::<0x88>(a1, b1);
            r[k + 12] = _mm512_shuffle_f32x4::<0xDD>(a1, b1);
        }
    }

    /// The softmax of one key block, one column tile (16 queries) at a time, ending in the
    /// numerators packed as B: for key rows `0..keys` of `st` (row stride `ld`), each tile's
    /// block maximum updates the running max `m`; the factor `α = 2^(m_old − m_new)` scales
    /// the running sum `l` and, unless it is 1 for all 16 columns, the tile's columns of the
    /// transposed output accumulator `ot` (`ot_rows` rows of stride `ld`); then
    /// `P = 2^(s − m_new)` (an exact 0 for −∞ scores with `CLAMP`; where no key was visible yet
    /// `m_new` is −∞ and 0 is subtracted instead) is split into three truncated parts
    /// ([`split_pairs`]) and packed in [`pack_b_pairs`]'s layout (rows `keys..32·kc` zero),
    /// and its column sums are added to `l`. Done per tile, the scores are read while they
    /// are still in L1 (the next tile's maxima are taken during this tile's exponentials,
    /// which brings its scores there), and columns whose max did not move skip the rescale.
    /// The scores are left as they were. Meanwhile the two `prefetch` ranges are fetched into
    /// L2, one 64-byte line of each per row pair (1024 pairs per 128 × 256 block cover two
    /// 48 KiB packs).
    ///
    /// (A burst of prefetches would fill the line-fill buffers and stall the core; spread over
    /// the exponentials they cost a few instructions per pair.)
    ///
    /// # Safety
    /// AVX-512F/BW/DQ and AVX512-BF16. Extents are checked.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16,avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn softmax_pack_p<const CLAMP: bool>(
        dst: &mut BPack,
        st: &[f32],
        ld: usize,
        keys: usize,
        kc: usize,
        m: &mut [f32],
        l: &mut [f32],
        ot: &mut [f32],
        ot_rows: usize,
        prefetch: [&[u16]; 2],
    ) -> Result<()> {
        use super::super::softmax::exp2_avx512;
        let (nt, parts) = (dst.nt, dst.parts);
        if keys == 0 || nt == 0 {
            return Ok(());
        }
        if kc > dst.kc
            || keys > 32 * kc
            || parts != 3
            || dst.words() > dst.buf.len()
            || ld < 16 * nt
            || m.len() < 16 * nt
            || l.len() < 16 * nt
            || (keys - 1) * ld + 16 * nt > st.len()
            || (ot_rows > 0 && (ot_rows - 1) * ld + 16 * nt > ot.len())
        {
            return Err(internal("P block larger than its pack"));
        }
        let base = dst.buf.as_mut_ptr();
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        // One 64-byte line of each prefetch range per row pair, into L2.
        let mut line = 0usize;
        let lines = prefetch.map(|r| (r.as_ptr().cast::<i8>(), r.len() * 2 / 64));
        // A tile's column maxima over the block, even and odd rows in separate chains. Only
        // tile 0's are a pass of their own: tile t + 1's are taken row by row during tile t's
        // exponentials, so that their loads (the scores come from L2) overlap with arithmetic
        // (a separate pass cost a quarter of the softmax, waiting on L2).
        let (mut even, mut odd) = (neg_inf, neg_inf);
        let first = st.as_ptr();
        let mut k = 0;
        while k + 1 < keys {
            even = _mm512_max_ps(even, _mm512_loadu_ps(first.add(k * ld)));
            odd = _mm512_max_ps(odd, _mm512_loadu_ps(first.add((k + 1) * ld)));
            k += 2;
        }
        if k < keys {
            even = _mm512_max_ps(even, _mm512_loadu_ps(first.add(k * ld)));
        }
        for t in 0..nt {
            let col = st.as_ptr().add(16 * t);
            let row = |k: usize| _mm512_loadu_ps(col.add(k * ld));
            let next_col = (t + 1 < nt).then(|| st.as_ptr().add(16 * (t + 1)));
            let (mut even_next, mut odd_next) = (neg_inf, neg_inf);
            let mp = m.as_mut_ptr().add(16 * t);
            let m_old = _mm512_loadu_ps(mp);
            let m_new = _mm512_max_ps(m_old, _mm512_max_ps(even, odd));
            let unset = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_new, neg_inf);
            let mr = _mm512_mask_mov_ps(m_new, unset, _mm512_setzero_ps());
            // m_old may be −∞ (first block): clamped to an exact 0.
            let alpha = exp2_avx512::<true>(_mm512_sub_ps(m_old, mr));
            _mm512_storeu_ps(mp, m_new);
            // Unordered: a NaN factor is applied too.
            if _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(alpha, _mm512_set1_ps(1.0)) != 0 {
                for e in 0..ot_rows {
                    let p = ot.as_mut_ptr().add(e * ld + 16 * t);
                    _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), alpha));
                }
            }
            let p = |k: usize| {
                if k < keys {
                    exp2_avx512::<CLAMP>(_mm512_sub_ps(row(k), mr))
                } else {
                    _mm512_setzero_ps()
                }
            };
            let mut sum = _mm512_setzero_ps();
            for c in 0..kc {
                for r in 0..16 {
                    let k = 32 * c + 2 * r;
                    let (pe, po) = (p(k), p(k + 1));
                    if let Some(next) = next_col {
                        let next_row = |k: usize| _mm512_loadu_ps(next.add(k * ld));
                        if k < keys {
                            even_next = _mm512_max_ps(even_next, next_row(k));
                        }
                        if k + 1 < keys {
                            odd_next = _mm512_max_ps(odd_next, next_row(k + 1));
                        }
                    }
                    sum = _mm512_add_ps(sum, _mm512_add_ps(pe, po));
                    for (part, pair) in split_pairs(pe, po).into_iter().enumerate() {
                        let tile = (part * dst.kc + c) * nt + t;
                        _mm512_storeu_si512(base.add(tile * TILE_WORDS + 32 * r).cast(), pair);
                    }
                    for &(ptr, n) in &lines {
                        if line < n {
                            _mm_prefetch::<_MM_HINT_T1>(ptr.add(64 * line));
                        }
                    }
                    line += 1;
                }
            }
            let lp = l.as_mut_ptr().add(16 * t);
            _mm512_storeu_ps(lp, _mm512_fmadd_ps(_mm512_loadu_ps(lp), alpha, sum));
            (even, odd) = (even_next, odd_next);
        }
        Ok(())
    }

    /// Two rows of softmax numerators (`pe` for an even k, `po` for the next; finite and
    /// non-negative, or NaN) as three bf16 parts each, packed in pairs as B wants them (lane
    /// q: `pe[q]`'s part in the low half, `po[q]`'s in the high half). Unlike [`split`], every
    /// part is truncated: `hi` is the top 8 significant bits, `mid` the next 8 (of the exact
    /// remainder), `lo` the last 8, so the three still add up to the value exactly, and
    /// `|mid| < 2⁻⁷·p`, `|lo| < 2⁻¹⁵·p`: against V's rounded parts, the products the GEMM
    /// drops stay below 2⁻²¹·|p·v| (2⁻²² with both rounded), still far under fp32 rounding.
    /// Numerators need no overflow guard (they are at most 1), and a truncation is a mask, so
    /// there is no conversion or permute: 14 instructions for both rows against 17 with a
    /// rounded `hi` (the whole softmax: 24.2–25.4 TSC cycles per row pair against 28.0–29.3,
    /// `amx::timing::softmax_rate`). Denormal inputs lose what bf16 denormals
    /// cannot hold (the tile unit flushes them).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    pub unsafe fn split_pairs(pe: __m512, po: __m512) -> [__m512i; 3] {
        let high = _mm512_set1_epi32(HIGH as i32);
        // Low half ← e's top half, high half ← o's top half.
        let pair = |e: __m512i, o: __m512i| {
            _mm512_ternarylogic_epi32::<0xF8>(_mm512_srli_epi32::<16>(e), o, high)
        };
        // x minus its top 8 significant bits (exact in f32).
        let rest = |x: __m512i| {
            let top = _mm512_castsi512_ps(_mm512_and_si512(x, high));
            _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(x), top))
        };
        let (e, o) = (_mm512_castps_si512(pe), _mm512_castps_si512(po));
        let (r_e, r_o) = (rest(e), rest(o));
        [pair(e, o), pair(r_e, r_o), pair(rest(r_e), rest(r_o))]
    }

    /// Packs rows `0..rows` of an f32 matrix with row stride `ld` and `16·dst.nt` columns as B
    /// (rows = K, columns = N), zero from row `rows` to `32·kc`. Used for Qᵀ (head dim ×
    /// queries; `GUARD` for values that may be huge).
    ///
    /// # Safety
    /// AVX-512F/BW. Extents are checked.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    pub unsafe fn pack_b_pairs<const GUARD: bool>(
        dst: &mut BPack,
        src: &[f32],
        ld: usize,
        rows: usize,
        kc: usize,
    ) -> Result<()> {
        let (nt, parts) = (dst.nt, dst.parts);
        if rows == 0 || nt == 0 {
            return Ok(());
        }
        if kc > dst.kc || rows > 32 * kc || dst.words() > dst.buf.len() || ld < 16 * nt {
            return Err(internal("B block larger than its pack"));
        }
        if (rows - 1) * ld + 16 * nt > src.len() {
            return Err(internal("B source out of bounds"));
        }
        let high = _mm512_set1_epi32(HIGH as i32);
        let base = dst.buf.as_mut_ptr();
        let load = |k: usize, t: usize| {
            if k < rows {
                _mm512_loadu_ps(src.as_ptr().add(k * ld + 16 * t))
            } else {
                _mm512_setzero_ps()
            }
        };
        for c in 0..kc {
            for r in 0..16 {
                let k = 32 * c + 2 * r;
                for t in 0..nt {
                    let (e, o) = (split::<GUARD>(load(k, t)), split::<GUARD>(load(k + 1, t)));
                    for part in 0..parts {
                        // Lane q: (even k in the low half, odd k in the high half).
                        let pair = _mm512_ternarylogic_epi32::<0xF8>(
                            _mm512_srli_epi32::<16>(e[part]),
                            o[part],
                            high,
                        );
                        let tile = (part * dst.kc + c) * nt + t;
                        _mm512_storeu_si512(base.add(tile * TILE_WORDS + 32 * r).cast(), pair);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(p: [u16; 3]) -> f64 {
        p.iter()
            .map(|&h| f32::from_bits((h as u32) << 16) as f64)
            .sum()
    }

    #[test]
    fn parts_reconstruct_the_value() {
        let mut xs = vec![
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            std::f32::consts::PI,
            1.0 + f32::EPSILON,
            f32::MAX,
            -f32::MAX,
            3.3961e38,
            f32::MIN_POSITIVE,
            1e-30,
            -7.5e-33,
        ];
        let mut seed = 7u64;
        for _ in 0..100_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let bits = (seed >> 32) as u32;
            let x = f32::from_bits(bits);
            // Finite values whose parts stay normal (above 2^-100).
            if x.is_finite() && (x == 0.0 || x.abs() > 1e-30) {
                xs.push(x);
            }
        }
        for &x in &xs {
            let p = split3(x);
            assert_eq!(value(p), x as f64, "{x:e} = {p:?}");
            assert!(value(p).is_finite());
            let (hi, mid, lo) = (
                value([p[0], 0, 0]),
                value([p[1], 0, 0]),
                value([p[2], 0, 0]),
            );
            let ax = (x as f64).abs();
            assert!(
                mid.abs() <= ax * 2f64.powi(-8) && lo.abs() <= ax * 2f64.powi(-15),
                "{x:e}"
            );
            assert!(hi.is_finite());
        }
        // Denormals: the parts lose at most what bf16 denormals cannot hold.
        for x in [1e-39f32, -3e-40, 1.17e-38, f32::from_bits(1)] {
            assert!((value(split3(x)) - x as f64).abs() <= 1e-40, "{x:e}");
        }
        // Non-finite: NaN anywhere in the parts that the GEMM always uses (mid), never a
        // finite set of parts.
        for x in [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0x7FFF_FFFF),
        ] {
            let p = split3(x);
            let mid = f32::from_bits((p[1] as u32) << 16);
            assert!(mid.is_nan(), "{x} -> {p:?}");
        }
    }

    /// [`avx512::split_pairs`]'s parts, one value at a time: each part the top 16 bits of
    /// what the earlier parts left.
    fn truncated_parts(x: f32) -> [u16; 3] {
        let mut rest = x;
        [0; 3].map(|_| {
            let top = rest.to_bits() & HIGH;
            rest -= f32::from_bits(top);
            (top >> 16) as u16
        })
    }

    /// The packed pairs of softmax numerators ([`avx512::split_pairs`]) hold exactly the
    /// truncated parts of each value, which add up to it exactly, for values in [0, 1] (down
    /// to where bf16 parts become denormal, which the tile unit flushes anyway: below that,
    /// and for denormal inputs, parts may be lost, an absolute error under 1e-30), and NaN
    /// stays NaN.
    #[test]
    fn numerator_pairs_match_scalar_split() {
        if !(std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16"))
        {
            return;
        }
        use std::arch::x86_64::*;
        let mut xs: Vec<f32> = vec![0.0, 1.0, 0.5, 1.0 - f32::EPSILON / 2.0, 1e-30, 3.3e-7];
        let mut seed = 5u64;
        while xs.len() < 32 * 4096 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (seed >> 40) as f32 / (1u64 << 24) as f32;
            // Uniform in [0, 1), and spread over exponents down to where parts stay normal.
            let x = if seed & 1 == 0 {
                u
            } else {
                u.powi(1 + (seed >> 8) as i32 % 8) * 1e-20
            };
            if x == 0.0 || x > 1e-30 {
                xs.push(x);
            }
        }
        for chunk in xs.chunks(32) {
            let mut out = [[0u32; 16]; 3];
            // SAFETY: AVX-512BW and AVX512-BF16 detected above.
            unsafe {
                let pe = _mm512_loadu_ps(chunk.as_ptr());
                let po = _mm512_loadu_ps(chunk.as_ptr().add(16));
                for (o, p) in out.iter_mut().zip(avx512::split_pairs(pe, po)) {
                    _mm512_storeu_si512(o.as_mut_ptr().cast(), p);
                }
            }
            for q in 0..16 {
                for (half, &x) in [chunk[q], chunk[16 + q]].iter().enumerate() {
                    let got: Vec<u16> = out.iter().map(|o| (o[q] >> (16 * half)) as u16).collect();
                    let want = truncated_parts(x);
                    assert_eq!(got, want, "{x:e}");
                    let sum: f64 = want
                        .iter()
                        .map(|&w| f32::from_bits((w as u32) << 16) as f64)
                        .sum();
                    assert!(
                        sum == x as f64 || x < 1e-30,
                        "{x:e}: parts add up to {sum:e}"
                    );
                    // The dropped products' bound: mid < 2⁻⁷·x, lo < 2⁻¹⁵·x.
                    let part = |i: usize| f32::from_bits((want[i] as u32) << 16) as f64;
                    assert!(part(1) < x as f64 / 128.0 || x == 0.0, "{x:e}");
                    assert!(part(2) < x as f64 / 32768.0 || x == 0.0, "{x:e}");
                }
            }
        }
        // SAFETY: as above.
        let nan = unsafe {
            let p = avx512::split_pairs(_mm512_set1_ps(f32::NAN), _mm512_set1_ps(0.25));
            let mut w = [0u32; 16];
            _mm512_storeu_si512(w.as_mut_ptr().cast(), p[1]);
            w[0]
        };
        assert!(f32::from_bits(nan << 16).is_nan());
    }

    #[test]
    fn vector_split_matches_scalar() {
        if !std::is_x86_feature_detected!("avx512bw") {
            return;
        }
        use std::arch::x86_64::*;
        let mut xs: Vec<f32> = vec![
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
            f32::MAX,
            3.3961e38,
            -0.0,
            1e-39,
            f32::from_bits(0x7FFF_FFFF),
            f32::from_bits(0x7F80_0001),
        ];
        let mut seed = 99u64;
        while xs.len() < 16 * 4096 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            xs.push(f32::from_bits((seed >> 32) as u32));
        }
        for chunk in xs.chunks(16) {
            let mut out = [[0u32; 16]; 3];
            // SAFETY: AVX-512BW detected above.
            unsafe {
                let parts = avx512::split::<true>(_mm512_loadu_ps(chunk.as_ptr()));
                for (o, p) in out.iter_mut().zip(parts) {
                    _mm512_storeu_si512(o.as_mut_ptr().cast(), p);
                }
            }
            for (i, &x) in chunk.iter().enumerate() {
                let want = split3(x);
                let got = [out[0][i], out[1][i], out[2][i]].map(|b| (b >> 16) as u16);
                // NaN payloads may differ; NaN-ness must not.
                for (g, w) in got.iter().zip(want) {
                    let (g, w) = (
                        f32::from_bits((*g as u32) << 16),
                        f32::from_bits((w as u32) << 16),
                    );
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{x:e}: {got:?} vs {want:?}"
                    );
                }
                assert!(out.iter().all(|o| o[i] & 0xFFFF == 0));
            }
        }
    }

    /// One key block's softmax on the AMX path against a scalar statement of it, for several
    /// column tiles (each tile's maxima are taken during the previous tile's exponentials),
    /// odd key counts, masked (−∞) scores, columns with no key seen yet and columns whose max
    /// moves or stays: the running max exactly, the sum and the rescaled output to fp32
    /// accuracy, and the packed numerators (zero past the block's keys).
    #[test]
    fn block_softmax_matches_scalar() {
        if !super::super::amx::supported() {
            return;
        }
        let mut seed = 77u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        for (keys, nt) in [(1usize, 1usize), (31, 3), (77, 2), (128, 4)] {
            let (kc, ld, dv) = (keys.div_ceil(32), 16 * nt + 16, 5);
            let mut st = vec![0.0f32; keys * ld];
            for (i, x) in st.iter_mut().enumerate() {
                *x = if (i * 7) % 13 == 0 {
                    f32::NEG_INFINITY
                } else {
                    rnd() * 20.0 - 10.0
                };
            }
            // Per column: no key yet, a max above every score, or one some scores pass.
            let m0: Vec<f32> = (0..ld)
                .map(|c| match c % 3 {
                    0 => f32::NEG_INFINITY,
                    1 => 20.0,
                    _ => rnd() * 10.0 - 5.0,
                })
                .collect();
            let l0: Vec<f32> = (0..ld)
                .map(|c| if c % 3 == 0 { 0.0 } else { 1.5 })
                .collect();
            let ot0: Vec<f32> = (0..dv * ld).map(|_| rnd() - 0.5).collect();
            let (mut m, mut l, mut ot) = (m0.clone(), l0.clone(), ot0.clone());
            let mut pack = BPack::new(3, kc, nt);
            // SAFETY: AMX implies AVX-512F/BW/DQ and AVX512-BF16.
            unsafe {
                softmax_pack_p::<true>(
                    &mut pack,
                    &st,
                    ld,
                    keys,
                    kc,
                    &mut m,
                    &mut l,
                    &mut ot,
                    dv,
                    [&[], &[]],
                )
                .unwrap();
            }
            let word = |part: usize, k: usize, col: usize| {
                let (c, r, t) = (k / 32, (k % 32) / 2, col / 16);
                let tile = (part * kc + c) * nt + t;
                let w = pack.buf[tile * TILE_WORDS + 32 * r + 2 * (col % 16) + k % 2];
                f32::from_bits((w as u32) << 16) as f64
            };
            for col in 0..16 * nt {
                let block_max = (0..keys)
                    .map(|k| st[k * ld + col])
                    .fold(f32::NEG_INFINITY, f32::max);
                let m_new = m0[col].max(block_max);
                assert_eq!(m[col], m_new, "keys {keys} column {col}: running max");
                let reference = if m_new == f32::NEG_INFINITY {
                    0.0
                } else {
                    m_new as f64
                };
                let alpha = if m0[col] == f32::NEG_INFINITY {
                    0.0
                } else {
                    (m0[col] as f64 - reference).exp2()
                };
                let mut sum = 0.0;
                for k in 0..32 * kc {
                    let got: f64 = (0..3).map(|part| word(part, k, col)).sum();
                    let want = if k < keys {
                        (st[k * ld + col] as f64 - reference).exp2()
                    } else {
                        0.0
                    };
                    sum += want;
                    assert!(
                        (got - want).abs() <= 1e-6 * want,
                        "keys {keys} column {col} key {k}: {got} vs {want}"
                    );
                }
                let want_l = l0[col] as f64 * alpha + sum;
                assert!((l[col] as f64 - want_l).abs() <= 1e-6 * want_l.max(1e-30));
                for e in 0..dv {
                    let want = ot0[e * ld + col] as f64 * alpha;
                    let got = ot[e * ld + col] as f64;
                    assert!((got - want).abs() <= 1e-6, "output row {e} column {col}");
                }
            }
        }
    }
}
