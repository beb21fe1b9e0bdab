//! The operator inside the newest supported ORT (the `.venv` from scripts/setup.sh), loaded by
//! Rust's `ort` crate with `load-dynamic` and `with_operator_library`.

mod common;

#[test]
fn bundled_model_matches_reference_in_newest_host() {
    let dylib = std::env::var("ORT_DYLIB_PATH")
        .map(Into::into)
        .ok()
        .or_else(|| common::onnxruntime_in(".venv"))
        .expect("run scripts/setup.sh first");
    let (err, _) = common::run_bundled_model_in(&dylib);
    assert!(err < 1e-5, "max abs error {err}");
}
