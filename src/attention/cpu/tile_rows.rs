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
use super::gemm::Isa;
use super::gemm::{gemm, gemm_nt, Init, MatA, MatB};
use super::softmax::update_rows;
use super::tile::{finish_scores, write_out, Layout, Rows};
use super::{OutPtr, Plan};
use crate::attention::{AttentionProblem, CpuInputs, Elems};
use crate::Result;

/// Runs task `t` with the instruction set the plan chose.
pub fn run(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    out: &OutPtr,
    t: usize,
) -> Result<()> {
    match plan.isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Plan::isa` only names instruction sets the CPU reported.
        Isa::Avx512 | Isa::Amx => unsafe { run_avx512(plan, p, inp, out, t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { run_avx2(plan, p, inp, out, t) },
        _ => run_impl::<{ super::tile::PORTABLE_FMA }>(plan, p, inp, out, t),
    }
}

// The same body compiled per instruction set, so that the softmax loops use the widest
// registers available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma,f16c")]
unsafe fn run_avx512(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    out: &OutPtr,
    t: usize,
) -> Result<()> {
    run_impl::<true>(plan, p, inp, out, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    out: &OutPtr,
    t: usize,
) -> Result<()> {
    run_impl::<true>(plan, p, inp, out, t)
}

#[inline(always)]
fn run_impl<const FUSED: bool>(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    out: &OutPtr,
    t: usize,
) -> Result<()> {
    let rows = Rows::new(plan, p, inp, t);
    let n = rows.head_pos.len();
    let (d, dv, bc) = (p.head_dim, p.v_head_dim, plan.block_keys);
    let (b, kvh) = (rows.b, rows.kvh);
    let mut o = vec![0.0f32; n * dv];
    let (j_start, j_end) = match (rows.lo.first(), rows.hi_key.last()) {
        (Some(&lo), Some(&hi)) if hi > lo => (lo, hi),
        _ => return write_out(p, &rows, &o, &[], out),
    };
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
    // f32 K is read in place whatever its strides; other types are widened block by block.
    let k_direct = match inp.k {
        Elems::F32(k) => Some(k),
        _ => None,
    };
    let v_direct = match inp.v {
        Elems::F32(v) if vs[3] == 1 => Some(v),
        _ => None,
    };
    let mut kbuf = vec![0.0f32; if k_direct.is_none() { bc * d } else { 0 }];
    let mut vbuf = vec![0.0f32; if v_direct.is_none() { bc * dv } else { 0 }];
    let mut s = vec![0.0f32; n * bc];
    let mut row_buf = vec![0.0f32; bc];
    let (mut m, mut l, mut alpha) = (vec![f32::NEG_INFINITY; n], vec![0.0f32; n], vec![1.0f32; n]);
    let last = n - 1;
    let mut j0 = j_start;
    while j0 < j_end {
        let nk = bc.min(j_end - j0);
        let k_off = b * ks[0] + kvh * ks[1] + j0 * ks[2];
        let kmat = match k_direct {
            Some(k) => MatA {
                data: k,
                off: k_off,
                rs: ks[2],
                ks: ks[3],
            },
            None => {
                for (j, dst) in kbuf.chunks_mut(d).take(nk).enumerate() {
                    load_row(inp.k, k_off + j * ks[2], ks[3], dst);
                }
                MatA {
                    data: &kbuf,
                    off: 0,
                    rs: d,
                    ks: 1,
                }
            }
        };
        gemm_nt(n, nk, d, qmat, kmat, &mut s, bc)?;
        let boundary = j0 < rows.lo[last] || j0 + nk > rows.hi_key[0];
        let at = Layout {
            key_stride: 1,
            row_stride: bc,
        };
        finish_scores(p, inp, &rows, &mut s, at, j0, nk, boundary, &mut row_buf);
        let moved = update_rows::<FUSED>(&mut s, bc, n, nk, &mut m, &mut l, &mut alpha);
        let v_off = b * vs[0] + kvh * vs[1] + j0 * vs[2];
        let vmat = match v_direct {
            Some(v) => MatB {
                data: v,
                off: v_off,
                ld: vs[2],
            },
            None => {
                for (j, dst) in vbuf.chunks_mut(dv).take(nk).enumerate() {
                    load_row(inp.v, v_off + j * vs[2], vs[3], dst);
                }
                MatB {
                    data: &vbuf,
                    off: 0,
                    ld: dv,
                }
            }
        };
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
    write_out(p, &rows, &o, &l, out)
}
