//! The CPU FlashAttention-2 kernel against the naive fp64 reference on randomized problems
//! (proptest): every dtype, layout, attribute and mask kind, GQA/MQA, past K/V, padding and
//! fully masked rows; plus the kernel's error paths.

use flash_ort::attention::cpu::{self, Isa};
use flash_ort::attention::{
    kv_cache, reference, validate, AttentionAttrs, AttentionProblem, CpuInputs, DType, ElemType,
    Elems, ElemsMut, InputDescs, MaskData, Serial, TensorDesc, ThreadScope,
};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

/// What the attention mask looks like.
#[derive(Clone, Copy, Debug)]
enum MaskKindSpec {
    None,
    Bool,
    F32,
    /// Additive, in Q's own type (f16/bf16; f32 for f32 problems).
    SameType,
}

#[derive(Clone, Debug)]
struct Case {
    dtype: DType,
    four_d: bool,
    batch: usize,
    kv_heads: usize,
    group: usize,
    q_len: usize,
    new_kv: usize,
    past: usize,
    d: usize,
    dv: usize,
    causal: bool,
    scale: Option<f32>,
    softcap: f32,
    window: (i64, i64),
    mask: MaskKindSpec,
    /// Per axis of [B, Hq, Sq, Ptot]: true = full size, false = broadcast (1).
    mask_full: [bool; 4],
    mask_rank: usize,
    nonpad: bool,
    magnitude: f32,
    seed: u64,
}

/// Work units (B·Hq·Sq·Ptot·(D+Dv)) one case may cost: the fp64 reference and the unoptimized
/// kernel both run in debug builds.
const BUDGET: usize = 6_000_000;

impl Case {
    fn kv_len(&self) -> usize {
        self.past + self.new_kv
    }
    /// Shrinks sequence lengths until the case fits the budget (keeps shrinking deterministic).
    fn fit(mut self) -> Self {
        let cost =
            |c: &Case| c.batch * c.kv_heads * c.group * c.q_len * c.kv_len().max(1) * (c.d + c.dv);
        while cost(&self) > BUDGET {
            if self.q_len >= self.kv_len() && self.q_len > 1 {
                self.q_len = self.q_len * 3 / 4;
            } else if self.new_kv > 1 {
                self.new_kv = self.new_kv * 3 / 4;
                self.past = self.past * 3 / 4;
            } else if self.past > 0 {
                self.past /= 2;
            } else if self.batch > 1 {
                self.batch -= 1;
            } else {
                break;
            }
        }
        self
    }
}

fn dims() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![8usize, 32, 64, 80, 128, 256])
}

fn case(dtype: DType) -> impl Strategy<Value = Case> {
    let shape = (
        1usize..=3,
        prop::sample::select(vec![1usize, 2, 3]),
        prop::sample::select(vec![1usize, 2, 4]),
        1usize..=300,
        1usize..=300,
        prop_oneof![3 => Just(0usize), 1 => 1usize..=40],
        dims(),
        prop_oneof![2 => Just(None), 1 => dims().prop_map(Some)],
        any::<bool>(),
    );
    let attrs = (
        any::<bool>(),
        prop_oneof![2 => Just(None), 1 => (0.25f32..2.0).prop_map(Some)],
        prop_oneof![3 => Just(0.0f32), 1 => Just(5.0f32), 1 => Just(30.0f32)],
        prop_oneof![3 => Just(-1i64), 1 => 0i64..40],
        prop_oneof![3 => Just(-1i64), 1 => 0i64..40],
        prop_oneof![
            2 => Just(MaskKindSpec::None),
            1 => Just(MaskKindSpec::Bool),
            1 => Just(MaskKindSpec::F32),
            1 => Just(MaskKindSpec::SameType)
        ],
        any::<[bool; 4]>(),
        1usize..=4,
        prop::bool::weighted(0.25),
        prop_oneof![Just(1.0f32), Just(2.0f32)],
        any::<u64>(),
    );
    (shape, attrs).prop_map(move |(s, a)| {
        Case {
            dtype,
            four_d: s.8,
            batch: s.0,
            kv_heads: s.1,
            group: s.2,
            q_len: s.3,
            new_kv: s.4,
            past: s.5,
            d: s.6,
            dv: s.7.unwrap_or(s.6),
            causal: a.0,
            // A multiple of the default 1/√D: realistic logits (std ≲ 3), where fp32's
            // 1e-5 criterion is meaningful.
            scale: a.1.map(|f| f / (s.6 as f32).sqrt()),
            softcap: a.2,
            window: (a.3, a.4),
            mask: a.5,
            mask_full: a.6,
            mask_rank: a.7,
            nonpad: a.8,
            magnitude: a.9,
            seed: a.10,
        }
        .fit()
    })
}

/// A tensor of the problem's element type, kept as raw storage per type.
enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Buf {
    fn from_f32(dtype: DType, x: &[f32]) -> Buf {
        match dtype {
            DType::F32 => Buf::F32(x.to_vec()),
            DType::F16 => Buf::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
            DType::BF16 => Buf::BF16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }
    fn zeros(dtype: DType, n: usize) -> Buf {
        Buf::from_f32(dtype, &vec![0.0; n])
    }
    fn elems(&self) -> Elems<'_> {
        match self {
            Buf::F32(v) => Elems::F32(v),
            Buf::F16(v) => Elems::F16(v),
            Buf::BF16(v) => Elems::BF16(v),
        }
    }
    fn elems_mut(&mut self) -> ElemsMut<'_> {
        match self {
            Buf::F32(v) => ElemsMut::F32(v),
            Buf::F16(v) => ElemsMut::F16(v),
            Buf::BF16(v) => ElemsMut::BF16(v),
        }
    }
    fn to_f64(&self) -> Vec<f64> {
        match self {
            Buf::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Buf::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Buf::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
        }
    }
}

fn elem_type(d: DType) -> ElemType {
    match d {
        DType::F32 => ElemType::F32,
        DType::F16 => ElemType::F16,
        DType::BF16 => ElemType::BF16,
    }
}

/// Owned tensors of one case and the validated problem.
struct Built {
    p: AttentionProblem,
    q: Buf,
    k: Buf,
    v: Buf,
    past_k: Option<Buf>,
    past_v: Option<Buf>,
    mask_bool: Vec<u8>,
    mask_add: Option<Buf>,
    nonpad: Option<Vec<i64>>,
}

impl Built {
    /// Q, K and V as the kernel reads them, with no mask and no nonpad_kv_seqlen.
    fn plain_inputs(&self) -> CpuInputs<'_> {
        CpuInputs {
            q: self.q.elems(),
            k: self.k.elems(),
            k_strides: self.p.k_strides,
            v: self.v.elems(),
            v_strides: self.p.v_strides,
            mask: None,
            nonpad_kv_seqlen: None,
        }
    }
}

fn build(c: &Case) -> Built {
    let mut rng = rand::rngs::StdRng::seed_from_u64(c.seed);
    let hq = c.kv_heads * c.group;
    let (b, sq, skv, ptot) = (c.batch, c.q_len, c.new_kv, c.kv_len());
    let mut rand_vec = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0) * c.magnitude)
            .collect()
    };
    let (qs, ks, vs): (Vec<i64>, Vec<i64>, Vec<i64>) = if c.four_d {
        (
            vec![b as i64, hq as i64, sq as i64, c.d as i64],
            vec![b as i64, c.kv_heads as i64, skv as i64, c.d as i64],
            vec![b as i64, c.kv_heads as i64, skv as i64, c.dv as i64],
        )
    } else {
        (
            vec![b as i64, sq as i64, (hq * c.d) as i64],
            vec![b as i64, skv as i64, (c.kv_heads * c.d) as i64],
            vec![b as i64, skv as i64, (c.kv_heads * c.dv) as i64],
        )
    };
    let numel = |s: &[i64]| s.iter().product::<i64>() as usize;
    let q = Buf::from_f32(c.dtype, &rand_vec(numel(&qs)));
    let k = Buf::from_f32(c.dtype, &rand_vec(numel(&ks)));
    let v = Buf::from_f32(c.dtype, &rand_vec(numel(&vs)));
    let et = elem_type(c.dtype);
    let mut descs = InputDescs {
        q: Some(TensorDesc::new(et, &qs)),
        k: Some(TensorDesc::new(et, &ks)),
        v: Some(TensorDesc::new(et, &vs)),
        ..Default::default()
    };
    let (mut past_k, mut past_v) = (None, None);
    if c.past > 0 {
        let pk = [b as i64, c.kv_heads as i64, c.past as i64, c.d as i64];
        let pv = [b as i64, c.kv_heads as i64, c.past as i64, c.dv as i64];
        past_k = Some(Buf::from_f32(c.dtype, &rand_vec(numel(&pk))));
        past_v = Some(Buf::from_f32(c.dtype, &rand_vec(numel(&pv))));
        descs.past_key = Some(TensorDesc::new(et, &pk));
        descs.past_value = Some(TensorDesc::new(et, &pv));
    }
    // Mask: the trailing `rank` axes of [B, Hq, Sq, Ptot], each full or broadcast.
    let full = [b, hq, sq, ptot];
    let mshape: Vec<i64> = (4 - c.mask_rank..4)
        .map(|ax| if c.mask_full[ax] { full[ax] as i64 } else { 1 })
        .collect();
    let mlen = numel(&mshape);
    let mut mask_bool = Vec::new();
    let mut mask_add = None;
    // Rows of the mask buffer (when Sq is a full axis) that are masked out entirely.
    let dead_row = |idx: usize| c.mask_full[2] && mshape.len() >= 2 && (idx / ptot.max(1)) % 7 == 3;
    match c.mask {
        MaskKindSpec::None => {}
        MaskKindSpec::Bool => {
            mask_bool = (0..mlen)
                .map(|i| u8::from(!dead_row(i) && rng.random_bool(0.75)))
                .collect();
            descs.attn_mask = Some(TensorDesc::new(ElemType::Bool, &mshape));
        }
        MaskKindSpec::F32 | MaskKindSpec::SameType => {
            let vals: Vec<f32> = (0..mlen)
                .map(|i| {
                    if dead_row(i) || rng.random_bool(0.2) {
                        f32::NEG_INFINITY
                    } else {
                        rng.random_range(-3.0f32..3.0)
                    }
                })
                .collect();
            let (dt, et) = match c.mask {
                MaskKindSpec::F32 => (DType::F32, ElemType::F32),
                _ => (c.dtype, et),
            };
            mask_add = Some(Buf::from_f32(dt, &vals));
            descs.attn_mask = Some(TensorDesc::new(et, &mshape));
        }
    }
    let nonpad = c.nonpad.then(|| {
        (0..b)
            .map(|_| rng.random_range(0..=ptot as i64))
            .collect::<Vec<i64>>()
    });
    if nonpad.is_some() {
        descs.nonpad_kv_seqlen = Some(TensorDesc::new(ElemType::I64, &[b as i64]));
    }
    let attrs = AttentionAttrs::from_raw(
        Some(c.causal as i64),
        c.scale,
        (!c.four_d).then_some(hq as i64),
        (!c.four_d).then_some(c.kv_heads as i64),
        Some(c.softcap),
        Some(c.window.0),
        Some(c.window.1),
    )
    .expect("attributes");
    let p = validate(&attrs, &descs).expect("valid case");
    Built {
        p,
        q,
        k,
        v,
        past_k,
        past_v,
        mask_bool,
        mask_add,
        nonpad,
    }
}

/// Runs the kernel (with `isa`) and both references; returns (kernel, fp64, naive-in-dtype).
fn run(c: &Case, isa: Isa, threads: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    run_edited(c, isa, threads, |_| {})
}

/// [`run`] on the case's tensors after `edit` (e.g. a NaN planted in one input).
fn run_edited(
    c: &Case,
    isa: Isa,
    threads: usize,
    edit: impl Fn(&mut Built),
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut bt = build(c);
    edit(&mut bt);
    let p = &bt.p;
    // K/V with past: the kernel reads present = concat(past, new), as the ORT op does.
    let (k_all, v_all, k_strides, v_strides) = if c.past > 0 {
        let mut pk = Buf::zeros(c.dtype, p.batch * p.kv_heads * p.kv_len * p.head_dim);
        let mut pv = Buf::zeros(c.dtype, p.batch * p.kv_heads * p.kv_len * p.v_head_dim);
        kv_cache::concat_into(
            p,
            p.head_dim,
            bt.past_k.as_ref().map(|b| b.elems()),
            bt.k.elems(),
            p.k_strides,
            pk.elems_mut(),
        )
        .expect("concat K");
        kv_cache::concat_into(
            p,
            p.v_head_dim,
            bt.past_v.as_ref().map(|b| b.elems()),
            bt.v.elems(),
            p.v_strides,
            pv.elems_mut(),
        )
        .expect("concat V");
        check_concat(p, &bt, &pk);
        (
            Some(pk),
            Some(pv),
            p.present_strides(p.head_dim),
            p.present_strides(p.v_head_dim),
        )
    } else {
        (None, None, p.k_strides, p.v_strides)
    };
    let mask = match (&bt.mask_add, p.mask.is_some()) {
        (_, false) => None,
        (None, true) => Some(MaskData::Bool(&bt.mask_bool)),
        (Some(Buf::F32(m)), true) => Some(MaskData::F32(m)),
        (Some(Buf::F16(m)), true) => Some(MaskData::F16(m)),
        (Some(Buf::BF16(m)), true) => Some(MaskData::BF16(m)),
    };
    let inp = CpuInputs {
        q: bt.q.elems(),
        k: k_all.as_ref().unwrap_or(&bt.k).elems(),
        k_strides,
        v: v_all.as_ref().unwrap_or(&bt.v).elems(),
        v_strides,
        mask,
        nonpad_kv_seqlen: bt.nonpad.as_deref(),
    };
    let n_out = p.batch * p.q_heads * p.q_len * p.v_head_dim;
    let mut out = Buf::from_f32(c.dtype, &vec![f32::NAN; n_out]);
    let t0 = std::time::Instant::now();
    if threads > 1 {
        cpu::attention_with(p, &inp, out.elems_mut(), &ThreadScope(threads), isa)
    } else {
        cpu::attention_with(p, &inp, out.elems_mut(), &Serial, isa)
    }
    .expect("kernel");
    let t1 = std::time::Instant::now();
    let exact = reference::attention_f64(p, &inp);
    let t2 = std::time::Instant::now();
    let naive = if c.dtype == DType::F32 {
        Vec::new()
    } else {
        reference::attention_in_dtype(p, &inp)
    };
    if std::env::var("CPU_KERNEL_TIMING").is_ok() {
        eprintln!(
            "kernel {:?} f64 {:?} naive {:?}",
            t1 - t0,
            t2 - t1,
            t2.elapsed()
        );
    }
    (out.to_f64(), exact, naive)
}

/// present_key holds past then new keys, per (batch, KV head).
fn check_concat(p: &AttentionProblem, bt: &Built, present: &Buf) {
    let (pres, past, new) = (
        present.to_f64(),
        bt.past_k.as_ref().map(Buf::to_f64),
        bt.k.to_f64(),
    );
    let d = p.head_dim;
    for b in 0..p.batch {
        for h in 0..p.kv_heads {
            for s in 0..p.kv_len {
                for dd in 0..d {
                    let got = pres[((b * p.kv_heads + h) * p.kv_len + s) * d + dd];
                    let want = if s < p.past_len {
                        past.as_ref().expect("past")
                            [((b * p.kv_heads + h) * p.past_len + s) * d + dd]
                    } else {
                        let ks = p.k_strides;
                        new[b * ks[0] + h * ks[1] + (s - p.past_len) * ks[2] + dd * ks[3]]
                    };
                    assert_eq!(got, want, "present_key[{b},{h},{s},{dd}]");
                }
            }
        }
    }
}

fn max_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert!(x.is_finite(), "non-finite output {x}");
            (x - y).abs()
        })
        .fold(0.0, f64::max)
}

fn check(c: &Case, isa: Isa, threads: usize) -> Result<(), TestCaseError> {
    let (got, exact, naive) = run(c, isa, threads);
    let err = max_err(&got, &exact);
    match c.dtype {
        DType::F32 => {
            let tol = 1e-5 * exact.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            prop_assert!(err <= tol, "fp32 error {err:e} > {tol:e} for {c:?}");
        }
        DType::F16 | DType::BF16 => {
            let naive_err = max_err(&naive, &exact);
            // Absolute floor for cases where the naive computation happens to be nearly exact.
            let floor = if c.dtype == DType::F16 { 1e-4 } else { 1e-3 };
            prop_assert!(
                err <= 2.0 * naive_err + floor,
                "{:?} error {err:e} > 2 x naive {naive_err:e} + {floor:e} for {c:?}",
                c.dtype
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn fp32_matches_fp64_reference(c in case(DType::F32)) {
        check(&c, Isa::detect(), 1)?;
    }

    #[test]
    fn fp16_within_twice_naive_fp16_error(c in case(DType::F16)) {
        check(&c, Isa::detect(), 1)?;
    }

    #[test]
    fn bf16_within_twice_naive_bf16_error(c in case(DType::BF16)) {
        check(&c, Isa::detect(), 1)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 100, ..ProptestConfig::default() })]

    /// Every instruction-set path and a threaded run agree with the reference.
    #[test]
    fn every_isa_and_threads(c in case(DType::F32), isa in prop::sample::select(vec![Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Amx])) {
        check(&c, isa, 3)?;
    }

    /// The AMX path (fp32 through bf16 parts) and the AVX-512 path each within 1e-5 of the
    /// fp64 reference on the same problems, whatever `FLASH_ORT_CPU_NO_AMX` says (on a CPU
    /// without AMX both run the vector path).
    #[test]
    fn amx_and_vector_paths(c in case(DType::F32)) {
        check(&c, Isa::Amx, 2)?;
        check(&c, Isa::Avx512, 2)?;
    }
}

/// Decoding shapes: at most 8 query rows per task (query length × GQA group), which the plan
/// sends down the few-rows path (scores row-major), often after a long past.
fn few_rows(dtype: DType) -> impl Strategy<Value = Case> {
    (
        case(dtype),
        1usize..=8,
        prop_oneof![1 => Just(0usize), 2 => 1usize..=600],
    )
        .prop_map(|(c, q, past)| {
            Case {
                q_len: q.min(8 / c.group).max(1),
                past,
                ..c
            }
            .fit()
        })
}

/// Decoding with one K/V head and batch 1 over a long past: fewer row tasks than cores, so
/// on a machine with two or more cores the keys are split across tasks and the chunks'
/// partial results combined (flash-decoding).
fn split_keys(dtype: DType) -> impl Strategy<Value = Case> {
    (
        few_rows(dtype),
        prop::sample::select(vec![8usize, 32, 64]),
        2048usize..=3500,
    )
        .prop_map(|(c, d, past)| {
            Case {
                batch: 1,
                kv_heads: 1,
                d,
                dv: d,
                past,
                new_kv: c.new_kv.min(64),
                ..c
            }
            .fit()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 100, ..ProptestConfig::default() })]

    #[test]
    fn split_keys_fp32_every_isa(c in split_keys(DType::F32), isa in prop::sample::select(vec![Isa::Portable, Isa::Avx2, Isa::Avx512])) {
        check(&c, isa, 2)?;
    }

    #[test]
    fn split_keys_fp16(c in split_keys(DType::F16)) {
        check(&c, Isa::detect(), 2)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 100, ..ProptestConfig::default() })]

    /// The few-rows path on every instruction set, fp32, with every attribute and mask kind.
    #[test]
    fn few_rows_fp32_every_isa(c in few_rows(DType::F32), isa in prop::sample::select(vec![Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Amx])) {
        check(&c, isa, 2)?;
    }

    #[test]
    fn few_rows_fp16(c in few_rows(DType::F16)) {
        check(&c, Isa::detect(), 1)?;
    }

    #[test]
    fn few_rows_bf16(c in few_rows(DType::BF16)) {
        check(&c, Isa::detect(), 1)?;
    }
}

/// Worst fp32 error against fp64 of both paths on S = 1024 problems (printed with
/// `--nocapture`): the AMX path's bf16 splitting keeps the error at the vector path's level.
#[test]
fn amx_error_level_matches_fp32() {
    let big = Case {
        q_len: 1024,
        new_kv: 1024,
        kv_heads: 1,
        group: 2,
        ..base()
    };
    for c in [
        big.clone(),
        Case {
            magnitude: 2.0,
            d: 128,
            dv: 128,
            q_len: 512,
            ..big.clone()
        },
        Case {
            causal: true,
            mask: MaskKindSpec::F32,
            ..big
        },
    ] {
        let mut errs = Vec::new();
        for isa in [Isa::Amx, Isa::Avx512] {
            let (got, exact, _) = run(&c, isa, 2);
            let err = max_err(&got, &exact);
            let tol = 1e-5 * exact.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            assert!(err <= tol, "{isa:?}: {err:e} > {tol:e}");
            errs.push(err);
        }
        println!(
            "max |error| vs fp64: AMX {:e}, AVX-512 {:e}",
            errs[0], errs[1]
        );
        // Same order of magnitude as fp32 FMAs (not bf16's 1e-3).
        assert!(errs[0] <= 4.0 * errs[1] + 1e-7, "{errs:?}");
    }
}

/// A NaN in Q, K or V reaches exactly the outputs it reaches on the AVX-512 path (never a
/// silently finite value), on every path.
#[test]
fn nan_inputs_propagate_like_the_vector_path() {
    let c = Case {
        q_len: 40,
        new_kv: 150,
        ..base()
    };
    let plant = |which: usize, at: usize| {
        move |bt: &mut Built| {
            let buf = match which {
                0 => &mut bt.q,
                1 => &mut bt.k,
                _ => &mut bt.v,
            };
            if let Buf::F32(x) = buf {
                x[at] = f32::NAN;
            }
        }
    };
    for (which, at) in [
        (0, 5 * 64 + 3),
        (1, 70 * 64 + 9),
        (2, 100 * 64 + 17),
        (1, 0),
    ] {
        let nans = |isa: Isa| -> Vec<bool> {
            let (y, _, _) = run_edited(&c, isa, 1, plant(which, at));
            y.iter().map(|x| x.is_nan()).collect()
        };
        let nan_vec = nans(Isa::Avx512);
        assert!(
            nan_vec.iter().any(|&x| x),
            "input {which}: no NaN output at all"
        );
        for isa in [Isa::Amx, Isa::Avx2, Isa::Portable] {
            assert_eq!(nans(isa), nan_vec, "{isa:?}: input {which} at {at}");
        }
    }
}

/// A plain case as a starting point for targeted tests.
fn base() -> Case {
    Case {
        dtype: DType::F32,
        four_d: true,
        batch: 1,
        kv_heads: 2,
        group: 2,
        q_len: 70,
        new_kv: 130,
        past: 0,
        d: 64,
        dv: 64,
        causal: false,
        scale: None,
        softcap: 0.0,
        window: (-1, -1),
        mask: MaskKindSpec::None,
        mask_full: [true; 4],
        mask_rank: 4,
        nonpad: false,
        magnitude: 1.0,
        seed: 7,
    }
}

#[test]
fn targeted_shapes() {
    let cases = vec![
        // Causal with Sq > Skv: the first queries see no key and must be zero.
        Case {
            causal: true,
            q_len: 150,
            new_kv: 40,
            ..base()
        },
        // Decode: one query against a long cache, MQA.
        Case {
            q_len: 1,
            new_kv: 1,
            past: 290,
            kv_heads: 1,
            group: 4,
            ..base()
        },
        // Windows narrower than a tile, both sides.
        Case {
            window: (3, 2),
            q_len: 200,
            new_kv: 200,
            ..base()
        },
        // All keys padded away for every batch (nonpad = 0 drawn from seed is not guaranteed:
        // a fully masked bool mask is).
        Case {
            mask: MaskKindSpec::Bool,
            mask_full: [true, true, true, true],
            ..base()
        },
        // Odd head sizes, Dv ≠ D.
        Case {
            d: 80,
            dv: 8,
            four_d: false,
            ..base()
        },
        Case {
            d: 256,
            dv: 32,
            softcap: 5.0,
            scale: Some(0.5),
            ..base()
        },
    ];
    for c in cases {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            check(&Case { dtype, ..c.clone() }, Isa::detect(), 2).unwrap();
        }
    }
}

/// Enough rows per KV head for the kernel's 256- and 128-row tiles (it shrinks tiles only to
/// keep 16 tasks), each with a partial last tile: unmasked (the GEMM's column maxima, unclamped
/// exponentials), causal with queries that see no key, and a float mask (clamped exponentials).
#[test]
fn large_query_tiles() {
    let cases = vec![
        Case {
            q_len: 4200,
            new_kv: 150,
            kv_heads: 1,
            group: 1,
            ..base()
        },
        Case {
            q_len: 1000,
            new_kv: 300,
            kv_heads: 1,
            group: 2,
            causal: true,
            ..base()
        },
        Case {
            q_len: 2100,
            new_kv: 100,
            kv_heads: 1,
            group: 2,
            mask: MaskKindSpec::F32,
            ..base()
        },
    ];
    for c in cases {
        for isa in [Isa::detect(), Isa::Portable] {
            check(&c, isa, 2).unwrap();
        }
    }
}

/// Long K/V: the AMX path splits K and V once per (batch, KV head) before the query tiles,
/// a few units at a time so that the packs stay under their memory budget (here 12.6 MB per
/// unit, two units per group), with a partial last key block; plus padding (tasks that stop inside
/// the pre-split blocks) and causal (tasks that use only some of them).
#[test]
fn presplit_kv_in_groups() {
    let long = Case {
        q_len: 130,
        new_kv: 16_384 + 37,
        kv_heads: 3,
        group: 1,
        ..base()
    };
    let cases = vec![
        long.clone(),
        Case {
            batch: 2,
            kv_heads: 2,
            nonpad: true,
            ..long.clone()
        },
        Case {
            q_len: 300,
            new_kv: 1000,
            causal: true,
            ..long
        },
    ];
    for c in cases {
        check(&c, Isa::Amx, 2).unwrap();
    }
}

#[test]
fn causal_rows_before_the_first_key_are_zero() {
    let c = Case {
        causal: true,
        q_len: 100,
        new_kv: 30,
        ..base()
    };
    let (got, _, _) = run(&c, Isa::detect(), 1);
    // Query i sees keys j ≤ i − 70: rows 0..70 see nothing.
    let dv = c.dv;
    for h in 0..4 {
        for i in 0..70 {
            let row = &got[(h * 100 + i) * dv..(h * 100 + i + 1) * dv];
            assert!(row.iter().all(|&x| x == 0.0), "head {h} row {i} not zero");
        }
    }
}

#[test]
fn short_buffers_and_type_mismatches_are_errors_not_panics() {
    let bt = build(&base());
    let p = &bt.p;
    let inp = bt.plain_inputs();
    let n_out = p.batch * p.q_heads * p.q_len * p.v_head_dim;
    let mut short = vec![0.0f32; n_out - 1];
    let err = cpu::attention(p, &inp, ElemsMut::F32(&mut short), &Serial).unwrap_err();
    assert!(err.to_string().contains("output Y"), "{err}");
    let mut wrong = vec![f16::ZERO; n_out];
    assert!(cpu::attention(p, &inp, ElemsMut::F16(&mut wrong), &Serial).is_err());
    let Buf::F32(k) = &bt.k else { unreachable!() };
    let short_k = CpuInputs {
        k: Elems::F32(&k[..k.len() - 1]),
        ..inp
    };
    let mut out = vec![0.0f32; n_out];
    let err = cpu::attention(p, &short_k, ElemsMut::F32(&mut out), &Serial).unwrap_err();
    assert!(err.to_string().contains("input K"), "{err}");
    let with_mask = CpuInputs {
        mask: Some(MaskData::Bool(&[1])),
        ..inp
    };
    assert!(cpu::attention(p, &with_mask, ElemsMut::F32(&mut out), &Serial).is_err());
    let bad_nonpad = [1000i64];
    let with_nonpad = CpuInputs {
        nonpad_kv_seqlen: Some(&bad_nonpad),
        ..inp
    };
    assert!(cpu::attention(p, &with_nonpad, ElemsMut::F32(&mut out), &Serial).is_err());
}

/// `cargo test --release --test cpu_kernel speed_by_dtype -- --ignored --nocapture`: one-thread
/// speed of the AMX and AVX-512 paths per input type (256 queries × `SPEED_S` keys, default
/// 4096, D = 64), fastest of many runs.
#[test]
#[ignore]
fn speed_by_dtype() {
    // One task (256 queries against S keys) timed many times: the minimum is the machine's
    // quiet moments, which other jobs on the host rarely leave for a whole long run.
    let s: usize = std::env::var("SPEED_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let reps = 20 + (400 * 4096 / s).min(2000);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let c = Case {
            dtype,
            q_len: 256,
            new_kv: s,
            kv_heads: 1,
            group: 1,
            ..base()
        };
        let bt = build(&c);
        let p = &bt.p;
        let inp = bt.plain_inputs();
        let n_out = p.batch * p.q_heads * p.q_len * p.v_head_dim;
        let mut out = Buf::zeros(dtype, n_out);
        let flops = 4.0 * (p.q_heads * p.q_len * p.kv_len * p.head_dim) as f64;
        let mut line = format!("{dtype:?}:");
        for isa in [Isa::Amx, Isa::Avx512] {
            let best = (0..reps)
                .map(|_| {
                    let t = std::time::Instant::now();
                    cpu::attention_with(p, &inp, out.elems_mut(), &Serial, isa).unwrap();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            line += &format!(" {isa:?} {:.1} GFLOP/s", flops / best / 1e9);
        }
        println!("{line}");
    }
}
