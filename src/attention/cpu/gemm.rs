//! f32 GEMMs for attention tiles: `C (m×n) (+)= A (m×k) · B (k×n)`, A read through arbitrary
//! row/k strides (so K and the transposed P are used in place), B with unit column stride.
//! Register-blocked AVX-512 micro-kernels of our own where the CPU has AVX-512 (they take the
//! score block's column maxima and the output rescale in registers); elsewhere the `gemm`
//! crate's micro-kernels (AVX2+FMA, NEON), 5× the auto-vectorized loops they replaced on the
//! AVX2 path (1 thread, S = 1024 and 4096: 9.4 and 10.4 → 50.3 and 49.5 GFLOP/s).

use crate::{Error, Result};

/// Instruction set the kernel runs with, detected once per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 with both attention products on AMX tiles (fp32 through split bf16).
    Amx,
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best instruction set here: AMX unless the environment sets `FLASH_ORT_CPU_NO_AMX=1`
    /// (read once per process), then the widest vector set.
    pub fn detect() -> Isa {
        static NO_AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let no_amx = *NO_AMX
            .get_or_init(|| std::env::var_os("FLASH_ORT_CPU_NO_AMX").is_some_and(|v| v == "1"));
        let vector = Isa::detect_vector();
        #[cfg(target_arch = "x86_64")]
        if vector == Isa::Avx512 && !no_amx && super::amx::supported() {
            return Isa::Amx;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = no_amx;
        vector
    }

    /// The widest vector instruction set here, ignoring AMX.
    pub fn detect_vector() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            // The task bodies are compiled with F16C too (fp16 tile conversion); the AVX-512
            // exponential uses AVX-512DQ's `vreduceps` (every AVX-512 Xeon has DQ).
            let avx2 = std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c");
            if avx2
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512dq")
            {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// A read-only matrix operand: element (r, k) is `data[off + r * rs + k * ks]`.
#[derive(Clone, Copy)]
pub struct MatA<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub ks: usize,
}

/// A read-only matrix operand with unit column stride: element (k, c) is `data[off + k * ld + c]`.
#[derive(Clone, Copy)]
pub struct MatB<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub ld: usize,
}

/// Lines to pull into L2 while a GEMM runs (the next operand block, cold in L3 otherwise):
/// `rows` rows of `len` floats from `off`, `rs` apart in `data`. The prefetches are spread
/// over the GEMM's register tiles, a few per tile, so that they overlap the arithmetic instead
/// of filling the miss queues at once.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 paths only
pub struct Prefetch<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rows: usize,
    pub rs: usize,
    pub len: usize,
}

fn internal(what: &str) -> Error {
    Error::Other(format!(
        "internal error in the CPU attention kernel: {what}"
    ))
}

/// What C starts from.
#[derive(Clone, Copy)]
pub enum Init<'a> {
    /// `C = A·B`.
    Zero,
    /// `C = C + A·B`.
    Add,
    /// `C = diag(s)·C + A·B`: the FlashAttention rescale of the output accumulator by each
    /// row's `alpha`, folded into the load of C.
    Scaled(&'a [f32]),
}

/// `C[r*ldc + c] = init + Σ_k A(r, k) · B(k, c)` for `r < m`, `c < n`; with `col_max`, also
/// `col_max[c] = max(col_max[c], max_r C[r][c])` (the block's score maximum, taken while the
/// tile is still in registers). Checks every extent against the slices first, so the unsafe
/// kernels below never read or write out of bounds.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: MatA,
    b: MatB,
    c: &mut [f32],
    ldc: usize,
    init: Init,
    col_max: Option<&mut [f32]>,
    pf: Option<Prefetch>,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if (m - 1) * ldc + n > c.len() || (m > 1 && n > ldc) {
        return Err(internal("gemm output tile out of bounds"));
    }
    if let Init::Scaled(s) = init {
        if s.len() < m {
            return Err(internal("gemm row scale too short"));
        }
    }
    if col_max.as_ref().is_some_and(|cm| cm.len() < n) {
        return Err(internal("gemm column maximum too short"));
    }
    if k > 0 && a.off + (m - 1) * a.rs + (k - 1) * a.ks >= a.data.len() {
        return Err(internal("gemm operand A out of bounds"));
    }
    if k > 0 && b.off + (k - 1) * b.ld + n > b.data.len() {
        return Err(internal("gemm operand B out of bounds"));
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if k > 0 => {
            // SAFETY: the CPU supports AVX-512F (detected); extents were checked above.
            unsafe { avx512::gemm(m, n, k, a, b, c, ldc, init, col_max, pf) }
        }
        _ => {
            // Prefetch hints are for our AVX-512 kernels only.
            let _ = pf;
            gemm_crate(m, n, k, a, b, c, ldc, init, col_max)
        }
    }
    Ok(())
}

/// The extents of `C = A·Bᵀ` (`m × n × k`, `m` and `n` non-zero; see [`gemm_nt`]) against the
/// slices: a row of C fits its stride and C its slice, and (for `k > 0`) the last element of
/// each operand along every dimension is in bounds. Shared by [`gemm_nt`] and the few-rows path's own AVX-512 score kernel.
#[allow(clippy::too_many_arguments)]
pub fn check_nt(
    m: usize,
    n: usize,
    k: usize,
    a: MatA,
    b: MatA,
    c_len: usize,
    ldc: usize,
) -> Result<()> {
    if (m - 1) * ldc + n > c_len || n > ldc {
        return Err(internal("gemm_nt output out of bounds"));
    }
    if k == 0 {
        return Ok(());
    }
    if a.off + (m - 1) * a.rs + (k - 1) * a.ks >= a.data.len() {
        return Err(internal("gemm_nt operand A out of bounds"));
    }
    if b.off + (n - 1) * b.rs + (k - 1) * b.ks >= b.data.len() {
        return Err(internal("gemm_nt operand B out of bounds"));
    }
    Ok(())
}

/// `C = A·Bᵀ` (`m × n`, row stride `ldc`) with B given by its rows: element (c, kk) of B is
/// `b.data[b.off + c·b.rs + kk·b.ks]` (K in place, whatever its strides). On the `gemm`
/// crate's micro-kernels, which pack B as they go. Checks every extent first.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt(
    m: usize,
    n: usize,
    k: usize,
    a: MatA,
    b: MatA,
    c: &mut [f32],
    ldc: usize,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    check_nt(m, n, k, a, b, c.len(), ldc)?;
    if k == 0 {
        (0..m).for_each(|r| c[r * ldc..r * ldc + n].fill(0.0));
        return Ok(());
    }
    // SAFETY: extents checked above; all strides are non-negative.
    unsafe { crate_gemm(m, n, k, c, ldc, false, a, (b.data, b.off, b.ks, b.rs)) };
    Ok(())
}

/// `C (+)= A·B` on the `gemm` crate: element (kk, c) of B at `b[b_off + kk·b_rs + c·b_cs]`,
/// C row-major with stride `ldc`; `accumulate` adds to C instead of overwriting it.
///
/// # Safety
/// `m, n, k > 0`, and every element the strides reach lies inside the slices.
#[allow(clippy::too_many_arguments)]
unsafe fn crate_gemm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: MatA,
    (b, b_off, b_rs, b_cs): (&[f32], usize, usize, usize),
) {
    ::gemm::gemm(
        m,
        n,
        k,
        c.as_mut_ptr(),
        1,
        ldc as isize,
        accumulate,
        a.data.as_ptr().add(a.off),
        a.ks as isize,
        a.rs as isize,
        b.as_ptr().add(b_off),
        b_cs as isize,
        b_rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        ::gemm::Parallelism::None,
    )
}

/// Every instruction set but AVX-512: the `gemm` crate's micro-kernels (AVX2+FMA on x86-64,
/// NEON on aarch64, chosen at run time), with the row rescale applied to C before and the
/// column maxima taken after. The extents were checked by [`gemm`].
#[allow(clippy::too_many_arguments)]
fn gemm_crate(
    m: usize,
    n: usize,
    k: usize,
    a: MatA,
    b: MatB,
    c: &mut [f32],
    ldc: usize,
    init: Init,
    col_max: Option<&mut [f32]>,
) {
    if let Init::Scaled(s) = init {
        for (r, &sr) in s.iter().enumerate().take(m) {
            c[r * ldc..r * ldc + n].iter_mut().for_each(|x| *x *= sr);
        }
    }
    if k == 0 {
        if let Init::Zero = init {
            (0..m).for_each(|r| c[r * ldc..r * ldc + n].fill(0.0));
        }
    } else {
        let accumulate = !matches!(init, Init::Zero);
        // SAFETY: every element read or written lies inside the slices (checked by `gemm`:
        // the last row/column of each operand is in bounds and all strides are positive).
        unsafe { crate_gemm(m, n, k, c, ldc, accumulate, a, (b.data, b.off, b.ld, 1)) }
    }
    if let Some(cm) = col_max {
        for r in 0..m {
            for (x, &v) in cm.iter_mut().zip(&c[r * ldc..r * ldc + n]) {
                *x = if v > *x { v } else { *x };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512 micro-kernels: MR rows × NV vectors of 16 columns held in zmm registers, B rows
    //! loaded with a lane mask on the last vector (masked loads do not fault, so no padding is
    //! needed), A elements broadcast. MR ≤ 6 and NV ≤ 4 keep 24 accumulators + 4 B vectors +
    //! 1 broadcast within the 32 registers.
    use super::{Init, MatA, MatB, Prefetch};
    use std::arch::x86_64::*;

    pub const MR: usize = 6;
    pub const NV: usize = 4;

    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: MatA,
        b: MatB,
        c: &mut [f32],
        ldc: usize,
        init: Init,
        col_max: Option<&mut [f32]>,
        pf: Option<Prefetch>,
    ) {
        // Prefetch stream: cache lines per row, total lines, lines issued per register tile.
        let (pf_row_lines, pf_lines, pf_per_tile) = match pf {
            Some(p) if p.rows > 0 && p.len > 0 => {
                let row_lines = p.len.div_ceil(16);
                let lines = p.rows * row_lines;
                let tiles = m.div_ceil(MR) * n.div_ceil(16 * NV);
                (row_lines, lines, lines.div_ceil(tiles))
            }
            _ => (1, 0, 0),
        };
        let mut pf_next = 0;
        let (load_c, scale) = match init {
            Init::Zero => (false, std::ptr::null()),
            Init::Add => (true, std::ptr::null()),
            Init::Scaled(s) => (true, s.as_ptr()),
        };
        let cmax = col_max.map_or(std::ptr::null_mut(), |x| x.as_mut_ptr());
        let ap = a.data.as_ptr().add(a.off);
        let bp = b.data.as_ptr().add(b.off);
        let cp = c.as_mut_ptr();
        // Column panels outer: one panel of B (k × 64 floats, 16 KiB for k = 64) stays in L1
        // while every row tile of A streams past it.
        let mut c0 = 0;
        while c0 < n {
            let cols = (16 * NV).min(n - c0);
            let nv = cols.div_ceil(16);
            let tail = cols - 16 * (nv - 1);
            let last: __mmask16 = if tail == 16 {
                0xFFFF
            } else {
                (1u16 << tail) - 1
            };
            let mut r0 = 0;
            while r0 < m {
                let mr = MR.min(m - r0);
                let t = Tile {
                    k,
                    a: ap.add(r0 * a.rs),
                    a_rs: a.rs,
                    a_ks: a.ks,
                    b: bp.add(c0),
                    ldb: b.ld,
                    c: cp.add(r0 * ldc + c0),
                    ldc,
                    last,
                    load_c,
                    scale: if scale.is_null() {
                        scale
                    } else {
                        scale.add(r0)
                    },
                    col_max: if cmax.is_null() { cmax } else { cmax.add(c0) },
                };
                dispatch(mr, nv, &t);
                if let Some(p) = pf {
                    for _ in 0..pf_per_tile.min(pf_lines - pf_next) {
                        let (row, line) = (pf_next / pf_row_lines, pf_next % pf_row_lines);
                        let at = p.off + row * p.rs + 16 * line;
                        if at < p.data.len() {
                            // SAFETY: in bounds (a hint anyway: prefetches never fault).
                            _mm_prefetch::<_MM_HINT_T1>(p.data.as_ptr().add(at) as *const i8);
                        }
                        pf_next += 1;
                    }
                }
                r0 += mr;
            }
            c0 += cols;
        }
    }

    pub struct Tile {
        k: usize,
        a: *const f32,
        a_rs: usize,
        a_ks: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        last: __mmask16,
        /// Whether C's old value is added (C += A·B) rather than overwritten.
        load_c: bool,
        /// Per-row factors for C's old value, or null for 1.
        scale: *const f32,
        /// Running column maxima to update, or null.
        col_max: *mut f32,
    }

    macro_rules! dispatch_table {
        ($mr:expr, $nv:expr, $t:expr; $(($m:literal, $v:literal)),*) => {
            match ($mr, $nv) {
                $(($m, $v) => kernel::<$m, $v>($t),)*
                _ => {}
            }
        };
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn dispatch(mr: usize, nv: usize, t: &Tile) {
        dispatch_table!(mr, nv, t;
            (1, 1), (1, 2), (1, 3), (1, 4),
            (2, 1), (2, 2), (2, 3), (2, 4),
            (3, 1), (3, 2), (3, 3), (3, 4),
            (4, 1), (4, 2), (4, 3), (4, 4),
            (5, 1), (5, 2), (5, 3), (5, 4),
            (6, 1), (6, 2), (6, 3), (6, 4))
    }

    /// One register tile. Lanes beyond the last column are neither loaded nor stored.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn kernel<const R: usize, const V: usize>(t: &Tile) {
        let mask = |v: usize| if v + 1 == V { t.last } else { 0xFFFF };
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        if t.load_c {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                for (v, x) in acc_r.iter_mut().enumerate() {
                    *x = _mm512_maskz_loadu_ps(mask(v), t.c.add(r * t.ldc + 16 * v));
                }
                if !t.scale.is_null() {
                    let s = _mm512_set1_ps(*t.scale.add(r));
                    for x in acc_r.iter_mut() {
                        *x = _mm512_mul_ps(*x, s);
                    }
                }
            }
        }
        let mut a = t.a;
        let mut b = t.b;
        for _ in 0..t.k {
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_maskz_loadu_ps(mask(v), b.add(16 * v));
            }
            for acc_r in acc.iter_mut().take(R).enumerate() {
                let (r, acc_r) = acc_r;
                let av = _mm512_set1_ps(*a.add(r * t.a_rs));
                for v in 0..V {
                    acc_r[v] = _mm512_fmadd_ps(av, bv[v], acc_r[v]);
                }
            }
            a = a.add(t.a_ks);
            b = b.add(t.ldb);
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, x) in acc_r.iter().enumerate() {
                _mm512_mask_storeu_ps(t.c.add(r * t.ldc + 16 * v), mask(v), *x);
            }
        }
        if !t.col_max.is_null() {
            for v in 0..V {
                let p = t.col_max.add(16 * v);
                let mut m = _mm512_maskz_loadu_ps(mask(v), p);
                for acc_r in &acc {
                    m = _mm512_max_ps(m, acc_r[v]);
                }
                _mm512_mask_storeu_ps(p, mask(v), m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: MatA, b: MatB, c: &mut [f32], ldc: usize) {
        for r in 0..m {
            for col in 0..n {
                let mut s = 0.0f64;
                for kk in 0..k {
                    s += a.data[a.off + r * a.rs + kk * a.ks] as f64
                        * b.data[b.off + kk * b.ld + col] as f64;
                }
                c[r * ldc + col] += s as f32;
            }
        }
    }

    #[test]
    fn every_isa_matches_naive_on_odd_shapes() {
        let isas = [Isa::detect_vector(), Isa::Avx2, Isa::Portable];
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 5),
            (13, 70, 33),
            (6, 64, 64),
            (64, 80, 3),
        ] {
            let a: Vec<f32> = (0..m * k * 2 + 3)
                .map(|x| ((x * 7 % 13) as f32) - 6.0)
                .collect();
            let b: Vec<f32> = (0..k * (n + 5) + 1)
                .map(|x| ((x * 5 % 11) as f32) * 0.5)
                .collect();
            // A transposed in memory: element (r, kk) at 1 + kk * (m + 1) + r.
            let ma = MatA {
                data: &a,
                off: 1,
                rs: 1,
                ks: m + 1,
            };
            let mb = MatB {
                data: &b,
                off: 1,
                ld: n + 5,
            };
            let ldc = n + 3;
            let mut want = vec![1.0f32; m * ldc];
            naive(m, n, k, ma, mb, &mut want, ldc);
            let ones = vec![1.0f32; m];
            let halves = vec![0.5f32; m];
            for isa in isas {
                let mut c = vec![1.0f32; m * ldc];
                gemm(
                    isa,
                    m,
                    n,
                    k,
                    ma,
                    mb,
                    &mut c,
                    ldc,
                    Init::Scaled(&ones),
                    None,
                    None,
                )
                .unwrap();
                assert_eq!(c, want, "{isa:?} {m}x{n}x{k}");
                let mut c = vec![1.0f32; m * ldc];
                gemm(isa, m, n, k, ma, mb, &mut c, ldc, Init::Add, None, None).unwrap();
                assert_eq!(c, want, "{isa:?} {m}x{n}x{k} add");
                let mut c = vec![2.0f32; m * ldc];
                gemm(
                    isa,
                    m,
                    n,
                    k,
                    ma,
                    mb,
                    &mut c,
                    ldc,
                    Init::Scaled(&halves),
                    None,
                    None,
                )
                .unwrap();
                for r in 0..m {
                    for col in 0..n {
                        assert_eq!(c[r * ldc + col], want[r * ldc + col]);
                    }
                }
                let mut c2 = vec![7.0f32; m * ldc];
                let mut cm = vec![f32::NEG_INFINITY; n + 1];
                gemm(
                    isa,
                    m,
                    n,
                    k,
                    ma,
                    mb,
                    &mut c2,
                    ldc,
                    Init::Zero,
                    Some(&mut cm),
                    None,
                )
                .unwrap();
                for r in 0..m {
                    for col in 0..n {
                        assert_eq!(c2[r * ldc + col] + 1.0, want[r * ldc + col]);
                    }
                    for col in n..ldc {
                        assert_eq!(c2[r * ldc + col], 7.0, "lanes past n untouched");
                    }
                }
                for col in 0..n {
                    let mx = (0..m)
                        .map(|r| c2[r * ldc + col])
                        .fold(f32::NEG_INFINITY, f32::max);
                    assert_eq!(cm[col], mx, "{isa:?} column max {col}");
                }
                assert_eq!(cm[n], f32::NEG_INFINITY);
            }
        }
    }

    #[test]
    fn out_of_bounds_operands_are_errors() {
        let a = vec![0.0f32; 4];
        let b = vec![0.0f32; 4];
        let mut c = vec![0.0f32; 4];
        let ma = MatA {
            data: &a,
            off: 0,
            rs: 2,
            ks: 1,
        };
        let mb = MatB {
            data: &b,
            off: 0,
            ld: 2,
        };
        let z = Init::Zero;
        assert!(gemm(Isa::detect(), 2, 2, 2, ma, mb, &mut c, 2, z, None, None).is_ok());
        assert!(gemm(Isa::detect(), 3, 2, 2, ma, mb, &mut c, 2, z, None, None).is_err());
        assert!(gemm(Isa::detect(), 2, 2, 3, ma, mb, &mut c, 2, z, None, None).is_err());
        let short = [1.0f32];
        assert!(gemm(
            Isa::detect(),
            2,
            2,
            2,
            ma,
            mb,
            &mut c,
            2,
            Init::Scaled(&short),
            None,
            None
        )
        .is_err());
    }
}
