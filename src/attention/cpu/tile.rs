//! One task of the CPU kernel: a block of query rows (query position × head within one GQA
//! group) against every visible block of keys, FlashAttention-2 style.

use super::convert::{load_mask_row, load_row};
use super::gemm::{gemm, Init, Isa, MatA, MatB, Prefetch};
use super::softmax::{softcap, RowState, LANES};
use super::{OutPtr, Plan};
use crate::attention::{AttentionProblem, CpuInputs, Elems};
use crate::Result;

/// Runs task `t` with the instruction set the plan chose.
/// `pre`: the task's unit's K/V blocks already split, when the AMX path made them
/// ([`super::presplit`]).
pub fn run(
    plan: &Plan,
    p: &AttentionProblem,
    inp: &CpuInputs,
    out: &OutPtr,
    t: usize,
    pre: Option<&[PreBlock]>,
) -> Result<()> {
    if plan.few_rows {
        return super::tile_rows::run(plan, p, inp, out, t);
    }
    match plan.isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the plan asks for AMX only when `amx::supported()` said yes.
        Isa::Avx512 if plan.amx => unsafe { super::tile_amx::run(plan, p, inp, out, t, pre) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Plan::isa` only names instruction sets the CPU reported.
        Isa::Avx512 => unsafe { run_avx512(plan, p, inp, out, t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { run_avx2(plan, p, inp, out, t) },
        _ => {
            // Pre-split K/V blocks exist only for the AMX path.
            let _ = pre;
            run_impl::<PORTABLE_FMA>(plan, p, inp, out, t)
        }
    }
}

/// Whether the portable path may use `f32::mul_add`: where fused multiply-adds are in the
/// compile-time baseline (every aarch64 CPU has them), not on plain x86-64.
pub(super) const PORTABLE_FMA: bool = cfg!(any(target_feature = "fma", target_arch = "aarch64"));

/// One pre-split K/V block (see [`super::presplit`]).
#[cfg(target_arch = "x86_64")]
pub type PreBlock = std::sync::OnceLock<super::presplit::BlockPacks>;
/// No pre-split blocks without AMX.
#[cfg(not(target_arch = "x86_64"))]
pub type PreBlock = std::sync::OnceLock<()>;

// The same body compiled per instruction set, so the element-wise loops (exp, max, sums,
// conversions) are vectorized for the widest registers available.
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

/// Which (batch, KV head, rows) a task covers, and where each row's keys start and end.
pub(super) struct Rows {
    pub b: usize,
    pub kvh: usize,
    /// (query head, query position) per row.
    pub head_pos: Vec<(usize, usize)>,
    /// Visible keys of each row: `lo[r]..hi[r]` (causal/window/padding; empty when equal).
    pub lo: Vec<usize>,
    pub hi_key: Vec<usize>,
}

impl Rows {
    pub fn new(plan: &Plan, p: &AttentionProblem, inp: &CpuInputs, t: usize) -> Rows {
        // Last row blocks first: under a causal mask they see the most keys, and starting the
        // longest tasks early evens out the threads' finishing times.
        let rb = plan.row_blocks - 1 - t % plan.row_blocks;
        let bk = t / plan.row_blocks;
        let (b, kvh) = (bk / p.kv_heads, bk % p.kv_heads);
        let g = plan.group;
        let r0 = rb * plan.block_rows;
        let rows = plan.block_rows.min(p.q_len * g - r0);
        // Keys at or past nonpad_kv_seqlen[b] are padding (validated: 0 ≤ n ≤ kv_len).
        let valid = inp
            .nonpad_kv_seqlen
            .and_then(|n| n.get(b))
            .map_or(p.kv_len, |&n| (n.max(0) as usize).min(p.kv_len));
        let mut r = Rows {
            b,
            kvh,
            head_pos: Vec::with_capacity(rows),
            lo: Vec::with_capacity(rows),
            hi_key: Vec::with_capacity(rows),
        };
        for row in r0..r0 + rows {
            let (i, gi) = (row / g, row % g);
            let (lo, hi) = p.visible_keys(i);
            r.head_pos.push((kvh * g + gi, i));
            r.lo.push(lo);
            // Rows are ordered by query position, so lo and hi are non-decreasing.
            r.hi_key.push(hi.min(valid).max(lo));
        }
        r
    }
}

/// An f32 buffer whose first element sits on a 64-byte boundary, so that rows of a multiple of
/// 16 floats never split a cache line under 512-bit loads and stores.
#[derive(Default)]
pub(super) struct Aligned {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize, value: f32) -> Aligned {
        Aligned::from_buf(super::scratch::filled(len + 16, value), len)
    }

    /// For a buffer whose every element is written before it is read (see
    /// [`super::scratch::reused`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 paths only
    pub fn scratch(len: usize) -> Aligned {
        Aligned::from_buf(super::scratch::reused(len + 16, 0.0), len)
    }

    fn from_buf(buf: Vec<f32>, len: usize) -> Aligned {
        // Floats to skip to reach the next 64-byte boundary (f32 is 4-byte aligned).
        let off = buf.as_ptr().align_offset(64).min(15);
        Aligned { buf, off, len }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        super::scratch::recycle(std::mem::take(&mut self.buf));
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// Scratch tiles of one task.
struct Scratch {
    /// Qᵀ, scaled: `head_dim × ld`.
    qt: Aligned,
    /// Sᵀ, then Pᵀ: `block_keys × ld`.
    st: Aligned,
    /// Output accumulator: `rows × v_head_dim`.
    o: Aligned,
    /// K and V blocks widened to f32 when they cannot be read in place.
    kbuf: Aligned,
    vbuf: Aligned,
    /// One mask row or one input row.
    row: Vec<f32>,
    /// Column maxima of the current score block.
    block_max: Vec<f32>,
}

/// `FUSED`: the CPU running this has fused multiply-adds (see [`super::softmax::exp2_nonpos`]).
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
    let mut s = Scratch {
        qt: Aligned::default(),
        st: Aligned::default(),
        o: Aligned::new(n * dv, 0.0),
        kbuf: Aligned::default(),
        vbuf: Aligned::default(),
        row: vec![0.0; d.max(dv).max(bc)],
        block_max: Vec::new(),
    };
    let (j_start, j_end) = match (rows.lo.first(), rows.hi_key.last()) {
        (Some(&lo), Some(&hi)) if hi > lo => (lo, hi),
        _ => return write_out(p, &rows, &s.o, &[], out),
    };
    // Query columns computed: whole 16-lane vectors (the zero columns of Qᵀ past `n` give
    // harmless zero scores). The row stride of Qᵀ and Sᵀ is an odd number of vectors, so that
    // walking a column (the GEMMs do, k rows apart) touches every L1 set rather than the few a
    // multiple of 1 KiB would.
    let cols = n.next_multiple_of(LANES);
    let ld = cols | LANES;
    s.qt = Aligned::new(d * ld, 0.0);
    s.st = Aligned::new(bc * ld, 0.0);
    s.block_max = vec![f32::NEG_INFINITY; ld];
    let qs = p.q_strides;
    let qt: &mut [f32] = &mut s.qt;
    // Scores in log2 units: the softmax then needs 2^x, and the scale costs nothing per score.
    let q_scale = p.scale * std::f32::consts::LOG2_E;
    for (r, &(h, i)) in rows.head_pos.iter().enumerate() {
        let row = &mut s.row[..d];
        load_row(inp.q, b * qs[0] + h * qs[1] + i * qs[2], qs[3], row);
        for (col, &x) in qt.iter_mut().skip(r).step_by(ld).zip(row.iter()) {
            *col = x * q_scale;
        }
    }
    let (ks, vs) = (inp.k_strides, inp.v_strides);
    let k_direct = match inp.k {
        Elems::F32(k) => Some(k),
        _ => None,
    };
    let v_direct = match inp.v {
        Elems::F32(v) if vs[3] == 1 => Some(v),
        _ => None,
    };
    if k_direct.is_none() {
        s.kbuf = Aligned::new(bc * d, 0.0);
    }
    if v_direct.is_none() {
        s.vbuf = Aligned::new(bc * dv, 0.0);
    }
    let mut state = RowState::new(ld);
    let last = n - 1;
    let mut j0 = j_start;
    while j0 < j_end {
        let nk = bc.min(j_end - j0);
        let k_off = b * ks[0] + kvh * ks[1] + j0 * ks[2];
        let a = k_block(inp.k, ks, k_off, nk, d, &mut s.kbuf);
        // Only blocks straddling some row's visible range need per-element masking.
        let boundary = j0 < rows.lo[last] || j0 + nk > rows.hi_key[0];
        // Scores used as computed: the GEMM takes their column maxima while in registers.
        let plain = p.softcap == 0.0 && !boundary && p.mask.is_none() && plan.isa == Isa::Avx512;
        s.block_max.fill(f32::NEG_INFINITY);
        let col_max = plain.then_some(&mut s.block_max[..]);
        let qt = MatB {
            data: &s.qt,
            off: 0,
            ld,
        };
        gemm(
            plan.isa,
            nk,
            cols,
            d,
            a,
            qt,
            &mut s.st,
            ld,
            Init::Zero,
            col_max,
            // This block's V, needed next by the P·V product.
            v_direct.map(|v| Prefetch {
                data: v,
                off: b * vs[0] + kvh * vs[1] + j0 * vs[2],
                rows: nk,
                rs: vs[2],
                len: dv,
            }),
        )?;
        finish_scores(
            p,
            inp,
            &rows,
            &mut s.st,
            Layout::transposed(ld),
            j0,
            nk,
            boundary,
            &mut s.row,
        );
        let moved = match plan.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                let bm = plain.then_some(&s.block_max[..]);
                // Every score finite: no −∞ from masks or boundaries to clamp.
                let finite = !boundary && p.mask.is_none();
                // SAFETY: the plan names AVX-512 only when the CPU has it.
                unsafe { state.update_avx512(&mut s.st, ld, cols, nk, bm, finite) }
            }
            _ => state.update::<FUSED>(&mut s.st, ld, cols, nk),
        };
        let v_off = b * vs[0] + kvh * vs[1] + j0 * vs[2];
        let bmat = v_block(inp.v, vs, v_off, nk, dv, &mut s.vbuf);
        let pt = MatA {
            data: &s.st,
            off: 0,
            rs: 1,
            ks: ld,
        };
        // O ← diag(alpha)·O + P·V: the rescale rides on the accumulator load, and is skipped
        // when no row's max moved (most blocks after the first few).
        let init = if moved {
            Init::Scaled(&state.alpha)
        } else {
            Init::Add
        };
        // The next block's K, needed next by Kᵀ·Q.
        let next_k = match k_direct {
            Some(k) if ks[3] == 1 && j0 + nk < j_end => Some(Prefetch {
                data: k,
                off: k_off + nk * ks[2],
                rows: bc.min(j_end - j0 - nk),
                rs: ks[2],
                len: d,
            }),
            _ => None,
        };
        gemm(
            plan.isa, n, dv, nk, pt, bmat, &mut s.o, dv, init, None, next_k,
        )?;
        j0 += nk;
    }
    write_out(p, &rows, &s.o, &state.l, out)
}

/// Keys `off..` (`nk` rows of `d`) of K as a GEMM operand: f32 K in place through its
/// strides `ks`, any other type widened into `buf` (rows of `d`) first.
pub(super) fn k_block<'a>(
    k: Elems<'a>,
    ks: [usize; 4],
    off: usize,
    nk: usize,
    d: usize,
    buf: &'a mut [f32],
) -> MatA<'a> {
    if let Elems::F32(k) = k {
        return MatA {
            data: k,
            off,
            rs: ks[2],
            ks: ks[3],
        };
    }
    for (j, dst) in buf.chunks_mut(d).take(nk).enumerate() {
        load_row(k, off + j * ks[2], ks[3], dst);
    }
    MatA {
        data: buf,
        off: 0,
        rs: d,
        ks: 1,
    }
}

/// Keys `off..` (`nk` rows of `dv`) of V as a GEMM operand: f32 V with contiguous rows in
/// place, anything else widened into `buf` (rows of `dv`) first.
pub(super) fn v_block<'a>(
    v: Elems<'a>,
    vs: [usize; 4],
    off: usize,
    nk: usize,
    dv: usize,
    buf: &'a mut [f32],
) -> MatB<'a> {
    match v {
        Elems::F32(v) if vs[3] == 1 => MatB {
            data: v,
            off,
            ld: vs[2],
        },
        _ => {
            for (j, dst) in buf.chunks_mut(dv).take(nk).enumerate() {
                load_row(v, off + j * vs[2], vs[3], dst);
            }
            MatB {
                data: buf,
                off: 0,
                ld: dv,
            }
        }
    }
}

/// How a block of scores is laid out: element (key `j` of the block, task row `r`) at
/// `j·key_stride + r·row_stride`. The tiled paths keep `Sᵀ` (keys × rows, row stride 1);
/// the few-rows path ([`super::tile_rows`]) keeps `S` (rows × keys, key stride 1).
#[derive(Clone, Copy)]
pub(super) struct Layout {
    pub key_stride: usize,
    pub row_stride: usize,
}

impl Layout {
    /// `Sᵀ` with row stride `ld`.
    pub fn transposed(ld: usize) -> Layout {
        Layout {
            key_stride: ld,
            row_stride: 1,
        }
    }
}

/// Softcap and masks on one block's scores (`nk` keys from `j0` × the task's rows, laid out as
/// `at` says); `boundary` says whether some row's visible range ends inside the block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn finish_scores(
    p: &AttentionProblem,
    inp: &CpuInputs,
    rows: &Rows,
    st: &mut [f32],
    at: Layout,
    j0: usize,
    nk: usize,
    boundary: bool,
    buf: &mut [f32],
) {
    let n = rows.head_pos.len();
    let Layout {
        key_stride: kst,
        row_stride: rst,
    } = at;
    if p.softcap > 0.0 {
        // c·tanh(s/c) in log2 units is (c·log2 e)·tanh(s'/(c·log2 e)) for s' = s·log2 e.
        let cap = p.softcap * std::f32::consts::LOG2_E;
        if rst == 1 {
            softcap(st, kst, nk, n, cap);
        } else {
            softcap(st, rst, n, nk, cap);
        }
    }
    if boundary {
        for r in 0..n {
            let lo = rows.lo[r].clamp(j0, j0 + nk);
            let hi = rows.hi_key[r].clamp(lo, j0 + nk);
            for j in (j0..lo).chain(hi..j0 + nk) {
                st[(j - j0) * kst + r * rst] = f32::NEG_INFINITY;
            }
        }
    }
    if let (Some(desc), Some(mask)) = (&p.mask, inp.mask) {
        let ms = desc.strides;
        for (r, &(h, i)) in rows.head_pos.iter().enumerate() {
            let terms = &mut buf[..nk];
            let off = rows.b * ms[0] + h * ms[1] + i * ms[2] + j0 * ms[3];
            load_mask_row(mask, off, ms[3], terms);
            for (j, &m) in terms.iter().enumerate() {
                st[j * kst + r * rst] += m * std::f32::consts::LOG2_E;
            }
        }
    }
}

/// Normalizes each row by its softmax sum (rows with no visible key, `l = 0`, give zeros) and
/// stores it into Y.
#[inline(always)]
pub(super) fn write_out(
    p: &AttentionProblem,
    rows: &Rows,
    o: &[f32],
    l: &[f32],
    out: &OutPtr,
) -> Result<()> {
    let dv = p.v_head_dim;
    let os = p.out_strides;
    let mut tmp = vec![0.0f32; dv];
    for (r, &(h, i)) in rows.head_pos.iter().enumerate() {
        let sum = l.get(r).copied().unwrap_or(0.0);
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for (t, &x) in tmp.iter_mut().zip(&o[r * dv..(r + 1) * dv]) {
            *t = x * inv;
        }
        out.write_row(rows.b * os[0] + h * os[1] + i * os[2], os[3], &tmp)?;
    }
    Ok(())
}
