//! Intel AMX for the fp32 attention GEMMs: detection, tile configuration and a bf16 tile GEMM
//! over operands split into bf16 parts ([`super::split`]).
//!
//! Stable Rust has no AMX intrinsics, so the tile instructions are `asm!` blocks. The tile
//! registers are invisible to the compiler (it never uses them), and each block is a separate
//! volatile statement, so the order written here is the order executed. Every tile is
//! configured as 16 rows × 64 bytes: operands are zero-padded to whole tiles, so one
//! configuration serves every shape.

use super::split::{APack, BPack};
use crate::{Error, Result};
use std::arch::asm;
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
use std::sync::OnceLock;

/// Elements (u16) in one packed tile: 16 rows of 64 bytes.
pub const TILE_WORDS: usize = 512;

/// Whether this process can run AMX-BF16 tile instructions: the CPU reports AMX-TILE and
/// AMX-BF16, and Linux granted the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`, process-wide). Asked once; any failure means no.
pub fn supported() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx() && request_permission())
}

fn cpu_has_amx() -> bool {
    // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE; the packing also needs
    // AVX-512BW and AVX512-BF16 (every AMX CPU has both).
    if std::arch::x86_64::__cpuid(0).eax < 7 {
        return false;
    }
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    leaf7.edx & (1 << 22) != 0
        && leaf7.edx & (1 << 24) != 0
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512bf16")
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it only changes which XSAVE features
    // the kernel lets this process use.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// The tiles of the current thread, configured (8 tiles of 16 rows × 64 bytes) for as long as
/// this guard lives; dropping it releases them (`tilerelease`), so the thread leaves no tile
/// state behind for whatever ORT runs on it next. Tile state is per thread: each task makes
/// its own guard.
pub struct Tiles(());

impl Tiles {
    /// # Safety
    /// [`supported`] must have returned true.
    pub unsafe fn configure() -> Tiles {
        #[repr(C, align(64))]
        struct Config([u8; 64]);
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1; // palette 1
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64; // bytes per row (u16 little-endian)
            cfg.0[48 + t] = 16; // rows
        }
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a `Tiles` exists only after `configure`, i.e. on an AMX-capable thread.
        unsafe { asm!("tilerelease", options(nostack, nomem)) }
    }
}

macro_rules! tile_op {
    ($name:ident, $($t:literal),*) => {
        /// Loads tile `t` from 16 rows of 64 bytes, 64 bytes apart.
        #[inline(always)]
        unsafe fn $name(t: usize, p: *const u16) {
            match t {
                $($t => asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"),
                    p = in(reg) p, s = in(reg) 64usize, options(nostack, readonly)),)*
                _ => {}
            }
        }
    };
}
tile_op!(load, 0, 1, 2, 3, 4, 5, 6, 7);

/// Stores accumulator tile `t` (0..4) as 16 rows of 16 f32, `stride` bytes apart.
#[inline(always)]
unsafe fn store(t: usize, p: *mut f32, stride: usize) {
    macro_rules! st {
        ($($t:literal),*) => {
            match t {
                $($t => asm!(concat!("tilestored [{p} + {s}*1], tmm", $t),
                    p = in(reg) p, s = in(reg) stride, options(nostack)),)*
                _ => {}
            }
        };
    }
    st!(0, 1, 2, 3)
}

/// Loads accumulator tile `t` (0..4) from 16 rows of 16 f32, `stride` bytes apart.
#[inline(always)]
unsafe fn load_acc(t: usize, p: *const f32, stride: usize) {
    macro_rules! ld {
        ($($t:literal),*) => {
            match t {
                $($t => asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"),
                    p = in(reg) p, s = in(reg) stride, options(nostack, readonly)),)*
                _ => {}
            }
        };
    }
    ld!(0, 1, 2, 3)
}

#[inline(always)]
unsafe fn zero(t: usize) {
    match t {
        0 => asm!("tilezero tmm0", options(nostack, nomem)),
        1 => asm!("tilezero tmm1", options(nostack, nomem)),
        2 => asm!("tilezero tmm2", options(nostack, nomem)),
        _ => asm!("tilezero tmm3", options(nostack, nomem)),
    }
}

/// `C[mi][ni] += A[mi] · B[ni]`: accumulator `2·mi + ni`, A in tile `4 + mi`, B in `6 + ni`.
#[inline(always)]
unsafe fn dot(mi: usize, ni: usize) {
    match (mi, ni) {
        (0, 0) => asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem)),
        (0, 1) => asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem)),
        (1, 0) => asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem)),
        _ => asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem)),
    }
}

/// TSC cycles one bf16 tile product takes on this core now: the fastest of 20 register-only
/// bursts of 64 independent-enough products (4 accumulators), or `None` without AMX. About 16
/// at full rate on Sapphire Rapids; on a shared host, another tenant's tile work on the
/// sibling hyperthread halves the rate (about 31), which the bench reports so that its
/// figures can be read against the state of the machine.
pub fn tile_product_cycles() -> Option<f64> {
    if !supported() {
        return None;
    }
    use std::arch::x86_64::{__rdtscp, _mm_lfence, _rdtsc};
    // SAFETY: AMX is supported (checked above); the tiles hold zeros after configuration.
    unsafe {
        let _tiles = Tiles::configure();
        let mut sink = [0.0f32; 256];
        let mut best = u64::MAX;
        for _ in 0..20 {
            let mut aux = 0u32;
            _mm_lfence();
            let t0 = _rdtsc();
            for _ in 0..16 {
                dot(0, 0);
                dot(0, 1);
                dot(1, 0);
                dot(1, 1);
            }
            // The store waits for the last product into its accumulator.
            store(3, sink.as_mut_ptr(), 64);
            best = best.min(__rdtscp(&mut aux) - t0);
        }
        std::hint::black_box(&sink);
        Some(best as f64 / 64.0)
    }
}

/// The part products `(A part, B part)` a GEMM sums: every pair whose parts' orders add up to
/// at most 2 (hi·hi, hi·mid, mid·hi, hi·lo, lo·hi, mid·mid for 3 × 3 parts; the dropped ones
/// are below 2⁻²² relative), small ones first so they accumulate before the large ones, in an
/// order where consecutive products share one operand (14 tile loads per 2 × 2 block and
/// 32-wide k step instead of 24). A fixed array and a count, so that the GEMM, called twice
/// per key block, does not allocate.
pub fn products(a_parts: usize, b_parts: usize) -> ([(usize, usize); 6], usize) {
    let mut out = [(0, 0); 6];
    let mut n = 0;
    for (i, j) in [(2, 0), (1, 0), (1, 1), (0, 1), (0, 2), (0, 0)] {
        if i < a_parts && j < b_parts {
            out[n] = (i, j);
            n += 1;
        }
    }
    (out, n)
}

fn internal(what: &str) -> Error {
    Error::Other(format!(
        "internal error in the CPU attention kernel (AMX): {what}"
    ))
}

/// `C (+)= Σ A_i · B_j` over [`products`], for the first `mt` row tiles of `a`, the first `kc`
/// 32-wide k chunks of both and every column tile of `b`: C is `16·mt × 16·b.nt` f32 with row
/// stride `ldc`, overwritten when `zero`, accumulated into otherwise.
///
/// # Safety
/// The thread's tiles must be configured ([`Tiles::configure`]). Extents are checked.
pub unsafe fn gemm(
    a: &APack,
    mt: usize,
    b: &BPack,
    kc: usize,
    c: &mut [f32],
    ldc: usize,
    zero_c: bool,
) -> Result<()> {
    let nt = b.nt;
    if mt == 0 || nt == 0 {
        return Ok(());
    }
    if mt > a.mt || kc > a.kc || kc > b.kc || a.words() > a.buf.len() || b.words() > b.buf.len() {
        return Err(internal("operand tiles out of range"));
    }
    if ldc < 16 * nt || (16 * mt - 1) * ldc + 16 * nt > c.len() {
        return Err(internal("output tile out of bounds"));
    }
    let (prods, np) = products(a.parts, b.parts);
    let t = Gemm {
        a: a.buf.as_ptr(),
        a_part: a.mt * a.kc * TILE_WORDS,
        a_m: a.kc * TILE_WORDS,
        b: b.buf.as_ptr(),
        b_part: b.kc * nt * TILE_WORDS,
        b_chunk: nt * TILE_WORDS,
        kc,
        ldc,
        zero: zero_c,
        prods: &prods[..np],
    };
    let cp = c.as_mut_ptr();
    // Column pairs outer: the pair's B tiles (12 KiB at D = 64) stay in L1 while every row
    // pair of A passes.
    let mut n0 = 0;
    while n0 < nt {
        let nb = (nt - n0).min(2);
        let mut m0 = 0;
        while m0 < mt {
            let mb = (mt - m0).min(2);
            let cblk = cp.add(16 * (m0 * ldc + n0));
            match (mb, nb) {
                (2, 2) => t.block::<2, 2>(m0, n0, cblk),
                (2, _) => t.block::<2, 1>(m0, n0, cblk),
                (_, 2) => t.block::<1, 2>(m0, n0, cblk),
                _ => t.block::<1, 1>(m0, n0, cblk),
            }
            m0 += mb;
        }
        n0 += nb;
    }
    Ok(())
}

/// One GEMM call's operands: tile `(part p, row tile m, chunk c)` of A at
/// `a + p·a_part + m·a_m + c·512`, tile `(p, c, column tile n)` of B at
/// `b + p·b_part + c·b_chunk + n·512`.
struct Gemm<'a> {
    a: *const u16,
    a_part: usize,
    a_m: usize,
    b: *const u16,
    b_part: usize,
    b_chunk: usize,
    kc: usize,
    ldc: usize,
    zero: bool,
    prods: &'a [(usize, usize)],
}

impl Gemm<'_> {
    /// An `MB × NB` block of 16 × 16 accumulators held in tiles over the whole k range.
    #[inline(always)]
    unsafe fn block<const MB: usize, const NB: usize>(&self, m0: usize, n0: usize, c: *mut f32) {
        let stride = 4 * self.ldc;
        let at = |mi: usize, ni: usize| c.add(16 * (mi * self.ldc + ni));
        if self.zero {
            // The block's C lines, wanted for writing at its end, come towards L1 while the
            // products run: a tile store that misses waits for each line (C is the score
            // block, 139 KiB at 128 × 256, so in L2). 4–7 % fewer cycles per product on the
            // kernel's K·Qᵀ shape; prefetching where C is read first (accumulating) was slower.
            for r in 0..16 * MB {
                for ni in 0..NB {
                    _mm_prefetch::<_MM_HINT_ET0>(c.add(r * self.ldc + 16 * ni).cast());
                }
            }
        }
        for mi in 0..MB {
            for ni in 0..NB {
                if self.zero {
                    zero(2 * mi + ni);
                } else {
                    load_acc(2 * mi + ni, at(mi, ni), stride);
                }
            }
        }
        for kc in 0..self.kc {
            let (mut cur_a, mut cur_b) = (usize::MAX, usize::MAX);
            for &(pa, pb) in self.prods {
                if pa != cur_a {
                    for mi in 0..MB {
                        let off = pa * self.a_part + (m0 + mi) * self.a_m + kc * TILE_WORDS;
                        load(4 + mi, self.a.add(off));
                    }
                    cur_a = pa;
                }
                if pb != cur_b {
                    for ni in 0..NB {
                        let off = pb * self.b_part + kc * self.b_chunk + (n0 + ni) * TILE_WORDS;
                        load(6 + ni, self.b.add(off));
                    }
                    cur_b = pb;
                }
                for mi in 0..MB {
                    for ni in 0..NB {
                        dot(mi, ni);
                    }
                }
            }
        }
        for mi in 0..MB {
            for ni in 0..NB {
                store(2 * mi + ni, at(mi, ni), stride);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::split::{pack_a_cols, pack_a_rows, pack_b_pairs, APack, BPack};
    use super::*;

    /// A·B through the packers and the tile GEMM against an f64 product, for shapes with
    /// partial tiles on every side, every part count and both ways of packing A.
    #[test]
    fn split_gemm_matches_f64_at_fp32_accuracy() {
        if !supported() {
            return;
        }
        let mut seed = 12345u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32) * 2.0 - 1.0
        };
        for &(m, n, k) in &[
            (16usize, 16usize, 32usize),
            (5, 48, 64),
            (64, 80, 80),
            (37, 16, 7),
            (20, 32, 100),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let ld = n + 16;
            let bt: Vec<f32> = (0..k * ld).map(|_| rnd()).collect();
            let (mt, kc, nt) = (m.div_ceil(16), k.div_ceil(32), n / 16);
            for parts in [3, 2, 1] {
                let mut ap = APack::new(parts, mt, kc);
                let mut ap2 = APack::new(parts, mt, kc);
                let mut bp = BPack::new(3, kc, nt);
                // SAFETY: AMX (hence AVX-512BW) checked above.
                unsafe {
                    pack_a_rows(&mut ap, &a, 0, k, m, k).unwrap();
                    // The same A read as the transpose of a k × m block.
                    let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
                    pack_a_cols(&mut ap2, &at, 0, m, m, k).unwrap();
                    pack_b_pairs::<true>(&mut bp, &bt, ld, k, kc).unwrap();
                }
                assert_eq!(&ap.buf[..], &ap2.buf[..], "{m}x{k} parts {parts}");
                let mut c = vec![f32::NAN; 16 * mt * ld];
                let _t = unsafe { Tiles::configure() };
                unsafe { gemm(&ap, mt, &bp, kc, &mut c, ld, true).unwrap() };
                // Accumulating onto C: twice the product.
                let mut c2 = c.clone();
                unsafe { gemm(&ap, mt, &bp, kc, &mut c2, ld, false).unwrap() };
                for r in 0..m {
                    for col in 0..n {
                        let want: f64 = (0..k)
                            .map(|kk| {
                                let x = a[r * k + kk];
                                // Parts beyond `parts` are dropped from A: compare with A as
                                // those parts represent it.
                                let x = match parts {
                                    3 => x as f64,
                                    2 => {
                                        let p = super::super::split::split3(x);
                                        bf(p[0]) + bf(p[1])
                                    }
                                    _ => bf(super::super::split::split3(x)[0]),
                                };
                                x * bt[kk * ld + col] as f64
                            })
                            .sum();
                        let got = c[r * ld + col] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                            "{m}x{n}x{k} parts {parts} [{r}][{col}]: {got} vs {want}"
                        );
                        let twice = 2.0 * want;
                        let got2 = c2[r * ld + col] as f64;
                        assert!((got2 - twice).abs() <= 2e-6 * (1.0 + twice.abs()));
                    }
                }
            }
        }
    }

    #[test]
    fn tile_product_cycles_is_a_plausible_rate() {
        match tile_product_cycles() {
            // Below 4 would mean the store did not wait for the products.
            Some(c) => assert!((4.0..2000.0).contains(&c), "{c} cycles per tile product"),
            None => assert!(!supported()),
        }
    }

    fn bf(x: u16) -> f64 {
        f32::from_bits((x as u32) << 16) as f64
    }
}

#[cfg(test)]
mod timing {
    use super::super::split::{softmax_pack_p, APack, BPack};
    use super::*;

    /// `cargo test --release --lib amx::timing -- --ignored --nocapture`: tile products per
    /// second of the GEMM on the kernel's block shapes (peak: one per 16 cycles).
    #[test]
    #[ignore]
    fn gemm_rate() {
        if !supported() {
            return;
        }
        for (zero, nt, kc) in [
            (true, 16, 2),
            (false, 16, 2),
            (true, 2, 2),
            (true, 16, 8),
            (true, 4, 8),
        ] {
            let a = APack::new(3, 4, kc);
            let b = BPack::new(3, kc, nt);
            let ld = 16 * nt + 16;
            let mut c = vec![0.0f32; 64 * ld];
            let _t = unsafe { Tiles::configure() };
            let iters = 20_000 / nt;
            let t0 = std::time::Instant::now();
            for _ in 0..iters {
                unsafe { gemm(&a, 4, &b, kc, &mut c, ld, zero).unwrap() };
            }
            let dt = t0.elapsed().as_secs_f64();
            let tdps = (iters * 4 * nt * kc * 6) as f64;
            println!(
                "zero {zero} nt {nt} kc {kc}: {:.1} ns per product, {:.0} GFLOP/s bf16",
                dt / tdps * 1e9,
                tdps * 16384.0 / dt / 1e9
            );
        }
    }

    /// `cargo test --release --lib amx::timing -- --ignored --nocapture`: TSC cycles per row
    /// pair (32 scores) of the softmax and P packing on the AMX path's block (128 keys × 256
    /// queries), fastest of many runs, with the output rescale every time and never.
    #[test]
    #[ignore]
    fn softmax_rate() {
        if !supported() {
            return;
        }
        let (keys, nt, dv) = (128usize, 16usize, 64usize);
        let ld = 16 * nt + 16;
        let st: Vec<f32> = (0..keys * ld)
            .map(|i| ((i * 37) % 101) as f32 / 50.0)
            .collect();
        let mut pp = BPack::new(3, keys / 32, nt);
        let (mut m, mut l) = (vec![0.0f32; ld], vec![0.0f32; ld]);
        let mut ot = vec![0.0f32; dv * ld];
        let mut best = [u64::MAX; 2];
        for _ in 0..300 {
            for (mode, b) in best.iter_mut().enumerate() {
                // Scores are in [0, 2]: a running max of -1 moves in every column, 3 never.
                m.fill(if mode == 0 { -1.0 } else { 3.0 });
                // SAFETY: AMX implies AVX-512F/BW/DQ and AVX512-BF16.
                let t0 = unsafe { std::arch::x86_64::_rdtsc() };
                unsafe {
                    softmax_pack_p::<false>(
                        &mut pp,
                        &st,
                        ld,
                        keys,
                        keys / 32,
                        &mut m,
                        &mut l,
                        &mut ot,
                        dv,
                        [&[], &[]],
                    )
                    .unwrap()
                };
                *b = (*b).min(unsafe { std::arch::x86_64::_rdtsc() } - t0);
            }
        }
        let pairs = (keys / 2 * nt) as f64;
        println!(
            "softmax and P packing: {:.1} cycles per row pair with the rescale, {:.1} without",
            best[0] as f64 / pairs,
            best[1] as f64 / pairs
        );
    }
}
