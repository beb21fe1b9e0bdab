//! The CUDA kernels against the fp64 oracle (`attention::reference`), on randomized cases:
//! every feature (GQA, masks, windows, causal, softcap, padding, past K/V, 3D/4D, fp32/fp16/bf16,
//! odd head sizes), decode shapes, long sequences and many heads. Compiles with `--features
//! cuda` everywhere; on a machine without a GPU each test notes that and passes.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use flash_ort::attention::{DType, ElemType};
use flash_ort::{cuda, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Runs one case, returns the comparison; panics with the case on any failure.
fn check(g: &Gpu, c: &Case, rng: &mut StdRng) -> Compared {
    let inp = make_inputs(c, rng);
    check_inputs(g, c, inp, rng)
}

/// `check` with inputs already made (and possibly edited, e.g. a mask pattern).
fn check_inputs(g: &Gpu, c: &Case, inp: Inputs, rng: &mut StdRng) -> Compared {
    let dev = upload(g, &inp);
    run(g, &inp, &dev).unwrap_or_else(|e| panic!("launch failed: {e}\n{}", c.describe()));
    g.stream.synchronize().expect("kernel execution");
    let out = decode(inp.p.dtype, &g.stream.clone_dtoh(&dev.out).unwrap());
    if inp.p.has_past {
        // present_key/value must equal past ++ new exactly.
        for (key, buf) in [(true, &dev.present_k), (false, &dev.present_v)] {
            let want = host_present(&inp, key).bytes();
            let got = g.stream.clone_dtoh(buf.as_ref().unwrap()).unwrap();
            assert!(
                got == want,
                "present_{} differs\n{}",
                if key { "key" } else { "value" },
                c.describe()
            );
        }
    }
    let r = compare(c, &inp, &out, rng);
    let (max_tol, rel_tol) = tolerance(c.dtype);
    assert!(
        r.nan_or_unwritten == 0 && r.max_abs <= max_tol && r.rel_l2 <= rel_tol,
        "mismatch {r:?} (tolerance max {max_tol}, rel {rel_tol})\n{}",
        c.describe()
    );
    r
}

fn random_case(rng: &mut StdRng) -> Case {
    let dtype = [DType::F16, DType::BF16, DType::F32][rng.random_range(0..3)];
    let hkv = [1, 2, 3][rng.random_range(0..3)];
    let group = [1, 2, 4][rng.random_range(0..3)];
    let d = [8, 32, 40, 64, 80, 96, 128, 160, 192, 256][rng.random_range(0..10)];
    let mut c = Case::plain(
        dtype,
        rng.random_range(1..=2),
        hkv * group,
        hkv,
        rng.random_range(1..=200),
        rng.random_range(1..=300),
        d,
    );
    c.four_d = rng.random_bool(0.5);
    if rng.random_bool(0.2) {
        c.dv = [32, 64, 128][rng.random_range(0..3)];
    }
    c.causal = rng.random_bool(0.4);
    if rng.random_bool(0.3) {
        c.window_left = rng.random_range(0..100);
    }
    if rng.random_bool(0.2) {
        c.window_right = rng.random_range(0..50);
    }
    if rng.random_bool(0.25) {
        c.softcap = rng.random_range(5.0f32..30.0);
    }
    if rng.random_bool(0.2) {
        c.scale = Some(rng.random_range(0.02f32..0.3));
    }
    if rng.random_bool(0.3) {
        c.past = rng.random_range(1..=200);
    }
    let ptot = (c.skv + c.past) as i64;
    let (b, h, s) = (c.b as i64, c.hq as i64, c.sq as i64);
    let shapes = [
        vec![b, h, s, ptot],
        vec![b, 1, 1, ptot],
        vec![s, ptot],
        vec![1, h, s, ptot],
        vec![ptot],
    ];
    let shape = shapes[rng.random_range(0..shapes.len())].clone();
    c.mask = match rng.random_range(0..4) {
        0 => MaskSpec::Bool(shape),
        1 => MaskSpec::Add(ElemType::F32, shape),
        2 if dtype != DType::F32 => MaskSpec::Add(
            if dtype == DType::F16 {
                ElemType::F16
            } else {
                ElemType::BF16
            },
            shape,
        ),
        _ => MaskSpec::None,
    };
    c.nonpad = rng.random_bool(0.25);
    c
}

#[test]
fn cuda_random_cases_match_oracle() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(0xF1A5);
    let n = std::env::var("FLASH_ORT_CUDA_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let mut skipped = 0;
    for _ in 0..n {
        let c = random_case(&mut rng);
        let inp = make_inputs(&c, &mut rng);
        // Head size 8 rounds up to 32; anything else must be served.
        match cuda::scratch_bytes(&inp.p, 0) {
            Err(Error::NotImplemented(m)) => {
                skipped += 1;
                eprintln!("not implemented (allowed only for unusual sizes): {m}");
                assert!(c.d > 256 || c.dv > 256, "{m}\n{}", c.describe());
                continue;
            }
            Err(e) => panic!("{e}"),
            Ok(_) => {}
        }
        check(&g, &c, &mut rng);
    }
    eprintln!("{n} random cases, {skipped} not implemented");
}

#[test]
fn cuda_features_one_by_one() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    for dtype in [DType::F16, DType::BF16] {
        let base = Case::plain(dtype, 2, 8, 2, 100, 173, 64);
        let mut cases = vec![base.clone()];
        cases.push(Case {
            causal: true,
            ..base.clone()
        });
        cases.push(Case {
            causal: true,
            sq: 300,
            skv: 120,
            ..base.clone()
        }); // rows with no key
        cases.push(Case {
            window_left: 16,
            window_right: 4,
            ..base.clone()
        });
        cases.push(Case {
            softcap: 10.0,
            ..base.clone()
        });
        cases.push(Case {
            nonpad: true,
            ..base.clone()
        });
        cases.push(Case {
            past: 77,
            causal: true,
            ..base.clone()
        });
        cases.push(Case {
            four_d: false,
            ..base.clone()
        });
        cases.push(Case {
            mask: MaskSpec::Bool(vec![2, 8, 100, 173]),
            ..base.clone()
        });
        cases.push(Case {
            mask: MaskSpec::Add(ElemType::F32, vec![2, 1, 1, 173]),
            ..base.clone()
        });
        cases.push(Case {
            d: 128,
            dv: 64,
            ..base.clone()
        });
        for c in cases {
            check(&g, &c, &mut rng);
        }
    }
}

#[test]
fn cuda_decode_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    for (b, skv) in [(1, 1), (1, 777), (4, 8192), (1, 65536), (8, 8192)] {
        for dtype in [DType::F16, DType::BF16] {
            let mut c = Case::plain(dtype, b, 32, 8, 1, skv, 128);
            c.sample_rows = Some(64);
            c.nonpad = skv > 1000;
            check(&g, &c, &mut rng);
        }
    }
    // Stream-K decode on Hopper: pairs whose KV blocks spread over many CTAs and CTAs that
    // cross pairs (with padding lengths cutting pieces short or empty), MQA and D = 64.
    for (b, hq, hkv, skv, d) in [
        (3, 4, 1, 40000, 64),
        (8, 4, 2, 2500, 128),
        (5, 8, 8, 3000, 64),
    ] {
        let mut c = Case::plain(DType::BF16, b, hq, hkv, 1, skv, d);
        c.sample_rows = Some(64);
        c.nonpad = true;
        check(&g, &c, &mut rng);
        let mut c = Case::plain(DType::F16, b, hq, hkv, 1, skv, d);
        c.mask = MaskSpec::Bool(vec![b as i64, 1, 1, skv as i64]);
        check(&g, &c, &mut rng);
    }
    // Decode with a KV cache (past) and a padding mask.
    let mut c = Case::plain(DType::F16, 2, 16, 4, 1, 1, 128);
    c.past = 3000;
    c.mask = MaskSpec::Bool(vec![2, 1, 1, 3001]);
    check(&g, &c, &mut rng);
}

#[test]
fn cuda_long_and_wide() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(13);
    // S = 32k, causal, sampled rows.
    for dtype in [DType::F16, DType::BF16] {
        let mut c = Case::plain(dtype, 1, 4, 2, 32768, 32768, 128);
        c.causal = true;
        c.sample_rows = Some(24);
        check(&g, &c, &mut rng);
    }
    // B·H = 256.
    let mut c = Case::plain(DType::F16, 8, 32, 32, 384, 384, 64);
    c.sample_rows = Some(200);
    check(&g, &c, &mut rng);
    let mut c = Case::plain(DType::BF16, 16, 16, 4, 200, 1500, 256);
    c.sample_rows = Some(100);
    c.causal = true;
    check(&g, &c, &mut rng);
}

/// More tiles than an H100/H200 has SMs (132), so prefill runs the persistent warp-specialized
/// kernel (one CTA per SM walking tiles, Q by TMA): batches with no keys at all (tiles with no
/// blocks in the middle of a CTA's walk), key-padding masks, GQA groups that divide the row block
/// and one that does not (the fallback), a padded head size, 3D layouts, Sq != Skv. Causal and
/// window cases run persistent only under FLASH_ORT_PERSISTENT=2 (the device script runs the
/// suite that way too).
#[test]
fn cuda_persistent_tiles() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(19);
    let mut cases = Vec::new();
    for (dtype, d) in [(DType::F16, 64), (DType::BF16, 128)] {
        let mut c = Case::plain(dtype, 4, 16, 8, 1000, 1000, d);
        c.nonpad = true;
        c.sample_rows = Some(160);
        cases.push((c.clone(), Some(vec![0i64, 1000, 517, 129])));
        let mut m = c.clone();
        m.nonpad = false;
        m.four_d = false;
        m.mask = MaskSpec::Add(ElemType::F16, vec![4, 1, 1, 1000]);
        if dtype == DType::BF16 {
            m.mask = MaskSpec::Bool(vec![4, 1, 1, 1000]);
        }
        cases.push((m, None));
        let mut causal = c.clone();
        causal.nonpad = false;
        causal.causal = true;
        causal.sq = 600;
        causal.skv = 900;
        cases.push((causal, None));
        let mut win = c.clone();
        win.nonpad = false;
        win.window_left = 100;
        win.window_right = 20;
        cases.push((win, None));
    }
    // Group 5 does not divide 128 or 192 rows: Q cannot be one TMA box, the plain grid runs.
    let mut c = Case::plain(DType::F16, 4, 10, 2, 1500, 700, 64);
    c.sample_rows = Some(160);
    cases.push((c, None));
    // Head size 48 in the 64 kernel (columns past d are zeros in Q, K and V), group 4.
    let mut c = Case::plain(DType::BF16, 3, 16, 4, 800, 800, 48);
    c.sample_rows = Some(160);
    c.nonpad = true;
    cases.push((c, Some(vec![800, 0, 401])));
    for (c, nonpad) in cases {
        let mut inp = make_inputs(&c, &mut rng);
        if nonpad.is_some() {
            inp.nonpad = nonpad;
        }
        check_inputs(&g, &c, inp, &mut rng);
    }
}

#[test]
fn cuda_errors_are_results() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(17);
    // Head size above every instantiation: NotImplemented, not a crash.
    let c = Case::plain(DType::F16, 1, 2, 2, 4, 4, 320);
    let inp = make_inputs(&c, &mut rng);
    match cuda::scratch_bytes(&inp.p, 0) {
        Err(Error::NotImplemented(m)) => assert!(m.contains("320"), "{m}"),
        other => panic!("expected NotImplemented, got {other:?}"),
    }
    // Head size not a multiple of 8.
    let c = Case::plain(DType::F16, 1, 2, 2, 4, 4, 12);
    let inp = make_inputs(&c, &mut rng);
    assert!(matches!(
        cuda::scratch_bytes(&inp.p, 0),
        Err(Error::NotImplemented(_))
    ));
    // Too little scratch: an error before anything is enqueued.
    let c = Case::plain(DType::F32, 1, 2, 2, 4, 4, 64);
    let inp = make_inputs(&c, &mut rng);
    let mut dev = upload(&g, &inp);
    dev.scratch = g.stream.clone_htod(&[0u8; 16]).unwrap();
    match run(&g, &inp, &dev) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("scratch"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // A device that does not exist.
    assert!(matches!(
        cuda::scratch_bytes(&inp.p, 4096),
        Err(Error::Device(_))
    ));
}

/// Refills a case's mask: the element at mask coordinates (b, h, i, key) (the mask's own shape
/// padded to rank 4, broadcast axes at 0) is visible or not per `visible`; visible additive
/// values are random in [-3, 1), hidden ones `hidden(b)` (-inf, or a large finite negative
/// such as f32::MIN that the kernel must not overflow on); bool masks get true / false.
fn set_mask(
    inp: &mut Inputs,
    c: &Case,
    visible: impl Fn(usize, usize, usize, usize) -> bool,
    hidden: impl Fn(usize) -> f32,
    rng: &mut StdRng,
) {
    let (kind, shape) = match &c.mask {
        MaskSpec::Bool(sh) => (None, sh),
        MaskSpec::Add(t, sh) => (Some(*t), sh),
        MaskSpec::None => panic!("set_mask on a case without a mask"),
    };
    let mut dims = [1usize; 4];
    for (d, &n) in dims[4 - shape.len()..].iter_mut().zip(shape) {
        *d = n as usize;
    }
    let len: usize = dims.iter().product();
    let coords = |f: usize| {
        let k = f % dims[3];
        let i = f / dims[3] % dims[2];
        let h = f / (dims[3] * dims[2]) % dims[1];
        let b = f / (dims[3] * dims[2] * dims[1]);
        (b, h, i, k)
    };
    inp.mask = Some(match kind {
        None => HostMask::Bool(
            (0..len)
                .map(|f| {
                    let (b, h, i, k) = coords(f);
                    visible(b, h, i, k) as u8
                })
                .collect(),
        ),
        Some(t) => {
            let vals: Vec<f32> = (0..len)
                .map(|f| {
                    let (b, h, i, k) = coords(f);
                    if visible(b, h, i, k) {
                        rng.random_range(-3.0f32..1.0)
                    } else {
                        hidden(b)
                    }
                })
                .collect();
            match t {
                ElemType::F32 => HostMask::F32(vals),
                ElemType::F16 => HostMask::Half(HostTensor::from_f32(DType::F16, &vals)),
                _ => HostMask::Half(HostTensor::from_f32(DType::BF16, &vals)),
            }
        }
    });
}

/// The mask element types a problem of `dtype` can take: bool, f32 and its own half type.
fn mask_kinds(dtype: DType, shape: &[i64]) -> Vec<MaskSpec> {
    let mut v = vec![
        MaskSpec::Bool(shape.to_vec()),
        MaskSpec::Add(ElemType::F32, shape.to_vec()),
    ];
    match dtype {
        DType::F16 => v.push(MaskSpec::Add(ElemType::F16, shape.to_vec())),
        DType::BF16 => v.push(MaskSpec::Add(ElemType::BF16, shape.to_vec())),
        DType::F32 => {}
    }
    v
}

/// The most negative finite value of a mask element type (what exporters write for "masked",
/// e.g. torch.finfo(dtype).min): adding it must not overflow the softmax.
fn lowest(spec: &MaskSpec) -> f32 {
    match spec {
        MaskSpec::Add(ElemType::F16, _) => -65504.0,
        MaskSpec::Add(ElemType::BF16, _) => half::bf16::MIN.to_f32(),
        _ => f32::MIN,
    }
}

/// Key-padding masks ([B, 1, 1, T] and broadcast forms), the staged-bias path: BERT-style
/// prefixes per batch (one batch fully masked: zeros), with causal, windows, past K/V,
/// nonpad, softcap (general path), GQA, every head size, decode and split-KV.
#[test]
fn cuda_key_padding_masks() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(29);
    // Keys kept per batch: all, a prefix ending inside a KV block, none (its rows give zeros),
    // a prefix ending on a 64-key block edge.
    let lens = [usize::MAX, 77, 0, 64];
    // Masked keys: the type's lowest finite value where each row keeps a visible key, else
    // -inf: a row whose keys are all finitely masked gets a uniform softmax in fp32 (the scores
    // vanish next to the bias) but the fp64 oracle keeps them. That is the fully masked batch,
    // and with a window (rows whose window lies past their batch's prefix) every batch.
    let hidden = |spec: &MaskSpec, c: &Case| {
        let low = if c.window_left < 0 {
            lowest(spec)
        } else {
            f32::NEG_INFINITY
        };
        move |b: usize| if b == 2 { f32::NEG_INFINITY } else { low }
    };
    // Runs `c` with `spec` as its mask, keeping the first lens[b] keys of batch b.
    let check_prefix = |mut c: Case, spec: &MaskSpec, lens: &[usize], rng: &mut StdRng| {
        c.mask = spec.clone();
        let mut inp = make_inputs(&c, rng);
        set_mask(
            &mut inp,
            &c,
            |b, _, _, k| k < lens[b],
            hidden(spec, &c),
            rng,
        );
        check_inputs(&g, &c, inp, rng);
    };
    for dtype in [DType::F16, DType::BF16] {
        for d in [64, 128] {
            for skv in [200, 384] {
                let base = Case::plain(dtype, 4, 4, 2, 150, skv, d);
                for spec in mask_kinds(dtype, &[4, 1, 1, skv as i64]) {
                    let variants = [
                        base.clone(),
                        Case {
                            causal: true,
                            ..base.clone()
                        },
                        Case {
                            causal: true,
                            sq: skv,
                            ..base.clone()
                        },
                        Case {
                            window_left: 40,
                            window_right: 8,
                            ..base.clone()
                        },
                        Case {
                            nonpad: true,
                            ..base.clone()
                        },
                        Case {
                            softcap: 12.0,
                            ..base.clone()
                        },
                        Case {
                            four_d: false,
                            ..base.clone()
                        },
                    ];
                    for c in variants {
                        check_prefix(c, &spec, &lens, &mut rng);
                    }
                }
            }
        }
    }
    // Other head sizes (other tile shapes: 32-key blocks at D = 256), with causal and past.
    for d in [32, 96, 192, 256] {
        for spec in mask_kinds(DType::F16, &[4, 1, 1, 290]) {
            let mut c = Case::plain(DType::F16, 4, 4, 4, 90, 200, d);
            c.past = 90;
            c.causal = true;
            check_prefix(c, &spec, &lens, &mut rng);
        }
    }
    // One mask row for every batch: rank 1 [T] and [1, 1, 1, T], random and prefix patterns.
    for shape in [vec![300i64], vec![1, 1, 1, 300]] {
        for spec in mask_kinds(DType::BF16, &shape) {
            let mut c = Case::plain(DType::BF16, 2, 4, 4, 130, 300, 64);
            c.mask = spec.clone();
            check(&g, &c, &mut rng);
            let mut inp = make_inputs(&c, &mut rng);
            set_mask(
                &mut inp,
                &c,
                |_, _, _, k| k < 250,
                hidden(&spec, &c),
                &mut rng,
            );
            check_inputs(&g, &c, inp, &mut rng);
        }
    }
    // Decode (16-row tiles, 3-stage pipeline) with a KV cache, and split-KV over long keys.
    for spec in mask_kinds(DType::F16, &[4, 1, 1, 3001]) {
        let mut c = Case::plain(DType::F16, 4, 16, 4, 1, 1, 128);
        c.past = 3000;
        let decode_lens = [3001, 1000, 0, 17];
        check_prefix(c, &spec, &decode_lens, &mut rng);
    }
    for spec in mask_kinds(DType::BF16, &[4, 1, 1, 9000]) {
        let c = Case::plain(DType::BF16, 4, 8, 8, 2, 9000, 64);
        let long_lens = [9000, 4321, 0, 8960];
        check_prefix(c, &spec, &long_lens, &mut rng);
    }
}

/// Masks that vary per row ([B, 1, Sq, T], [B, H, Sq, T]; general path), with fully masked
/// rows (zeros), causal and windows.
#[test]
fn cuda_per_row_masks() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(31);
    for dtype in [DType::F16, DType::BF16] {
        for d in [64, 128] {
            let base = Case::plain(dtype, 2, 8, 2, 100, 173, d);
            for shape in [vec![2i64, 1, 100, 173], vec![2, 8, 100, 173]] {
                for spec in mask_kinds(dtype, &shape) {
                    for (causal, window_left) in [(false, -1), (true, -1), (true, 30)] {
                        let mut c = Case {
                            causal,
                            window_left,
                            ..base.clone()
                        };
                        c.mask = spec.clone();
                        // Every 7th query row sees nothing; the rest a random ~80% of keys.
                        let pattern: Vec<bool> = (0..2 * 8 * 100 * 173)
                            .map(|_| rng.random_bool(0.8))
                            .collect();
                        let mut inp = make_inputs(&c, &mut rng);
                        set_mask(
                            &mut inp,
                            &c,
                            |b, h, i, k| i % 7 != 0 && pattern[((b * 8 + h) * 100 + i) * 173 + k],
                            |_| f32::NEG_INFINITY,
                            &mut rng,
                        );
                        check_inputs(&g, &c, inp, &mut rng);
                    }
                }
            }
        }
    }
}
