//! fp32 K and V split into bf16 parts once per (batch, KV head), for every query tile of the
//! AMX path to share.
//!
//! Without this, every task (one query tile) splits and packs each K and V block it visits
//! itself: at S = 4096 with 256-row tiles each block is split 16 times, and that splitting was
//! about a sixth of a task's time. Here a first parallel pass packs every block of a group of
//! (batch, KV head) units once ([`split::pack_a_rows`] for K, [`split::pack_a_cols`] for V,
//! exactly what the tasks would have made), then the tasks of those units read the packs.
//! Units go in groups whose packs stay under [`BUDGET`] bytes, so the extra memory is bounded
//! whatever S is (three bf16 parts are 1.5× the fp32 bytes of K and V).

use super::amx::TILE_WORDS;
use super::split::{self, APack};
use super::Plan;
use crate::attention::{AttentionProblem, CpuInputs, Elems};
use crate::{Error, Result};
use std::ops::Range;
use std::sync::OnceLock;

/// Most bytes of packs alive at once (one group of units).
const BUDGET: usize = 32 << 20;

/// The K and V packs of one key block.
pub type BlockPacks = (APack, APack);

/// The packs of a group of units: block `i` of unit `u` at `(u − units.start)·blocks + i`.
pub struct KvSplit {
    pub units: Range<usize>,
    blocks: usize,
    packs: Vec<OnceLock<BlockPacks>>,
}

/// Units per group when the AMX path should pre-split K and V: fp32 K and V with unit inner
/// stride (the tasks' in-place case) and each unit's blocks read by at least two query tiles.
pub fn group_units(p: &AttentionProblem, inp: &CpuInputs, plan: &Plan) -> Option<usize> {
    let f32_rows = |e: Elems, s: [usize; 4]| matches!(e, Elems::F32(_)) && s[3] == 1;
    if !plan.amx
        || plan.row_blocks < 2
        || p.kv_len == 0
        || !f32_rows(inp.k, inp.k_strides)
        || !f32_rows(inp.v, inp.v_strides)
    {
        return None;
    }
    let blocks = p.kv_len.div_ceil(plan.block_keys);
    let ((km, kk), (vm, vk)) = (k_dims(p, plan), v_dims(p, plan));
    // Three parts of u16 words.
    let unit_bytes = blocks * 3 * 2 * TILE_WORDS * (km * kk + vm * vk);
    Some((BUDGET / unit_bytes.max(1)).max(1))
}

/// (row tiles, k chunks) of a K block's pack (keys × head dim) and of a V block's (Vᵀ: head
/// dim × keys), as the tasks make them.
fn k_dims(p: &AttentionProblem, plan: &Plan) -> (usize, usize) {
    (plan.block_keys.div_ceil(16), p.head_dim.div_ceil(32))
}

fn v_dims(p: &AttentionProblem, plan: &Plan) -> (usize, usize) {
    (p.v_head_dim.div_ceil(16), plan.block_keys.div_ceil(32))
}

impl KvSplit {
    pub fn new(p: &AttentionProblem, plan: &Plan, units: Range<usize>) -> KvSplit {
        let blocks = p.kv_len.div_ceil(plan.block_keys);
        KvSplit {
            blocks,
            packs: (0..units.len() * blocks).map(|_| OnceLock::new()).collect(),
            units,
        }
    }

    /// Number of pack jobs ([`KvSplit::fill`] takes `0..jobs()`).
    pub fn jobs(&self) -> usize {
        self.packs.len()
    }

    /// Packs job `j`: one K and one V block.
    ///
    /// # Safety
    /// [`super::amx::supported`] must be true (AVX-512F/BW/DQ).
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
    pub unsafe fn fill(
        &self,
        p: &AttentionProblem,
        inp: &CpuInputs,
        plan: &Plan,
        j: usize,
    ) -> Result<()> {
        let (Elems::F32(k), Elems::F32(v)) = (inp.k, inp.v) else {
            return Err(internal("K or V is not fp32"));
        };
        let slot = self
            .packs
            .get(j)
            .ok_or_else(|| internal("job out of range"))?;
        let (u, i) = (self.units.start + j / self.blocks, j % self.blocks);
        let (b, kvh) = (u / p.kv_heads, u % p.kv_heads);
        let bc = plan.block_keys;
        let j0 = i * bc;
        let nk = bc.min(p.kv_len - j0);
        let (ks, vs) = (inp.k_strides, inp.v_strides);
        let ((km, kk), (vm, vk)) = (k_dims(p, plan), v_dims(p, plan));
        let mut kp = APack::new(3, km, kk);
        split::pack_a_rows(
            &mut kp,
            k,
            b * ks[0] + kvh * ks[1] + j0 * ks[2],
            ks[2],
            nk,
            p.head_dim,
        )?;
        let mut vp = APack::new(3, vm, vk);
        split::pack_a_cols(
            &mut vp,
            v,
            b * vs[0] + kvh * vs[1] + j0 * vs[2],
            vs[2],
            p.v_head_dim,
            nk,
        )?;
        slot.set((kp, vp))
            .map_err(|_| internal("block packed twice"))
    }

    /// The packs of unit `u` (block `i` at index `i`; a block not packed is `None`).
    pub fn unit(&self, u: usize) -> Option<&[OnceLock<BlockPacks>]> {
        let r = u.checked_sub(self.units.start)?;
        self.packs.get(r * self.blocks..(r + 1) * self.blocks)
    }
}

fn internal(what: &str) -> Error {
    Error::Other(format!(
        "internal error in the CPU attention kernel (K/V pre-split): {what}"
    ))
}
