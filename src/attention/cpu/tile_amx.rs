//! One task of the CPU kernel on AMX tiles: the FlashAttention-2 loop of [`super::tile`] with
//! both products on the tile unit, every operand split into bf16 parts ([`super::split`]).
//!
//! `Sᵀ = K·Qᵀ` (keys × queries, the layout the softmax works on): Qᵀ is packed once per task,
//! each K block once (reused by every query of the task), or taken from the packs that
//! [`super::presplit`] made once for all tasks. `Oᵀ = Vᵀ·Pᵀ` (head dim × queries):
//! each V block is packed transposed (16 × 16 register transposes), Pᵀ is split straight from
//! the exponentials. The output accumulator stays transposed until the end of the task.

use super::amx::{self, Tiles};
use super::convert::load_row;
use super::softmax::{RowState, LANES};
use super::split::{self, APack, BPack};
use super::tile::{finish_scores, write_out, Aligned, Layout, PreBlock, Rows};
use super::{OutPtr, Plan};
use crate::attention::{AttentionProblem, CpuInputs, Elems};
use crate::Result;

/// Runs task `t` on AMX.
///
/// # Safety
/// [`amx::supported`] must be true (it implies AVX-512F/BW and AVX512-BF16; the plan also
/// checked DQ).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c")]
pub unsafe fn run(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    out: &OutPtr,
    t: usize,
    pre: Option<&[PreBlock]>,
) -> Result<()> {
    let rows = Rows::new(plan, p, inp, t);
    let n = rows.head_pos.len();
    let (d, dv, bc) = (p.head_dim, p.v_head_dim, plan.block_keys);
    let (b, kvh) = (rows.b, rows.kvh);
    let (j_start, j_end) = match (rows.lo.first(), rows.hi_key.last()) {
        (Some(&lo), Some(&hi)) if hi > lo => (lo, hi),
        _ => return write_out(p, &rows, &vec![0.0; n * dv], &[], out),
    };
    let _tiles = Tiles::configure();
    let cols = n.next_multiple_of(LANES);
    // An odd number of vectors per row, as in the AVX-512 path (column walks hit every set).
    let ld = cols | LANES;
    let nt = cols / 16;
    let mut row = vec![0.0f32; d.max(dv).max(bc)];
    // Qᵀ scaled into log2 units, then split once for the whole task.
    let dk = d.div_ceil(32);
    let mut qpack = BPack::new(3, dk, nt);
    {
        let mut qt = Aligned::scratch(d * ld);
        let q_scale = p.scale * std::f32::consts::LOG2_E;
        load_qt(p, inp, &rows, q_scale, &mut qt, ld);
        split::pack_b_pairs::<true>(&mut qpack, &qt, ld, d, dk)?;
    }
    let dvt = dv.div_ceil(16);
    // This task's own K and V packs, made when a block was not pre-split. bf16 K/V are exact
    // in one part, fp16 in two: fewer products.
    let mut own_packs: Option<(APack, APack)> = None;
    let mut ppack = BPack::new(3, bc.div_ceil(32), nt);
    // Every score the softmax reads is written by `K·Qᵀ` first, and the output accumulator by
    // the first block's `Vᵀ·Pᵀ` (later blocks rescale it and add to it).
    let mut st = Aligned::scratch(bc.next_multiple_of(16) * ld);
    let mut ot = Aligned::scratch(16 * dvt * ld);
    let (ks, vs) = (inp.k_strides, inp.v_strides);
    // f32 K and V rows are split in place when contiguous; anything else goes through a dense
    // f32 block.
    let k_direct = match inp.k {
        Elems::F32(k) if ks[3] == 1 => Some(k),
        _ => None,
    };
    let v_direct = match inp.v {
        Elems::F32(v) if vs[3] == 1 => Some(v),
        _ => None,
    };
    let mut kbuf = vec![0.0f32; if k_direct.is_none() { bc * d } else { 0 }];
    let mut vbuf = vec![0.0f32; if v_direct.is_none() { bc * dv } else { 0 }];
    let mut state = RowState::new(ld);
    let last = n - 1;
    let mut j0 = j_start;
    while j0 < j_end {
        let nk = bc.min(j_end - j0);
        // The block as the pre-split pass packed it, when it covers exactly these keys (its
        // K rows and V columns past them would not be the zeros the products need).
        let packed = pre
            .filter(|_| j0 % bc == 0 && nk == bc.min(p.kv_len - j0))
            .and_then(|blocks| blocks.get(j0 / bc)?.get());
        let (kpack, vpack) = match packed {
            Some((kp, vp)) => (kp, vp),
            None => {
                let (kpack, vpack) = own_packs.get_or_insert_with(|| {
                    (
                        APack::new(split::parts_for(inp.k), bc.div_ceil(16), dk),
                        APack::new(split::parts_for(inp.v), dvt, bc.div_ceil(32)),
                    )
                });
                let k_off = b * ks[0] + kvh * ks[1] + j0 * ks[2];
                match k_direct {
                    Some(k) => split::pack_a_rows(kpack, k, k_off, ks[2], nk, d)?,
                    None => {
                        for (j, dst) in kbuf.chunks_mut(d).take(nk).enumerate() {
                            load_row(inp.k, k_off + j * ks[2], ks[3], dst);
                        }
                        split::pack_a_rows(kpack, &kbuf, 0, d, nk, d)?
                    }
                }
                let v_off = b * vs[0] + kvh * vs[1] + j0 * vs[2];
                match v_direct {
                    Some(v) => split::pack_a_cols(vpack, v, v_off, vs[2], dv, nk)?,
                    None => {
                        for (j, dst) in vbuf.chunks_mut(dv).take(nk).enumerate() {
                            load_row(inp.v, v_off + j * vs[2], vs[3], dst);
                        }
                        split::pack_a_cols(vpack, &vbuf, 0, dv, dv, nk)?
                    }
                }
                (&*kpack, &*vpack)
            }
        };
        let boundary = j0 < rows.lo[last] || j0 + nk > rows.hi_key[0];
        let finite = !boundary && p.mask.is_none();
        let (mtk, kcv) = (nk.div_ceil(16), nk.div_ceil(32));
        amx::gemm(kpack, mtk, &qpack, dk, &mut st, ld, true)?;
        finish_scores(
            p,
            inp,
            &rows,
            &mut st,
            Layout::transposed(ld),
            j0,
            nk,
            boundary,
            &mut row,
        );
        // Running max and sum, output rescale, and P straight from the scores into its
        // packed parts (no f32 P tile), 16 queries at a time.
        let (m, l) = (&mut state.m, &mut state.l);
        // While the vector units work, this block's V pack and the next block's K pack (when
        // the pre-split made them; they come from L3) move towards L2 for the tile loads.
        let next_k = pre
            .filter(|_| packed.is_some())
            .and_then(|blocks| blocks.get(j0 / bc + 1)?.get())
            .map_or(&[][..], |(kp, _)| &kp.buf[..]);
        let this_v = match packed {
            Some((_, vp)) => &vp.buf[..],
            _ => &[][..],
        };
        let pf = [this_v, next_k];
        // Nothing to rescale before the first block (its factor is 0 in every column).
        let first = j0 == j_start;
        let ot_rows = if first { 0 } else { dv };
        if finite {
            split::softmax_pack_p::<false>(
                &mut ppack, &st, ld, nk, kcv, m, l, &mut ot, ot_rows, pf,
            )?;
        } else {
            split::softmax_pack_p::<true>(
                &mut ppack, &st, ld, nk, kcv, m, l, &mut ot, ot_rows, pf,
            )?;
        }
        amx::gemm(vpack, dvt, &ppack, kcv, &mut ot, ld, first)?;
        j0 += nk;
    }
    // Every element is written by the transposition.
    let mut o = Aligned::scratch(n * dv);
    transpose_out(&ot, ld, dv, n, &mut o);
    write_out(p, &rows, &o, &state.l, out)
}

/// `qt[c·ld + r] = scale·Q[r][c]` for the task's query rows `r` and head-dim columns `c`
/// (`qt` is `d × ld`, zero past the rows), 16 × 16 at a time through registers. With
/// [`transpose_out`], 4 % faster than column walks storing one float per cache line (1 thread,
/// S = 4096: best 187.5–189.5 against 180.1–182.1 GFLOP/s, alternating in one process).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c")]
unsafe fn load_qt(
    p: &AttentionProblem,
    inp: &CpuInputs,
    rows: &Rows,
    scale: f32,
    qt: &mut [f32],
    ld: usize,
) {
    use std::arch::x86_64::*;
    let d = p.head_dim;
    let dp = d.next_multiple_of(16);
    let qs = p.q_strides;
    // 16 query rows, each padded with zeros to a whole number of vectors.
    let mut block = vec![0.0f32; 16 * dp];
    for r0 in (0..rows.head_pos.len()).step_by(16) {
        block.fill(0.0);
        for (j, &(h, i)) in rows.head_pos.iter().skip(r0).take(16).enumerate() {
            let off = rows.b * qs[0] + h * qs[1] + i * qs[2];
            load_row(inp.q, off, qs[3], &mut block[j * dp..j * dp + d]);
        }
        let s = _mm512_set1_ps(scale);
        for c0 in (0..d).step_by(16) {
            let mut v: [__m512; 16] =
                std::array::from_fn(|j| _mm512_loadu_ps(block.as_ptr().add(j * dp + c0)));
            split::transpose16(&mut v);
            for (c, x) in v.iter().enumerate().take(d - c0) {
                let dst = &mut qt[(c0 + c) * ld + r0..][..16];
                _mm512_storeu_ps(dst.as_mut_ptr(), _mm512_mul_ps(*x, s));
            }
        }
    }
}

/// `o[r·dv + e] = ot[e·ld + r]` for `r < n`, `e < dv` (`ot` holds whole 16 × 16 tiles), 16 × 16
/// at a time through registers.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c")]
unsafe fn transpose_out(ot: &[f32], ld: usize, dv: usize, n: usize, o: &mut [f32]) {
    use std::arch::x86_64::*;
    for e0 in (0..dv).step_by(16) {
        let lanes = (dv - e0).min(16);
        let mask = ((1u32 << lanes) - 1) as __mmask16;
        for r0 in (0..n).step_by(16) {
            let mut v: [__m512; 16] =
                std::array::from_fn(|i| _mm512_loadu_ps(ot[(e0 + i) * ld + r0..][..16].as_ptr()));
            split::transpose16(&mut v);
            for (r, x) in v.iter().enumerate().take(n - r0) {
                let dst = &mut o[(r0 + r) * dv + e0..][..lanes];
                _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, *x);
            }
        }
    }
}
