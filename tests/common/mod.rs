//! Shared helpers for integration tests that run the operator inside ORT through the `ort` crate.

#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `libflash_ort.so` of this profile. `cargo test` links the rlib and does not rebuild the
/// cdylib, so `scripts/test.sh` runs `cargo build` first.
pub fn operator_library() -> PathBuf {
    if let Ok(p) = std::env::var("FLASH_ORT_LIB") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/libflash_ort.so
    let lib = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("libflash_ort.so"))
        .expect("target folder");
    assert!(
        lib.exists(),
        "{} not found: run `cargo build` (same profile) before `cargo test`",
        lib.display()
    );
    lib
}

/// The libonnxruntime.so inside a Python package folder set up by scripts/setup.sh.
pub fn onnxruntime_in(package_root: &str) -> Option<PathBuf> {
    let glob_root = repo().join(package_root);
    let candidates: Vec<PathBuf> = if package_root == ".venv" {
        std::fs::read_dir(glob_root.join("lib"))
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/onnxruntime/capi"))
            .collect()
    } else {
        vec![glob_root.join("onnxruntime/capi")]
    };
    for dir in candidates {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("libonnxruntime.so.") {
                    return Some(e.path());
                }
            }
        }
    }
    None
}

use flash_ort::attention::{
    reference, validate, AttentionAttrs, CpuInputs, ElemType, Elems, InputDescs, MaskData,
    TensorDesc,
};
use ndarray::{Array4, ArrayD};
use ort::session::Session;
use ort::value::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Loads ORT from `dylib`, registers the operator library and runs the bundled GQA/causal/mask
/// model on random inputs; returns the worst absolute error against the fp64 reference and
/// ORT's build info string.
pub fn run_bundled_model_in(dylib: &std::path::Path) -> (f64, String) {
    let env = ort::init_from(dylib)
        .expect("load onnxruntime")
        .build()
        .expect("ORT environment");
    let mut session = Session::builder(&env)
        .unwrap()
        .with_operator_library(operator_library())
        .unwrap()
        .commit_from_file(repo().join("tests/data/flash_gqa_causal_mask.onnx"))
        .expect("session with com.flash.FlashAttention");

    let (b, hq, hkv, s, t, d) = (2usize, 4usize, 2usize, 7usize, 11usize, 32usize);
    let mut rng = StdRng::seed_from_u64(7);
    let mut rand4 =
        |shape: [usize; 4]| Array4::from_shape_fn(shape, |_| rng.random_range(-1.0f32..1.0));
    let q = rand4([b, hq, s, d]);
    let k = rand4([b, hkv, t, d]);
    let v = rand4([b, hkv, t, d]);
    // Right padding: batch 1 sees only its first 6 keys.
    let mask = Array4::from_shape_fn([b, 1, 1, t], |(bi, _, _, j)| bi == 0 || j < 6);

    let outputs = session
        .run(ort::inputs![
            "Q" => Tensor::from_array(q.clone()).unwrap(),
            "K" => Tensor::from_array(k.clone()).unwrap(),
            "V" => Tensor::from_array(v.clone()).unwrap(),
            "attn_mask" => Tensor::from_array(mask.clone()).unwrap(),
        ])
        .expect("run");
    let y: ArrayD<f32> = outputs["Y"].try_extract_array::<f32>().unwrap().to_owned();
    assert_eq!(y.shape(), &[b, hq, s, d]);

    let attrs = AttentionAttrs {
        is_causal: true,
        ..Default::default()
    };
    let descs = InputDescs {
        q: Some(TensorDesc::new(
            ElemType::F32,
            &[b as i64, hq as i64, s as i64, d as i64],
        )),
        k: Some(TensorDesc::new(
            ElemType::F32,
            &[b as i64, hkv as i64, t as i64, d as i64],
        )),
        v: Some(TensorDesc::new(
            ElemType::F32,
            &[b as i64, hkv as i64, t as i64, d as i64],
        )),
        attn_mask: Some(TensorDesc::new(ElemType::Bool, &[b as i64, 1, 1, t as i64])),
        ..Default::default()
    };
    let p = validate(&attrs, &descs).unwrap();
    let mask_bytes: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
    let inp = CpuInputs {
        q: Elems::F32(q.as_slice().unwrap()),
        k: Elems::F32(k.as_slice().unwrap()),
        k_strides: p.k_strides,
        v: Elems::F32(v.as_slice().unwrap()),
        v_strides: p.v_strides,
        mask: Some(MaskData::Bool(&mask_bytes)),
        nonpad_kv_seqlen: None,
    };
    let want = reference::attention_f64(&p, &inp);
    let err = y
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    (err, ort::info().to_string())
}
