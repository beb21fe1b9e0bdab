//! The CPU kernel: FlashAttention-2 over tiles of query rows against blocks of keys/values,
//! fanned out over (batch, KV head, query-row block) tasks through [`ParallelFor`].
//!
//! Design, per task (see [`tile`]): the task's query rows — all query heads sharing one KV head,
//! so GQA/MQA read each K/V block once for the whole group — are packed once as `Qᵀ`, scaled by
//! `scale·log2 e` so that scores come out in log2 units. For each block of keys the kernel
//! computes the transposed scores `Sᵀ = K·Qᵀ` with a register-blocked GEMM ([`gemm`]: our
//! AVX-512 micro-kernels, or the `gemm` crate's AVX2/NEON ones) reading K in place (with
//! AVX-512, taking the block's column maxima while the scores are in registers), applies
//! softcap and masks (only on blocks that straddle a causal/window/padding boundary, plus
//! `attn_mask` when given), updates the running max and sum per query in fp32 with `2^x`
//! ([`softmax`]), rescales the output accumulator only when some query's max moved, and adds
//! `P·V`, again with the GEMM reading V in place. Each GEMM prefetches the other operand's next
//! block into L2. One normalization at the end; no buffer larger than a tile. fp16/bf16 blocks
//! are widened to f32 tiles first.
//!
//! Where the CPU has AMX (and Linux grants the tile state), both products run on the tile unit
//! instead ([`tile_amx`]): every fp32 operand is split into three bf16 parts whose six
//! significant cross products, exact in the fp32 accumulator, give fp32 accuracy ([`split`],
//! [`amx`]); bf16 inputs need one part and fp16 two. fp32 K and V are split once per (batch, KV
//! head) before the tasks, which then share the packs ([`presplit`]).
//! `FLASH_ORT_CPU_NO_AMX=1` in the environment keeps the AVX-512 path.

#[cfg(target_arch = "x86_64")]
mod amx;
mod convert;
mod gemm;
#[cfg(target_arch = "x86_64")]
mod presplit;
mod scratch;
mod softmax;
#[cfg(target_arch = "x86_64")]
mod split;
mod tile;
#[cfg(target_arch = "x86_64")]
mod tile_amx;
mod tile_rows;

pub use gemm::Isa;

/// TSC cycles per AMX tile product on this core now, `None` without AMX (benchmarks report
/// it: see `amx::tile_product_cycles`).
#[cfg(target_arch = "x86_64")]
pub fn tile_product_cycles() -> Option<f64> {
    amx::tile_product_cycles()
}

/// No AMX off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub fn tile_product_cycles() -> Option<f64> {
    None
}

use super::{check_buffers, AttentionProblem, CpuInputs, ElemsMut, ParallelFor};
use crate::{Error, Result};
use half::{bf16, f16};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

/// Query rows per task, at most. Each K/V block (64 keys × D = 64, 32 KiB in f32) comes from L3
/// once per task and feeds 4·rows·64·64 flops; at 64 rows the blocks' misses cost ~15 % of the
/// GEMM time (Sapphire Rapids, 2 MiB L2 per core, S = 4096: one head's K and V fill L2), at
/// 256 rows a quarter of that, while `Qᵀ`, `Sᵀ` and the output accumulator (64 KiB each)
/// still sit in L2.
const MAX_BLOCK_ROWS: usize = 256;
/// Query rows per task, at least (unless the problem has fewer).
const MIN_BLOCK_ROWS: usize = 64;
/// Tasks a call is cut into, at least where rows allow, per core this process may use:
/// enough to keep a pool busy and even out unequal tasks (causal), before tiles shrink towards
/// [`MIN_BLOCK_ROWS`]. (ORT does not tell a custom op its pool's size; its default is one
/// thread per core.) Between [`MIN_TASKS`] and [`MAX_MIN_TASKS`] in all.
const TASKS_PER_CORE: usize = 4;
const MIN_TASKS: usize = 8;
const MAX_MIN_TASKS: usize = 64;

/// Cores this process may use (read once).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(4, |n| n.get()))
}

/// The least number of tasks a call is cut into where rows allow (see [`TASKS_PER_CORE`]).
fn min_tasks() -> usize {
    (TASKS_PER_CORE * cores()).clamp(MIN_TASKS, MAX_MIN_TASKS)
}
/// Keys per block: the score tile is `BLOCK_KEYS × BLOCK_ROWS` f32.
const BLOCK_KEYS: usize = 64;
/// Keys per block on the AMX path: twice as many tile products per load and store of an
/// output accumulator tile, and half the hand-offs between the tile and vector units, at the
/// price of a 136 KiB score tile and a 192 KiB numerator pack (in L2). At S = 4096, one thread,
/// 3–4 % faster than 64 (fastest runs, interleaved A/B); 256 was 8 % slower.
const AMX_BLOCK_KEYS: usize = 128;

/// Query rows per task at most for the few-rows path ([`tile_rows`]: scores row-major, keys
/// along the lanes) instead of the tiled ones (queries along the lanes).
const FEW_ROWS: usize = 8;
/// Keys per block on the few-rows path: its score block is only `rows × 256`.
const FEW_ROWS_BLOCK_KEYS: usize = 256;
/// Keys per chunk at least when a few-rows call splits its keys across tasks (so that
/// combining the chunks' partial results stays a small fraction of the work).
const MIN_SPLIT_KEYS: usize = 1024;

/// How one call is cut into tasks.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// The vector instruction set of the element-wise work (and of the GEMMs without AMX).
    pub isa: Isa,
    /// Both products on AMX tiles (with `isa` = AVX-512).
    pub amx: bool,
    /// Tasks of at most [`FEW_ROWS`] rows take the few-rows path ([`tile_rows`]).
    pub few_rows: bool,
    /// Query rows per task (rows are (query, head-in-group) pairs).
    pub block_rows: usize,
    pub block_keys: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Row blocks per (batch, KV head).
    pub row_blocks: usize,
    /// Chunks the keys of each row block are cut into, one task each, their partial results
    /// combined at the end (flash-decoding): more than 1 only on the few-rows path, when there
    /// are fewer row blocks than cores and enough keys.
    pub key_splits: usize,
    pub tasks: usize,
}

impl Plan {
    pub fn new(p: &AttentionProblem, isa: Isa, amx: bool) -> Plan {
        let group = p.group_size();
        let rows = p.q_len * group;
        let units = p.batch * p.kv_heads;
        let min_tasks = min_tasks();
        let mut block_rows = MAX_BLOCK_ROWS;
        while block_rows > MIN_BLOCK_ROWS && units * rows.div_ceil(block_rows) < min_tasks {
            block_rows /= 2;
        }
        let row_blocks = rows.div_ceil(block_rows);
        let few_rows = block_rows.min(rows) <= FEW_ROWS;
        let amx = amx && !few_rows;
        let row_tasks = p.batch * p.kv_heads * row_blocks;
        let key_splits = if few_rows && row_tasks > 0 && row_tasks < cores() {
            cores()
                .div_ceil(row_tasks)
                .min(p.kv_len / MIN_SPLIT_KEYS)
                .max(1)
        } else {
            1
        };
        Plan {
            isa,
            amx,
            few_rows,
            block_rows,
            block_keys: match (few_rows, amx) {
                (true, _) => FEW_ROWS_BLOCK_KEYS,
                (_, true) => AMX_BLOCK_KEYS,
                _ => BLOCK_KEYS,
            },
            group,
            row_blocks,
            key_splits,
            tasks: row_tasks * key_splits,
        }
    }

    /// Keys of chunk `i` of [`Plan::key_splits`]: whole blocks, the last chunk shorter.
    pub fn key_chunk(&self, i: usize, kv_len: usize) -> std::ops::Range<usize> {
        let size = kv_len
            .div_ceil(self.key_splits)
            .next_multiple_of(self.block_keys);
        (i * size).min(kv_len)..((i + 1) * size).min(kv_len)
    }
}

/// Y's memory shared by all tasks; each task writes only its own rows.
enum OutPtr {
    F32(*mut f32, usize),
    F16(*mut f16, usize),
    BF16(*mut bf16, usize),
}

// SAFETY: tasks write disjoint (batch, head, query) rows of Y (distinct tasks own distinct rows
// and the validated output strides are injective), so sharing the pointer across threads is
// race-free; the buffer outlives `attention`'s `for_each`, which returns only after every task.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

impl OutPtr {
    fn new(out: ElemsMut) -> OutPtr {
        match out {
            ElemsMut::F32(s) => OutPtr::F32(s.as_mut_ptr(), s.len()),
            ElemsMut::F16(s) => OutPtr::F16(s.as_mut_ptr(), s.len()),
            ElemsMut::BF16(s) => OutPtr::BF16(s.as_mut_ptr(), s.len()),
        }
    }

    /// Stores one output row (`row.len()` elements from `off`, `stride` apart), rounding to
    /// the output type.
    fn write_row(&self, off: usize, stride: usize, row: &[f32]) -> Result<()> {
        let n = row.len();
        if n == 0 {
            return Ok(());
        }
        let len = match *self {
            OutPtr::F32(_, l) | OutPtr::F16(_, l) | OutPtr::BF16(_, l) => l,
        };
        if off + (n - 1) * stride >= len {
            return Err(Error::Other(
                "internal error in the CPU attention kernel: output row out of bounds".into(),
            ));
        }
        // SAFETY: in bounds (checked above), and no other task touches this row (see `Sync`).
        unsafe {
            match *self {
                OutPtr::F32(p, _) if stride == 1 => {
                    std::slice::from_raw_parts_mut(p.add(off), n).copy_from_slice(row)
                }
                OutPtr::F16(p, _) if stride == 1 => {
                    convert::store_f16(row, std::slice::from_raw_parts_mut(p.add(off), n))
                }
                OutPtr::BF16(p, _) if stride == 1 => {
                    convert::store_bf16(row, std::slice::from_raw_parts_mut(p.add(off), n))
                }
                OutPtr::F32(p, _) => {
                    for (d, &x) in row.iter().enumerate() {
                        *p.add(off + d * stride) = x;
                    }
                }
                OutPtr::F16(p, _) => {
                    for (d, &x) in row.iter().enumerate() {
                        *p.add(off + d * stride) = f16::from_f32(x);
                    }
                }
                OutPtr::BF16(p, _) => {
                    for (d, &x) in row.iter().enumerate() {
                        *p.add(off + d * stride) = bf16::from_f32(x);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Computes Y for a validated problem. `out` is Y in the problem's output layout.
pub fn attention(
    p: &AttentionProblem,
    inp: &CpuInputs,
    out: ElemsMut,
    par: &dyn ParallelFor,
) -> Result<()> {
    attention_with(p, inp, out, par, Isa::detect())
}

/// [`attention`] with a chosen instruction set (tests use it to cover every code path; an ISA
/// the CPU lacks falls back to the best available one).
pub fn attention_with(
    p: &AttentionProblem,
    inp: &CpuInputs,
    out: ElemsMut,
    par: &dyn ParallelFor,
    isa: Isa,
) -> Result<()> {
    check_buffers(p, inp, out.len(), out.dtype())?;
    let vector = Isa::detect_vector();
    let (isa, amx) = match isa {
        Isa::Portable => (Isa::Portable, false),
        Isa::Avx2 if vector != Isa::Portable => (Isa::Avx2, false),
        #[cfg(target_arch = "x86_64")]
        Isa::Amx if vector == Isa::Avx512 && amx::supported() => (Isa::Avx512, true),
        _ => (vector, false),
    };
    let plan = Plan::new(p, isa, amx);
    if plan.tasks == 0 {
        return Ok(());
    }
    let out = OutPtr::new(out);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    // Runs `f` as task `what` of a parallel pass; a panic here would be a kernel bug, and it
    // must not unwind into ORT's thread pool.
    let guarded = |what: &str, i: usize, f: &dyn Fn() -> Result<()>| {
        let err = match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => Error::Other(format!(
                "internal error in the CPU attention kernel: {what} {i} panicked"
            )),
        };
        if let Ok(mut slot) = failure.lock() {
            slot.get_or_insert(err);
        }
    };
    #[cfg(target_arch = "x86_64")]
    let presplit = presplit::group_units(p, inp, &plan);
    #[cfg(not(target_arch = "x86_64"))]
    let presplit: Option<usize> = None;
    #[cfg(target_arch = "x86_64")]
    if let Some(per_group) = presplit {
        // K and V split once per unit, a group of units at a time, then that group's tasks.
        let units = p.batch * p.kv_heads;
        let mut u0 = 0;
        while u0 < units {
            let u1 = (u0 + per_group).min(units);
            let kv = presplit::KvSplit::new(p, &plan, u0..u1);
            par.for_each(kv.jobs(), &|j| {
                // SAFETY: `group_units` asks for the pre-split only on the AMX path, which
                // `amx::supported()` (AVX-512F/BW/DQ and AMX) allowed.
                guarded("K/V pack", j, &|| unsafe { kv.fill(p, inp, &plan, j) })
            });
            if failure.lock().map_or(true, |f| f.is_some()) {
                break;
            }
            let rb = plan.row_blocks;
            par.for_each((u1 - u0) * rb, &|i| {
                let t = u0 * rb + i;
                let pre = kv.unit(t / rb);
                guarded("task", t, &|| tile::run(&plan, p, inp, &out, t, pre))
            });
            u0 = u1;
        }
    }
    if plan.key_splits > 1 {
        // Each task leaves its chunk's partial result; each row block's are combined after.
        let parts: Vec<Mutex<Option<tile_rows::Partial>>> =
            (0..plan.tasks).map(|_| Mutex::new(None)).collect();
        par.for_each(plan.tasks, &|t| {
            guarded("task", t, &|| {
                let part = tile_rows::run_partial(&plan, p, inp, t)?;
                if let Ok(mut slot) = parts[t].lock() {
                    *slot = Some(part);
                }
                Ok(())
            })
        });
        if failure.lock().is_ok_and(|f| f.is_none()) {
            let parts: Vec<tile_rows::Partial> = parts
                .into_iter()
                .filter_map(|m| m.into_inner().ok().flatten())
                .collect();
            if parts.len() != plan.tasks {
                return Err(Error::Other(
                    "internal error in the CPU attention kernel: a key chunk left no result".into(),
                ));
            }
            for chunks in parts.chunks(plan.key_splits) {
                tile_rows::combine(p, chunks, &out)?;
            }
        }
    } else if presplit.is_none() {
        par.for_each(plan.tasks, &|t| {
            guarded("task", t, &|| tile::run(&plan, p, inp, &out, t, None))
        });
    }
    match failure.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err(Error::Other(
            "internal error in the CPU attention kernel: error slot poisoned".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{validate, AttentionAttrs, ElemType, InputDescs, TensorDesc};

    fn plan(q_len: i64, q_heads: i64, kv_heads: i64, kv_len: i64) -> Plan {
        let t = |h: i64, s: i64| Some(TensorDesc::new(ElemType::F32, &[1, h, s, 64]));
        let inputs = InputDescs {
            q: t(q_heads, q_len),
            k: t(kv_heads, kv_len),
            v: t(kv_heads, kv_len),
            ..Default::default()
        };
        let p = validate(&AttentionAttrs::default(), &inputs).unwrap();
        Plan::new(&p, Isa::Avx512, true)
    }

    /// Decoding (one query, or a GQA group of up to 8 heads over it) takes the few-rows path
    /// and leaves AMX; longer queries keep the tiled paths.
    #[test]
    fn few_rows_path_is_chosen_for_decoding_shapes() {
        for (q_len, q_heads, kv_heads) in [(1, 12, 12), (1, 32, 8), (2, 8, 2), (8, 4, 4)] {
            let pl = plan(q_len, q_heads, kv_heads, 2048);
            assert!(pl.few_rows && !pl.amx, "{q_len} {q_heads}/{kv_heads}");
            assert_eq!(pl.block_keys, FEW_ROWS_BLOCK_KEYS);
        }
        for (q_len, q_heads, kv_heads) in [(9, 4, 4), (1, 32, 2), (64, 12, 12)] {
            let pl = plan(q_len, q_heads, kv_heads, 2048);
            assert!(!pl.few_rows && pl.amx, "{q_len} {q_heads}/{kv_heads}");
        }
    }

    /// With fewer row tasks than cores, a long past is cut into whole-block chunks that cover
    /// every key once; a short one, or a call with enough row tasks, is not.
    #[test]
    fn keys_split_only_where_cores_would_idle() {
        let long = plan(1, 4, 1, 5000);
        if cores() >= 2 {
            assert_eq!(long.key_splits, cores().min(5000 / MIN_SPLIT_KEYS));
        }
        assert_eq!(long.tasks, long.key_splits);
        let mut next = 0;
        for i in 0..long.key_splits {
            let c = long.key_chunk(i, 5000);
            assert_eq!(c.start, next);
            assert!(c.start.is_multiple_of(long.block_keys) && c.end > c.start);
            next = c.end;
        }
        assert_eq!(next, 5000);
        assert_eq!(plan(1, 4, 1, 1500).key_splits, 1);
        assert_eq!(plan(64, 4, 1, 5000).key_splits, 1);
    }
}
