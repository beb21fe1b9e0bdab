//! The operator inside the oldest supported ORT (1.20, `.venv-ort120` from scripts/setup.sh),
//! loaded by Rust's `ort` crate: the custom-op version we declare must not exceed its API.

mod common;

#[test]
fn bundled_model_matches_reference_in_ort_1_20() {
    let dylib = common::onnxruntime_in(".venv-ort120").expect("run scripts/setup.sh first");
    assert!(
        dylib.to_string_lossy().contains("1.20"),
        "{}",
        dylib.display()
    );
    let (err, _) = common::run_bundled_model_in(&dylib);
    assert!(err < 1e-5, "max abs error {err}");
}
