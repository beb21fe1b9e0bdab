//! One task with few query rows: decoding (one new query against a long past), or one query
//! of a small GQA group. The FlashAttention-2 loop of [`super::tile`] with the scores kept
//! row-major, `S = Q·Kᵀ` (rows × keys, keys along the vector lanes), instead of transposed.
//!
//! The tiled paths put queries along the lanes, so a task with one query row computes 16
//! score columns to use one, and the AMX path also splits every K and V block into bf16 parts
//! for that one row. Here no lane is spent on an absent row: `Q·Kᵀ` runs on the `gemm`
//! crate's micro-kernels reading K in place (through its strides), the softmax walks each row
//! along its keys ([`super::softmax::update_rows`]), and `P·V` is the usual [`gemm`].

use super::convert::load_row;
#[cfg(target_arch = "x86_64")]
use super::gemm::{check_nt, Isa};
use super::gemm::{gemm, gemm_nt, Init, MatA};
use super::softmax::{fmax, update_rows};
use super::tile::{finish_scores, k_block, v_block, write_out, Layout, Rows};
use super::{OutPtr, Plan};
use crate::attention::{AttentionProblem, CpuInputs, Elems};
use crate::Result;

/// A task's unnormalized result over its keys: for each of its rows, the output
/// accumulator `o` (`dv` wide), the running max `m` (log2 units) and the sum `l`.
pub struct Partial {
    pub rows: Rows,
    pub o: Vec<f32>,
    pub m: Vec<f32>,
    pub l: Vec<f32>,
}

/// Runs task `t` (all of its rows' keys) and writes its rows of Y.
pub fn run(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    out: &OutPtr,
    t: usize,
) -> Result<()> {
    let part = run_partial(plan, p, inp, t)?;
    write_out(p, &part.rows, &part.o, &part.l, out)
}

/// Runs task `t` over its share of the keys: chunk `t % key_splits` of row task
/// `t / key_splits` (see [`Plan::key_splits`]).
pub fn run_partial(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    t: usize,
) -> Result<Partial> {
    match plan.isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Plan::isa` only names instruction sets the CPU reported.
        Isa::Avx512 | Isa::Amx => unsafe { run_avx512(plan, p, inp, t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { run_avx2(plan, p, inp, t) },
        _ => run_impl::<{ super::tile::PORTABLE_FMA }>(plan, p, inp, t),
    }
}

/// Y's rows of one row task from its `key_splits` partial results: each chunk's accumulator
/// and sum rescaled to the common maximum, added, then normalized once.
pub fn combine(p: &AttentionProblem, parts: &[Partial], out: &OutPtr) -> Result<()> {
    let Some(first) = parts.first() else {
        return Ok(());
    };
    let (n, dv) = (first.m.len(), p.v_head_dim);
    let mut o = vec![0.0f32; n * dv];
    let mut l = vec![0.0f32; n];
    for r in 0..n {
        // A NaN max (from a NaN score) must reach the output, as on the one-task path.
        let m = parts.iter().map(|c| c.m[r]).fold(f32::NEG_INFINITY, fmax);
        for c in parts {
            // A chunk that saw no key (m = −∞) contributes nothing; exp2(−∞) is 0.
            let w = if c.m[r] == f32::NEG_INFINITY {
                0.0
            } else {
                (c.m[r] - m).exp2()
            };
            l[r] += c.l[r] * w;
            for (x, &y) in o[r * dv..(r + 1) * dv]
                .iter_mut()
                .zip(&c.o[r * dv..(r + 1) * dv])
            {
                *x += y * w;
            }
        }
    }
    write_out(p, &first.rows, &o, &l, out)
}

// The same body compiled per instruction set, so that the softmax loops use the widest
// registers available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma,f16c")]
unsafe fn run_avx512(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    t: usize,
) -> Result<Partial> {
    run_impl::<true>(plan, p, inp, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    t: usize,
) -> Result<Partial> {
    run_impl::<true>(plan, p, inp, t)
}

#[inline(always)]
fn run_impl<const FUSED: bool>(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    t: usize,
) -> Result<Partial> {
    let rows = Rows::new(plan, p, inp, t / plan.key_splits);
    let n = rows.head_pos.len();
    let (d, dv, bc) = (p.head_dim, p.v_head_dim, plan.block_keys);
    let (b, kvh) = (rows.b, rows.kvh);
    let o = vec![0.0f32; n * dv];
    let (m, l) = (vec![f32::NEG_INFINITY; n], vec![0.0f32; n]);
    // This task's chunk of the keys, intersected with what its rows see.
    let chunk = plan.key_chunk(t % plan.key_splits, p.kv_len);
    let (j_start, j_end) = match (rows.lo.first(), rows.hi_key.last()) {
        (Some(&lo), Some(&hi)) if hi.min(chunk.end) > lo.max(chunk.start) => {
            (lo.max(chunk.start), hi.min(chunk.end))
        }
        _ => return Ok(Partial { rows, o, m, l }),
    };
    let mut o = o;
    // The task's query rows, scaled into log2 units (the softmax then needs 2^x), row-major.
    let mut q = vec![0.0f32; n * d];
    let qs = p.q_strides;
    let q_scale = p.scale * std::f32::consts::LOG2_E;
    for (r, &(h, i)) in rows.head_pos.iter().enumerate() {
        let row = &mut q[r * d..(r + 1) * d];
        load_row(inp.q, b * qs[0] + h * qs[1] + i * qs[2], qs[3], row);
        row.iter_mut().for_each(|x| *x *= q_scale);
    }
    let qmat = MatA {
        data: &q,
        off: 0,
        rs: d,
        ks: 1,
    };
    let (ks, vs) = (inp.k_strides, inp.v_strides);
    // Blocks that `k_block`/`v_block` cannot read in place (not f32; V rows not contiguous)
    // are widened into these.
    let k_in_place = matches!(inp.k, Elems::F32(_));
    let v_in_place = matches!(inp.v, Elems::F32(_)) && vs[3] == 1;
    let mut kbuf = vec![0.0f32; if k_in_place { 0 } else { bc * d }];
    let mut vbuf = vec![0.0f32; if v_in_place { 0 } else { bc * dv }];
    let mut s = vec![0.0f32; n * bc];
    let mut row_buf = vec![0.0f32; bc];
    let (mut m, mut l, mut alpha) = (vec![f32::NEG_INFINITY; n], vec![0.0f32; n], vec![1.0f32; n]);
    let last = n - 1;
    let mut j0 = j_start;
    while j0 < j_end {
        let nk = bc.min(j_end - j0);
        let k_off = b * ks[0] + kvh * ks[1] + j0 * ks[2];
        let kmat = k_block(inp.k, ks, k_off, nk, d, &mut kbuf);
        scores(plan.isa, n, nk, d, qmat, kmat, &mut s, bc)?;
        let boundary = j0 < rows.lo[last] || j0 + nk > rows.hi_key[0];
        let at = Layout {
            key_stride: 1,
            row_stride: bc,
        };
        finish_scores(p, inp, &rows, &mut s, at, j0, nk, boundary, &mut row_buf);
        let moved = update_rows::<FUSED>(&mut s, bc, n, nk, &mut m, &mut l, &mut alpha);
        let v_off = b * vs[0] + kvh * vs[1] + j0 * vs[2];
        let vmat = v_block(inp.v, vs, v_off, nk, dv, &mut vbuf);
        let pmat = MatA {
            data: &s,
            off: 0,
            rs: bc,
            ks: 1,
        };
        // O ← diag(alpha)·O + P·V, the rescale skipped when no row's max moved.
        let init = if moved {
            Init::Scaled(&alpha)
        } else {
            Init::Add
        };
        gemm(
            plan.isa, n, dv, nk, pmat, vmat, &mut o, dv, init, None, None,
        )?;
        j0 += nk;
    }
    Ok(Partial { rows, o, m, l })
}

/// `S = Q·Kᵀ` for the block: `n` query rows (row-major, `d` wide) against `nk` K rows, into
/// `s` (row stride `lds`). With AVX-512 and K rows contiguous, dot products 16 keys at a time
/// ([`avx512::scores`]); otherwise the `gemm` crate.
#[allow(clippy::too_many_arguments)]
fn scores(
    isa: super::gemm::Isa,
    n: usize,
    nk: usize,
    d: usize,
    q: MatA,
    k: MatA,
    s: &mut [f32],
    lds: usize,
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Amx) && k.ks == 1 && q.ks == 1 && n > 0 && nk > 0 && d > 0 {
        check_nt(n, nk, d, q, k, s.len(), lds)?;
        // SAFETY: AVX-512F (the plan names it only when the CPU has it); extents checked.
        unsafe { avx512::scores(n, nk, d, q, k, s, lds) };
        return Ok(());
    }
    let _ = isa;
    gemm_nt(n, nk, d, q, k, s, lds)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! Scores of a few query rows by dot products: for 16 keys at a time, one accumulator
    //! vector per key (partial sums over the head dimension, K rows read contiguously), then a
    //! four-step shuffle tree turns the 16 accumulators into one vector of 16 scores. Every
    //! multiply-add is useful work, where the tiled GEMMs would spend 15 of 16 lanes on absent
    //! query rows when a task has one.
    use super::MatA;
    use std::arch::x86_64::*;

    /// Accumulator `i` holds key `PERM[i]` of the group, so that the tree below leaves key `j`
    /// in lane `j` (the tree transposes a 4 × 4 arrangement of the keys).
    const PERM: [usize; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

    /// # Safety
    /// AVX-512F; `q` holds `n` rows of `d` (unit stride), `k` holds `nk` rows of `d` (unit
    /// stride), `s` holds `n` rows of `nk` at stride `lds` (all checked by the caller).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores(
        n: usize,
        nk: usize,
        d: usize,
        q: MatA,
        k: MatA,
        s: &mut [f32],
        lds: usize,
    ) {
        let qp = q.data.as_ptr().add(q.off);
        let kp = k.data.as_ptr().add(k.off);
        let sp = s.as_mut_ptr();
        for j0 in (0..nk).step_by(16) {
            let kb = (nk - j0).min(16);
            // Keys past the block's end reread its last row; their lanes are not stored.
            let rows: [*const f32; 16] =
                std::array::from_fn(|i| kp.add((j0 + PERM[i]).min(nk - 1) * k.rs));
            for r in 0..n {
                let qr = qp.add(r * q.rs);
                let mut acc = [_mm512_setzero_ps(); 16];
                let mut c = 0;
                while c < d {
                    let m: __mmask16 = if d - c >= 16 {
                        0xFFFF
                    } else {
                        (1u16 << (d - c)) - 1
                    };
                    let qv = _mm512_maskz_loadu_ps(m, qr.add(c));
                    for (a, row) in acc.iter_mut().zip(&rows) {
                        *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, row.add(c)), qv, *a);
                    }
                    c += 16;
                }
                let out = reduce16(&acc);
                let keep: __mmask16 = if kb == 16 { 0xFFFF } else { (1u16 << kb) - 1 };
                _mm512_mask_storeu_ps(sp.add(r * lds + j0), keep, out);
            }
        }
    }

    /// Lane `i` of the result is the sum of all lanes of `a[PERM⁻¹…]`: 128-bit quarters,
    /// then halves of quarters, then single lanes are folded pairwise.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce16(a: &[__m512; 16]) -> __m512 {
        let v: [__m512; 8] = std::array::from_fn(|i| {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
            )
        });
        let w: [__m512; 4] = std::array::from_fn(|i| {
            let (x, y) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        });
        let z: [__m512; 2] = std::array::from_fn(|i| {
            let (x, y) = (w[2 * i], w[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
        });
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(z[0], z[1]),
            _mm512_shuffle_ps::<0b11_10_11_10>(z[0], z[1]),
        )
    }
}
